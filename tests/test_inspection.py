"""The cost model's inspection: SASS parsing on hand-written text, occupancy arithmetic, the CUDA
kernels' names and work, the gate's rules, and the real command compiling today's kernels of both
backends for sm_90 and sm_80 (Triton's ahead-of-time path and nvcc, no GPU needed) without spills,
each fitting on an SM, within bench/budgets.json (the CI gate), plus a regression the gate must
catch. The budgets' counts hold for the compilers they were measured with (the README's pinned
torch brings the Triton; nvcc 13.0); .ci/run also runs the Triton compile check under the oldest
supported Triton, where counts are reported, not compared."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

from fusedlora.inspection import sass  # noqa: E402
from fusedlora.inspection.model import GPUS, ctas_per_sm  # noqa: E402

SASS = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E.U8 R2, desc[UR4][R4.64] ;
        /*0020*/                   IADD3 R3, R3, 0x1, RZ ;
        /*0030*/                   LDG.E.128 R8, desc[UR4][R6.64] ;
        /*0040*/                   LDGSTS.E.BYPASS.128 [R10], desc[UR4][R12.64] ;
        /*0050*/                   LDGSTS.E [R11], desc[UR4][R14.64] ;
        /*0060*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8].tnspB, R24, gsb0 ;
        /*0070*/                   NOP ;
        /*0080*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*0090*/                   PRMT R5, R2, 0x7604, R5 ;
        /*00a0*/               @P0 BRA 0x10 ;
        /*00b0*/                   FFMA R1, R2, R3, R4 ;
        /*00c0*/                   BRA 0xc0;
"""


def test_the_main_loop_is_the_backward_branch_holding_the_mma_and_is_counted_by_class():
    instructions = sass.parse(SASS)
    assert len(instructions) == 12  # the NOP is padding, not work
    body = sass.main_loop(instructions)
    assert [i.address for i in body] == [0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x80, 0x90, 0xa0]
    counts = sass.count(body)
    assert counts.instructions == 9
    assert counts.by_class == {"global_load": 2, "integer": 1, "async_copy": 2, "tensor": 1, "barrier": 1,
                               "convert": 1, "control": 1}
    assert counts.global_loads_by_width == {1: 1, 16: 1}
    assert counts.async_copies_by_width == {16: 1, 4: 1}
    assert counts.scalar_global_loads == 2  # the byte load and the 4-byte copy
    assert counts.tensor_ops == {"HGMMA.64x128x16.F32.BF16": 1}
    assert counts.wgmma_wait_depth == 1
    assert counts.per_element(counts.instructions, warps=8, elements=128 * 64) == pytest.approx(9 * 8 * 32 / 8192)


# A kernel without tensor-core instructions (the CUDA small-M kernel): its main loop is the one of the
# 16-byte loads, the longest of the compiler's versions of it; a loop without wide loads is not one.
NO_MMA = """
        /*0000*/                   LDG.E.128 R8, desc[UR4][R6.64] ;
        /*0010*/                   FFMA R1, R2, R3, R4 ;
        /*0020*/               @P0 BRA 0x0 ;
        /*0030*/                   LDG.E.128 R8, desc[UR4][R6.64] ;
        /*0040*/                   LDG.E.U8 R2, desc[UR4][R4.64] ;
        /*0050*/                   FFMA R1, R2, R3, R4 ;
        /*0060*/               @P0 BRA 0x30 ;
        /*0070*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0080*/               @P0 BRA 0x70 ;
"""


def test_without_tensor_ops_the_main_loop_is_the_longest_one_of_16_byte_loads():
    instructions = sass.parse(NO_MMA)
    assert [i.address for i in sass.main_loop(instructions)] == [0x30, 0x40, 0x50, 0x60]
    assert sass.main_loop(sass.parse(NO_MMA.split("/*0000*/")[0] + "/*0070*/" + NO_MMA.split("/*0070*/")[1])) == []


def test_an_inner_loop_counts_once_per_trip():
    text = """
        /*0000*/                   HMMA.16816.F32.BF16 R0, R4, R8, R0 ;
        /*0010*/                   LDG.E.U8 R2, desc[UR4][R4.64] ;
        /*0020*/               @P1 BRA 0x10 ;
        /*0030*/               @P0 BRA 0x0 ;
    """
    counts = sass.count(sass.main_loop(sass.parse(text)), inner_trips=4)
    assert (counts.instructions, counts.static_instructions) == (1 + 4 * 2 + 1, 4)
    assert counts.global_loads_by_width == {1: 4} and counts.tensor_ops == {"HMMA.16816.F32.BF16": 1}


def test_cuda_kernel_names_and_work_follow_csrc():
    from fusedlora.benchmark.cases import Case
    from fusedlora.inspection import cuda

    name = "_ZN9fusedlora39_GLOBAL__N__b41cabec_7_gemm_cu_a350ca7411gemm_kernelI13__nv_bfloat16Li3ELi1EEEvPKT_lNS_10W"
    assert cuda._demangle(name) == ("gemm_kernel", ("bf16", 3, 1))
    assert cuda._demangle("_ZN9fusedlora12_GLOBAL__N_113shrink_kernelI6__halfEEvPKT_l") == ("shrink_kernel", ("fp16",))
    small_m = "_ZN9fusedlora12_GLOBAL__N_114small_m_kernelILi3ELi4ELb1EEEvNS_7OperandENS_10WeightViewE"
    assert cuda._demangle(small_m) == ("small_m_kernel", (3, 4, True))
    case = Case("t", 100, 300, 200, 8, "nf4")
    forward, grad_x = (cuda._weight_work("gemm_kernel", mode, case, 132) for mode in (cuda.FORWARD, cuda.GRAD_X))
    assert forward.flops == 2.0 * 100 * 200 * (300 + 8) and grad_x.flops == 2.0 * 100 * 300 * (200 + 8)
    assert (forward.programs, forward.trips) == (2 * 4, 10) and (grad_x.programs, grad_x.trips) == (2 * 5, 7)
    # small M: 256 columns a block, 256 four-bit (128 int8) weights of K a step; about 4 blocks per SM
    small = cuda._weight_work("small_m_kernel", None, Case("t", 1, 4096, 200, 8, "nf4"), 132)
    assert (small.programs, small.trips, small.weight_elements) == (16, 1, 256 * 256)
    wide = cuda._weight_work("small_m_kernel", None, Case("t", 1, 4096, 14336, 8, "int8"), 132)
    assert (wide.programs, wide.trips, wide.weight_elements) == (56 * 8, 4, 256 * 128)
    assert cuda._small_m_grid(Case("t", 1, 65536, 65536, 8, "nf4"), 132)[1:3] == (64, 4)  # at most 4 steps a slice
    assert [key[0] for key, _ in cuda._launches(Case("t", 8192, 64, 64, 8, "nf4"), "fused")] == [
        "shrink_kernel", "gemm_mma_kernel", "grad_u_kernel", "grad_a_kernel", "gemm_mma_kernel"]
    assert [key[0] for key, _ in cuda._launches(Case("t", 8192, 96, 64, 8, "nf4"), "fused")][1] == "gemm_kernel"  # K % 64
    # The workspace regime: W dequantized (before each GEMM), the shrink copying x, one cuBLAS GEMM
    # over K + r forward and one accumulating onto drop'(du·A) for dx; where the dequantization
    # cannot read the case (K % 32), the call stays fused.
    workspace = cuda._launches(Case("t", 8192, 128, 72, 8, "nf4"), "workspace")
    gemms = [launch for launch in workspace if isinstance(launch, cuda.LibraryGemm)]
    assert [launch[0][0] for launch in workspace if not isinstance(launch, cuda.LibraryGemm)] == [
        "dequantize_kernel", "shrink_kernel", "grad_u_kernel", "grad_a_kernel", "lora_dx_kernel", "dequantize_kernel"]
    assert [(g.m, g.n, g.k) for g in gemms] == [(8192, 72, 128 + 8), (8192, 128, 72)]
    assert workspace[1][1] == cuda.COPIES_X and cuda._host_launches(Case("t", 8192, 128, 72, 8, "nf4"), "workspace") == 15
    assert cuda._launches(Case("t", 8192, 80, 64, 8, "nf4"), "workspace")[1][0][0] == "gemm_kernel"
    dequantize = cuda._weight_work("dequantize_kernel", None, Case("t", 8192, 4096, 14336, 16, "nf4"), 132)
    assert (dequantize.programs, dequantize.trips, dequantize.weight_elements) == (16 * 132, 7, 128 * 32)
    # The GEMMs on tensor cores: 64 x 64 tiles, 64 of the reduction a step
    mma_gemm = "_ZN9fusedlora44_GLOBAL__N__bdc89922_11_gemm_mma_cu_a350ca7415gemm_mma_kernelI6__halfLi4ELi0EEEvPKT_l"
    assert cuda._demangle(mma_gemm) == ("gemm_mma_kernel", ("fp16", 4, 0))
    tiles = cuda._weight_work("gemm_mma_kernel", cuda.GRAD_X, Case("t", 100, 256, 200, 8, "nf4"), 132)
    assert (tiles.programs, tiles.trips, tiles.weight_elements) == (2 * 4, 4 - 2, 64 * 64)  # 4 steps: a peeled trip, the tail
    tiles = cuda._weight_work("gemm_mma_kernel", cuda.FORWARD, Case("t", 100, 256, 200, 8, "nf4"), 132)
    assert (tiles.programs, tiles.trips) == (2 * 4, 4 - 1)  # the last step after the loop
    assert [key[0] for key, _ in cuda._launches(Case("t", 4, 64, 64, 8, "nf4"), "workspace")] == ["small_m_kernel"]
    assert cuda._host_launches(Case("t", 4, 64, 64, 8, "nf4"), "fused") == 0  # M <= 16: a decode case, forward only
    # small M on tensor cores (K a multiple of 256): 128 columns a block, 256 of K a step, about 2 blocks per SM
    mma = "_ZN9fusedlora12_GLOBAL__N_118small_m_mma_kernelILi3E13__nv_bfloat16Li2ELb1EEEvNS_7OperandENS_10WeightViewE"
    assert cuda._demangle(mma) == ("small_m_mma_kernel", (3, "bf16", 2, True))
    decode = Case("t", 16, 4096, 14336, 16, "nf4")
    assert [key for key, _ in cuda._launches(decode, "fused")] == [("small_m_mma_kernel", (3, "bf16", 2, True))]
    tensor = cuda._weight_work("small_m_mma_kernel", None, decode, 132)
    assert (tensor.programs, tensor.trips, tensor.weight_elements) == (112 * 4, 4, 128 * 256)
    long_k = [Case("t", m, 65536, 14336, 16, "nf4") for m in (1, 16)]  # x's slice holds 8 steps of 8 rows, 4 of 16
    assert [cuda._mma_grid(case, 132)[2:4] for case in long_k] == [(32, 8), (64, 4)]
    assert cuda._launches(Case("t", 1, 4096, 64, 8, "int8"), "fused")[0][0] == ("small_m_mma_kernel", (1, "bf16", 1, False))
    assert cuda._launches(Case("t", 16, 64, 64, 8, "nf4"), "fused")[0][0][0] == "shrink_kernel"  # K = 64: the GEMM path
    assert cuda._host_launches(decode, "fused") == 0 and cuda._host_launches(Case("t", 16, 64, 64, 8, "nf4"), "fused") == 3
    assert cuda._grad_a_slices(8192) == 16 and cuda._grad_a_slices(300) == 2
    assert cuda._staging_trips() == 64 * 32 // 128 // 4


def _row(**overrides) -> dict:
    row = dict(key="k/nf4", case="c", candidate=None, family="cuda", local_bytes=0, ctas_per_sm=2,
               instructions_per_element=10.0, scalar_loads_per_element=1.0, loop_instructions=100)
    return {**row, **overrides}


def test_the_gate_fails_a_kernel_whose_counted_main_loop_is_gone_and_records_compilers_per_family(tmp_path):
    from fusedlora.inspection.budgets import check, comparable_families, load, write

    results = {"commit": "abc", "versions": {"triton": "9.9", "nvcc": "release 1.0"},
               "archs": {"90": {"kernels": [_row()]}}}
    path = tmp_path / "budgets.json"
    path.write_text(json.dumps({"limits": {}, "targets": {}, "measured_with": {"triton": {"triton": "3.8.0"}}}))
    write(results, path)
    budgets = load(path)
    # Only the family inspected is recorded as measured with this run's compiler.
    assert budgets["measured_with"] == {"triton": {"triton": "3.8.0"}, "cuda": {"nvcc": "release 1.0", "commit": "abc"}}
    assert comparable_families(budgets, {"triton": "9.9", "nvcc": "release 1.0"}) == {"cuda"}
    assert check([_row()], 90, budgets, {"cuda"}) == []
    lost = _row(instructions_per_element=None, scalar_loads_per_element=None, loop_instructions=0)
    assert any("no main loop found" in v for v in check([lost], 90, budgets, {"cuda"}))
    assert any("instructions_per_element 20 > budget 10.0" in v
               for v in check([_row(instructions_per_element=20.0)], 90, budgets, {"cuda"}))
    # Writing again sets today's figures: an improvement lowers the limit; a count whose loop is
    # gone keeps its limit, so the gate goes on failing it.
    write({**results, "archs": {"90": {"kernels": [_row(instructions_per_element=6.0)]}}}, path)
    assert load(path)["limits"]["90"]["k/nf4"]["instructions_per_element"] == 6.0
    write({**results, "archs": {"90": {"kernels": [lost]}}}, path)
    assert any("no main loop found" in v for v in check([lost], 90, load(path), {"cuda"}))


def test_ctas_per_sm_takes_the_tightest_of_registers_shared_memory_and_threads():
    h200 = GPUS[90]
    assert ctas_per_sm(h200, registers=128, warps=4, shared_bytes=0) == 4  # 128·32·4 registers per CTA
    assert ctas_per_sm(h200, registers=32, warps=4, shared_bytes=100 * 1024) == 2  # 101 KB each of 228 KB
    assert ctas_per_sm(h200, registers=32, warps=32, shared_bytes=0) == 2  # 1024 threads each of 2048
    assert ctas_per_sm(h200, registers=255, warps=8, shared_bytes=0) == 1


def _env() -> dict:
    return {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}


@pytest.fixture(scope="module", params=[90, 80])
def inspected(request, tmp_path_factory):
    arch = request.param
    out = tmp_path_factory.mktemp("inspect") / "inspect.json"
    result = subprocess.run([sys.executable, "-m", "fusedlora", "inspect", "--arch", str(arch), "--check",
                             "--json", str(out)], capture_output=True, text=True, env=_env(), timeout=900)
    return arch, result, (json.loads(out.read_text()) if out.is_file() else None)


def test_todays_kernels_compile_without_spills_and_within_their_budgets(inspected):
    import triton

    from fusedlora.inspection.budgets import comparable_families, load
    from fusedlora.inspection.cuda import nvcc_version

    arch, result, report = inspected
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "over budget" not in result.stdout
    kernels = report["archs"][str(arch)]["kernels"]
    assert {row["family"] for row in kernels} == {"triton", "cuda"}
    assert all(row["local_bytes"] == 0 and row["ctas_per_sm"] >= 1 for row in kernels)
    families = comparable_families(load(), {"triton": triton.__version__, "nvcc": nvcc_version()})
    for family in ("triton", "cuda"):
        assert (f"{family}: not the compiler" not in result.stdout) == (family in families), result.stdout[-2000:]


_SMALL_M_SHAPES = """
import torch
from fusedlora.backends import triton_launch
from fusedlora.formats import quantize
from fusedlora.inspection import sass
from fusedlora.inspection.compile import compile_launch

meta = torch.device("meta")
shapes = [(1, "nf4", 4097, 64, 16, torch.bfloat16), (1, "nf4", 4096, 32, 16, torch.bfloat16),
          (1, "nf4", 4096, 64, 200, torch.bfloat16), (1, "int8", 4097, 64, 16, torch.bfloat16),
          (5, "nf4", 4097, 64, 16, torch.bfloat16), (5, "nf4", 4096, 32, 16, torch.bfloat16),
          (5, "nf4", 4096, 64, 64, torch.bfloat16), (5, "nf4", 4096, 64, 16, torch.float32)]
for m, fmt, k, blocksize, r, dtype in shapes:
    weight = quantize(torch.empty((4096, k), device=meta, dtype=dtype), fmt, blocksize)
    x = torch.empty((m, k), device=meta, dtype=dtype)
    lora_a = torch.empty((r, k), device=meta, dtype=dtype)
    lora_b = torch.empty((4096, r), device=meta, dtype=dtype)
    with triton_launch.recording((ARCH // 10, ARCH % 10), 132) as record:
        triton_launch.forward(x, weight, lora_a, lora_b, 2.0, None, 0.1, 1)
    (launch,) = record.launches
    _, usage = sass.disassemble(compile_launch(launch, ARCH).asm["cubin"])
    print(launch.kernel.fn.__name__, m, fmt, k, blocksize, r, sass.resource_usage(usage)["local_bytes"])
"""


@pytest.mark.parametrize("arch", [90, 80])
def test_the_small_m_kernels_compile_without_spills_off_the_headline_shapes(arch):
    """The shapes that take fewer rows per program (odd K, a per-byte absmax, a large rank, fp32 x)
    in the one-row (M = 1) and small-M (M = 5) kernels: the headline inspection never compiles them."""
    script = _SMALL_M_SHAPES.replace("ARCH", str(arch))
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env(), timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [line.split() for line in result.stdout.splitlines()]
    kernels = ["lora_gemv_kernel"] * 4 + ["lora_small_m_kernel"] * 4
    assert [row[0] for row in rows] == kernels and all(row[-1] == "0" for row in rows), result.stdout


def test_the_report_counts_every_kernel_and_labels_the_estimates_a_model(inspected):
    arch, result, report = inspected
    assert report is not None, result.stderr[-4000:]
    by_key = {row["key"]: row for row in report["archs"][str(arch)]["kernels"]}
    assert {"lora_forward_kernel/nf4", "lora_grad_x_kernel/nf4", "lora_small_m_kernel/nf4", "lora_shrink_kernel",
            "lora_grad_u_kernel", "lora_grad_a_kernel", "lora_forward_kernel/dense"} <= set(by_key)
    assert ("lora_forward_kernel/fp8" in by_key) == (arch >= 89)  # fp8 weights need sm_89
    # The GEMMs run on the tensor cores (wgmma on Hopper); dequantizing nf4 costs more per element
    # than reading bf16.
    mma = "HGMMA" if arch == 90 else "HMMA"
    assert all(mma in "".join(by_key[f"lora_{k}_kernel/{f}"]["tensor_ops"]) for k in ("forward", "grad_x")
               for f in ("nf4", "dense"))
    assert by_key["lora_forward_kernel/nf4"]["instructions_per_element"] > by_key["lora_forward_kernel/dense"][
        "instructions_per_element"]
    # The CUDA C++ kernels, counted from nvcc's SASS: the mma.sync GEMMs per format (W's 16-byte
    # loads: 4-bit one chunk of 32 weights a thread and step, dense four), the tensor-core small-M
    # kernel's loop of HMMA and W's 8-byte loads (2 rows x 4 chunks a step), the LoRA kernels' resources.
    for mode in ("forward", "grad_x"):
        gemm, dense = by_key[f"cuda/gemm_mma_kernel/{mode}/nf4"], by_key[f"cuda/gemm_mma_kernel/{mode}/dense"]
        assert "HMMA" in "".join(gemm["tensor_ops"]) and gemm["global_loads_by_width"].get("16", 0) == 1, gemm
        assert dense["global_loads_by_width"].get("16", 0) == 4, dense
        assert gemm["instructions_per_element"] > dense["instructions_per_element"]
    for rows in ("m8", "m16"):
        small = by_key[f"cuda/small_m_mma_kernel/{rows}/nf4"]
        assert "HMMA" in "".join(small["tensor_ops"]) and small["global_loads_by_width"].get("8", 0) == 8, small
    assert {"cuda/shrink_kernel", "cuda/grad_u_kernel", "cuda/grad_a_kernel", "cuda/lora_dx_kernel"} <= set(by_key)
    assert by_key["cuda/dequantize_kernel/nf4"]["global_loads_by_width"].get("16", 0) == 1  # a run of 32 weights
    backends = {(c["backend"], c["case"]) for c in report["archs"][str(arch)]["cases"]}
    assert {backend for backend, _ in backends} == {"triton", "triton-fused", "triton-workspace", "cuda", "cuda-fused",
                                                   "cuda-workspace"}
    assert len(backends) == len(report["archs"][str(arch)]["cases"])
    assert "MODEL" in result.stdout and report["kind"].startswith("static inspection and MODEL estimates")
    # Calibration: the dense Triton path lands near a cuBLAS-class bf16 GEMM pair.
    dense = [c for c in report["archs"][str(arch)]["cases"]
             if c["backend"] == "triton" and c["fmt"] == "dense" and c["m"] == 8192]
    assert dense and all(0.9 < c["model_ratio_to_bf16"] < 1.3 for c in dense), dense
    # Each training case is estimated in both regimes; on Hopper, for nf4, the launcher's choice is
    # the faster one by far (on Ampere the two are within the model's error of each other).
    training = [c for c in report["archs"][str(arch)]["cases"]
                if c["backend"] == "triton" and c["m"] == 8192 and c["fmt"] == "nf4" and arch == 90]
    assert len(training) == (2 if arch == 90 else 0)
    for chosen in training:
        regimes = {c["backend"]: c["model_seconds"] for c in report["archs"][str(arch)]["cases"]
                   if c["case"] == chosen["case"] and c["backend"].startswith("triton-")}
        assert chosen["model_seconds"] == min(regimes.values()), (chosen, regimes)
    # ... and so does the CUDA backend's, whose workspace regime lands within 10% of Triton's choice.
    for chosen in [c for c in report["archs"][str(arch)]["cases"]
                   if c["backend"] == "cuda" and c["m"] == 8192 and c["fmt"] == "nf4" and arch == 90]:
        same = [c for c in report["archs"][str(arch)]["cases"] if c["case"] == chosen["case"]]
        regimes = {c["backend"]: c["model_seconds"] for c in same if c["backend"].startswith("cuda-")}
        triton = next(c["model_seconds"] for c in same if c["backend"] == "triton")
        assert chosen["model_seconds"] == min(regimes.values()) and chosen["model_seconds"] < 1.1 * triton, same
    assert "dequantize_kernel/nf4" in by_key and by_key["dequantize_kernel/nf4"]["ctas_per_sm"] >= 4


REGRESSION = textwrap.dedent("""
    import dataclasses
    from fusedlora.benchmark.cases import Case
    from fusedlora.inspection.budgets import budget_key, check, load, measured
    from fusedlora.inspection.compile import signature_of
    from fusedlora.inspection.kernels import inspect_launch, record_case
    from fusedlora.inspection.model import GPUS

    gpu = GPUS[90]
    launches = record_case(Case("up_proj", 8192, 4096, 14336, 16, "nf4"), gpu, "fused")
    forward = next(l for l in launches if l.kernel.fn.__name__ == "lora_forward_kernel" and l.candidate == 0)
    # x is contiguous: a launch turns stride_xk == 1 into a constant, and so does the inspection.
    assert signature_of(forward, 90)["stride_xk"] == "constexpr"
    report = inspect_launch(forward, gpu)
    budgets = load()
    assert check([dict(key=budget_key(report.kernel, "nf4"), case="shipped", family="triton", **measured(report))],
                 90, budgets,
                 {"triton"}) == []
    # The regression: one absmax gather per element instead of one per row and tile.
    gathering = dataclasses.replace(forward, kwargs={**forward.kwargs, "K_ALIGNED": False})
    report = inspect_launch(gathering, gpu)
    regression = [dict(key=budget_key(report.kernel, "nf4"), case="regression", family="triton", **measured(report))]
    print("\\n".join(check(regression, 90, budgets, {"triton"})))
""")


def test_the_gate_catches_a_kernel_that_gathers_more_per_element():
    import triton

    from fusedlora.inspection.budgets import comparable_families, load

    # Counts are the compiler's: the budgets hold for the Triton of the README's pinned torch.
    assert "triton" in comparable_families(load(), {"triton": triton.__version__}), \
        f"the budgets are not Triton {triton.__version__}'s"
    result = subprocess.run([sys.executable, "-c", REGRESSION], capture_output=True, text=True, env=_env(),
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "lora_forward_kernel/nf4 (regression, candidate 0): instructions_per_element" in result.stdout, \
        result.stdout
