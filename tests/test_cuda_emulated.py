"""The CUDA C++ kernels executed on the CPU: csrc/'s kernels and host logic (lora_ops.cpp) compiled
as host C++ with the device emulated (tests/emulation/, tests/cuda_emulation.py, docs/design.md
§6). Every launcher, format and dtype on ragged shapes against the float64 oracle under two thread
schedules (five with FUSEDLORA_EMULATION_FULL=1, on a wider matrix); the emulated number
conversions bit for bit against torch's; the tensor-core primitives of the GEMM (cp.async,
ldmatrix, mma.sync m16n8k16) in PTX's lane layouts, and their PTX assembled by nvcc; and planted
bugs (source mutations) that must fail."""

import concurrent.futures
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cuda_emulation
from cuda_emulation import CSRC, EMULATION, WRAPPERS, Case, check
from helpers import assert_close

FULL = os.environ.get("FUSEDLORA_EMULATION_FULL") == "1"
SCHEDULES = [("forward", 0), ("shuffled", 1)] + ([("reverse", 0), ("shuffled", 2), ("shuffled", 3)] if FULL else [])
FORMATS = ["nf4", "fp4", "int8", "fp8", "dense"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Path:
    """The harness, built once (its build folder: the planted-bug test starts from it)."""
    build_dir = tmp_path_factory.mktemp("emulation")
    cuda_emulation.build(build_dir)
    return build_dir


def _matrix() -> list[Case]:
    """Each format x dtype on alternating paths (small-M, M <= 4, and the GEMM) with bias, dropout,
    strided x, ranks and dB's two reductions rotated through; then the edges."""
    shapes = [(3, 72, 80), (33, 96, 136), (4, 130, 40), (70, 64, 72)] if FULL else [(3, 72, 80), (33, 96, 136)]
    ranks = [1, 8, 16, 64]
    cases = []
    for index, (fmt, dtype) in enumerate((f, d) for f in FORMATS for d in DTYPES):
        for offset, (m, k, n) in enumerate(shapes):
            i = index + offset
            cases.append(Case(m, k, n, ranks[i % 4], fmt, dtype, bias=i % 2 == 0, p=0.1 if i % 3 == 0 else 0.0,
                              x_padding=8 if i % 4 == 1 else 0, deterministic=i % 5 == 2,
                              weight_dtype=DTYPES[i % 3]))
            if not FULL:
                shapes = shapes[::-1]  # the next format x dtype takes the other path first
                break
    return cases + [
        Case(5, 64, 96, 256, "nf4", torch.bfloat16, p=0.1),  # the largest rank, the GEMM at small M
        Case(40, 65, 48, 8, "nf4", torch.float16, blocksize=32, double_quant=False),  # odd K: blocks span rows
        Case(4, 130, 24, 8, "fp4", torch.bfloat16, blocksize=128),  # small-M, unaligned rows: the scalar path
        Case(2, 256, 40, 4, "nf4", torch.bfloat16, blocksize=256, x_padding=16),  # tensor cores, x staged 16 bytes a time
        Case(1, 256, 40, 8, "nf4", torch.bfloat16, p=0.1),  # tensor cores, one row
        Case(3, 320, 40, 4, "nf4", torch.bfloat16),  # FMA small M (K not a multiple of 256), 16-byte loads
        Case(1, 320, 40, 8, "nf4", torch.float16, p=0.1),  # FMA small M, one row (its own unrolling)
        Case(1, 64, 40, 4, "int8", torch.float32),  # one row, fp32 x: four values per 16-byte load
        Case(1, 128, 40, 4, "fp4", torch.float32, bias=True),
        Case(3, 64, 40, 4, "fp8", torch.float16),  # 16-byte chunks of fp8 for three rows
        Case(2, 96, 24, 4, "int8", torch.float16, x_padding=4),  # x's rows not 16-byte aligned: any-layout path
        Case(36, 48, 70, 4, "int8", torch.bfloat16, deterministic=True, need_dx=False),
        # Small M split over K (the harness's GPU has 4 SMs): slices summed by the last block of a group
        Case(1, 1024, 300, 8, "nf4", torch.bfloat16),  # tensor cores: three groups, the last ragged; two slices
        Case(3, 640, 40, 16, "int8", torch.float16, p=0.1),  # five slices of one step
        Case(3, 1280, 600, 8, "nf4", torch.bfloat16),  # five groups; two slices, the last one step short
        Case(2, 2048, 1100, 4, "fp8", torch.bfloat16, bias=False, need_dx=False),  # one slice: x's whole slice at M <= 8
        Case(12, 2048, 520, 8, "nf4", torch.bfloat16),  # tensor cores, M <= 16: two slices of 4 steps (the most)
        Case(1, 512, 40, 4, "nf4", torch.float32, blocksize=512),  # an absmax block longer than a step
        Case(1, 600, 70, 4, "dense", torch.bfloat16, weight_dtype=torch.float16),  # any-layout path, ragged K
        # Small M on tensor cores (16-bit x, K a multiple of 256): 8 rows of x per instruction, or 16
        Case(16, 512, 150, 24, "nf4", torch.bfloat16, p=0.1, x_padding=8),  # two rank tiles, the second ragged
        Case(9, 256, 72, 8, "fp4", torch.float16, blocksize=128, double_quant=False),
        Case(12, 768, 136, 16, "int8", torch.bfloat16, deterministic=True),  # three slices of one step
        Case(7, 256, 40, 4, "fp8", torch.float16, bias=False, x_padding=4),  # x staged value by value
        Case(5, 512, 64, 8, "dense", torch.bfloat16, weight_dtype=torch.bfloat16),
        Case(6, 256, 40, 4, "nf4", torch.bfloat16, blocksize=1024),  # an absmax block longer than the step
        # fp32 LoRA factors: A split into a 16-bit value and its remainder
        Case(4, 256, 72, 20, "nf4", torch.bfloat16, p=0.1, lora_dtype=torch.float32),
        Case(11, 512, 40, 8, "int8", torch.float16, x_padding=8, lora_dtype=torch.float32),
        # ... and where they do not apply, at 4 < M <= 16: the GEMM
        Case(16, 256, 24, 130, "nf4", torch.bfloat16),  # r > 128
        Case(8, 256, 40, 4, "dense", torch.float16, weight_dtype=torch.float32),  # W not in x's dtype
        # The GEMMs on tensor cores (16-bit x, K a multiple of 64, N of 8): partial tiles of M and N,
        # grad_x's last step past N, one step and several, both absmax storages, blocksize 32
        Case(70, 128, 136, 16, "nf4", torch.bfloat16, p=0.1),
        Case(33, 64, 72, 8, "nf4", torch.float16, blocksize=32, double_quant=False),
        Case(65, 192, 64, 4, "int8", torch.bfloat16, bias=False, x_padding=8),
        Case(20, 128, 40, 8, "fp8", torch.float16, p=0.1, x_padding=8),
        Case(17, 64, 80, 20, "dense", torch.bfloat16, weight_dtype=torch.bfloat16),
        Case(40, 128, 128, 40, "fp4", torch.bfloat16, deterministic=True, lora_dtype=torch.float32),
        # ... and where they do not apply: N not a multiple of 8, x's rows not 16-byte aligned (the
        # forward on the WMMA GEMM, grad_x on tensor cores: g is contiguous)
        Case(40, 128, 70, 8, "nf4", torch.bfloat16),
        Case(36, 64, 48, 4, "int8", torch.bfloat16, x_padding=4),
        # The workspace regime: W dequantized (csrc/dequantize.cu) for ATen's matmuls, the LoRA term
        # folded into the forward's ([x | u] · [deq(W) | s·B]ᵀ) and written first for dx
        Case(70, 128, 136, 16, "nf4", torch.bfloat16, p=0.1, regime="workspace"),
        Case(33, 64, 72, 8, "fp4", torch.float16, blocksize=32, double_quant=False, bias=False, regime="workspace"),
        Case(65, 192, 64, 4, "int8", torch.bfloat16, x_padding=8, deterministic=True, regime="workspace"),
        Case(20, 128, 40, 8, "fp8", torch.float16, p=0.1, lora_dtype=torch.float32, regime="workspace"),
        Case(17, 64, 80, 20, "dense", torch.bfloat16, weight_dtype=torch.bfloat16, need_dx=False, regime="workspace"),
        Case(40, 96, 70, 8, "nf4", torch.bfloat16, p=0.1, x_padding=4, regime="workspace"),  # any N, any x layout
        # ... and where it cannot take the call: fp32 x, K not a multiple of 32 (they stay fused)
        Case(40, 128, 72, 8, "nf4", torch.float32, regime="workspace"),
        Case(40, 80, 72, 8, "int8", torch.bfloat16, regime="workspace"),
    ]


MATRIX = _matrix()


@pytest.mark.parametrize("case", MATRIX, ids=[case.label for case in MATRIX])
def test_every_launcher_format_and_dtype_matches_float64(harness, case):
    for schedule, seed in SCHEDULES:
        check(case, schedule, seed)


def test_small_m_forward_is_one_launch_that_allocates_only_its_outputs(harness):
    """M <= 4 (the FMA kernel) and M <= 16 on tensor cores: one kernel launch per call, in one
    slice of K or several, with the LoRA term or without; a warm call allocates y and u alone (the
    split-K scratch persists, its counters left zero: a second call gives the first's y); u comes in
    the LoRA dtype, zeros without the term."""
    from fusedlora import quantize

    ops = torch.ops.fusedlora_emulated
    ops.set_schedule("shuffled", 5)
    g = torch.Generator().manual_seed(3)
    for m, k, scaling in ((1, 1024, 1.5), (3, 64, 1.5), (2, 1024, 0.0), (16, 1024, 1.5), (9, 512, 0.0)):
        weight = quantize(torch.randn(300, k, generator=g) * 0.05, "nf4")
        x = torch.randn(m, k, generator=g).to(torch.bfloat16)
        lora_A, lora_B = torch.randn(8, k, generator=g) / k**0.5, torch.randn(300, 8, generator=g)  # fp32
        calls = [ops.forward(x, weight.tensors(), "nf4", [300, k], weight.blocksize, lora_A, lora_B, scaling, None,
                             0.0, torch.tensor(5)) for _ in range(2)]
        assert ops.last_forward_cost() == [1, 2], (m, k, scaling)
        (y, u), (y_again, u_again) = calls
        assert torch.equal(y, y_again) and torch.equal(u, u_again) and u.dtype == torch.float32
        assert u.any() if scaling else not u.any()


def test_the_gemms_take_tensor_cores_where_their_rule_holds(harness):
    """The forward (left: x) and grad_x (left: g, contiguous) GEMMs take csrc/gemm_mma.cu for
    the matrix's tensor-core GEMM cases and the WMMA GEMM for its fallbacks (so each case there tests
    the path its comment names), and never for fp32 activations or a dense W in another dtype."""
    from fusedlora import quantize

    takes = torch.ops.fusedlora_emulated.gemm_on_tensor_cores
    g = torch.Generator().manual_seed(9)
    assert sum(c.m > 16 and c.k % 64 == 0 and c.n % 8 == 0 for c in MATRIX) >= 6
    for case in MATRIX + [Case(20, 64, 40, 4, "nf4", torch.float32),
                          Case(20, 64, 40, 4, "dense", torch.bfloat16, weight_dtype=torch.float16)]:
        values = torch.randn(case.n, case.k, generator=g)
        weight = quantize(values.to(case.weight_dtype) if case.fmt == "dense" else values, case.fmt, case.blocksize,
                          case.double_quant)
        x = torch.randn(case.m, case.k + case.x_padding, generator=g).to(case.dtype)[:, :case.k]
        grad_y = torch.randn(case.m, case.n, generator=g).to(case.dtype)
        arguments = (weight.tensors(), case.fmt, [case.n, case.k], weight.blocksize)
        rule = (case.dtype != torch.float32 and case.k % 64 == 0 and case.n % 8 == 0
                and (case.fmt != "dense" or case.weight_dtype == case.dtype))
        assert takes(grad_y, *arguments) == rule, case.label
        assert takes(x, *arguments) == (rule and (case.k + case.x_padding) % 8 == 0), case.label


@pytest.mark.parametrize("fmt", ["nf4", "dense"])
def test_the_workspace_regime_without_the_lora_term(harness, fmt):
    """scaling 0: y = x · deq(W)ᵀ + bias from one matmul on the dequantized W (a dense W in x's
    dtype used as it is stored), u zeros, dx = g · deq(W); each against float64."""
    from fusedlora import quantize

    ops = torch.ops.fusedlora_emulated
    ops.set_schedule("shuffled", 4)
    g = torch.Generator().manual_seed(13)
    m, k, n, r = 40, 128, 72, 8
    values = torch.randn(n, k, generator=g) * 0.05
    weight = quantize(values.bfloat16() if fmt == "dense" else values, fmt)
    x, grad_y = torch.randn(m, k, generator=g).bfloat16(), torch.randn(m, n, generator=g).bfloat16()
    lora_A, lora_B = torch.randn(r, k, generator=g).bfloat16(), torch.randn(n, r, generator=g).bfloat16()
    bias = torch.randn(n, generator=g).bfloat16()
    arguments = (weight.tensors(), fmt, [n, k], weight.blocksize, lora_A, lora_B, 0.0)
    y, u = ops.forward(x, *arguments, bias, 0.0, torch.tensor(3), "workspace")
    dx, dA, dB = ops.backward(grad_y, x, u, *arguments, 0.0, torch.tensor(3), True, "workspace")
    w64 = weight.dequantize(torch.float64)
    assert_close(y, x.double() @ w64.t() + bias.double(), torch.bfloat16, "y")
    assert_close(dx, grad_y.double() @ w64, torch.bfloat16, "dx")
    assert u.dtype == torch.bfloat16 and not u.any() and not dA.any() and not dB.any()


def test_the_workspace_regime_runs_where_its_rule_holds(harness):
    """The matrix's workspace cases take it (W dequantized: 16-bit x, K a multiple of 32, W read
    in 16-byte chunks) but for the two fallbacks its comment names, so each case tests the path it
    says; a dense W in another dtype stays fused too."""
    from fusedlora import quantize

    takes = torch.ops.fusedlora_emulated.dequantize_takes
    g = torch.Generator().manual_seed(10)
    cases = [c for c in MATRIX if c.regime == "workspace"]
    extra = [Case(40, 128, 72, 8, "dense", torch.float16)]  # W stored in fp32
    assert len(cases) >= 7
    fallbacks = 0
    for case in cases + extra:
        values = torch.randn(case.n, case.k, generator=g)
        weight = quantize(values.to(case.weight_dtype) if case.fmt == "dense" else values, case.fmt, case.blocksize,
                          case.double_quant)
        left = torch.randn(case.m, case.k, generator=g).to(case.dtype)
        rule = (case.dtype != torch.float32 and case.k % 32 == 0
                and (case.fmt != "dense" or case.weight_dtype == case.dtype))
        taken = takes(left, weight.tensors(), case.fmt, [case.n, case.k], weight.blocksize)
        assert taken == rule, case.label
        fallbacks += case in cases and not taken
    assert fallbacks == 2


def test_emulated_conversions_round_as_torch_does(harness):
    g = torch.Generator().manual_seed(7)
    edges = torch.tensor([0.0, -0.0, 1.0, 65504.0, 65519.0, 65520.0, 1e-8, 2.0**-24, 3 * 2.0**-25, 2.0**-25,
                          float("inf"), -float("inf"), 3.0e38, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 1.0 + 2.0**-8])
    values = torch.cat([edges, -edges, torch.randn(4000, generator=g) * 10.0 ** torch.randint(-9, 6, (4000,), generator=g)])
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        ours = torch.ops.fusedlora_emulated.convert(values, name)
        assert torch.equal(ours, values.to(dtype).float()), name
    nan = torch.ops.fusedlora_emulated.convert(torch.tensor([float("nan")]), "fp16")
    assert torch.isnan(nan).all()
    codes = torch.arange(256, dtype=torch.uint8)
    decoded, expected = torch.ops.fusedlora_emulated.convert(codes, "fp8"), codes.view(torch.float8_e4m3fn).float()
    assert torch.equal(torch.isnan(decoded), torch.isnan(expected))
    assert torch.equal(decoded[~torch.isnan(decoded)], expected[~torch.isnan(expected)])


def test_tensor_core_primitives_follow_ptx_lane_layouts(harness):
    """cp.async, ldmatrix and mma.sync m16n8k16 as tests/emulation/primitives_kernel.cuh uses them:
    right with PTX's lane layouts, wrong with another lane's rows, poisoned without the wait."""
    g = torch.Generator().manual_seed(11)
    a, bt = torch.randn(16, 16, generator=g).bfloat16(), torch.randn(8, 16, generator=g).bfloat16()
    c = torch.randn(16, 8, generator=g)
    expected = a.double() @ bt.double().t() + c.double()
    tile = torch.ops.fusedlora_emulated.mma_tile
    for schedule, seed in SCHEDULES:
        torch.ops.fusedlora_emulated.set_schedule(schedule, seed)
        assert_close(tile(a, bt, c, 0, False), expected, torch.float32, schedule)
    assert (tile(a, bt, c, 1, False).double() - expected).abs().max() > 0.1  # another lane's rows
    assert torch.isnan(tile(a, bt, c, 0, True)).any()  # read before the copies were waited for


@pytest.mark.parametrize("arch", [80, 90])
def test_nvcc_compiles_the_primitives_to_their_instructions(arch, tmp_path):
    """The PTX behind csrc/device.cuh's mma_m16n8k16, ldmatrix_x4 and cp_async_* assembles (ptxas
    checks it only where a kernel uses it) into HMMA, LDSM and LDGSTS."""
    from fusedlora.inspection import cuda, sass

    source = tmp_path / "primitives.cu"
    source.write_text('#include "primitives_kernel.cuh"\n'
                      "template __global__ void fusedlora::mma_tile_kernel<__nv_bfloat16>(\n"
                      "    const __nv_bfloat16*, const __nv_bfloat16*, const float*, float*, int, bool);\n")
    cubin = tmp_path / "primitives.cubin"
    cuda.nvcc_version()  # points CUDA_HOME at the toolkit
    command = cuda._nvcc_command(arch, source, cubin) + [f"-I{CSRC}", f"-I{EMULATION}"]
    built = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    text, _ = sass.disassemble(cubin.read_bytes())
    opcodes = {".".join((i.opcode, *i.modifiers)) for i in sass.parse(text)}
    assert "HMMA.16816.F32.BF16" in opcodes and any(op.startswith("LDSM.16.M88.4") for op in opcodes), opcodes
    assert any(op.startswith("LDGSTS") for op in opcodes) and any(op.startswith("DEPBAR") for op in opcodes), opcodes


# Each a source mutation of csrc/ (file, text, replacement) that the smoke cases must catch.
MUTANTS = {
    "nibble order": ("common.cuh", "(index & 1) ? (byte & 0xF) : (byte >> 4)", "(index & 1) ? (byte >> 4) : (byte & 0xF)"),
    "int8 scale": ("common.cuh", "(1.0f / 127.0f)", "(1.0f / 128.0f)"),
    "GEMM tail mask": ("gemm.cu", "(n < outs && r < reduce) ? scaled_weight", "(n < outs) ? scaled_weight"),
    "missing block_sync": ("gemm.cu", "wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);\n    }\n    block_sync();",
                           "wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);\n    }"),
    "dropout index": ("lora.cu", "in ? dropped(dropout, to_float(value), m, kk, k)",
                      "in ? dropped(dropout, to_float(value), kk, m, k)"),
    "x's row stride": ("gemm.cu", "left[m * ld_left + r]", "left[m * reduce + r]"),
    "last block sums its own slice": ("small_m.cu", "load_coherent(&partial[(s * rows + m) * columns + n])",
                                      "load_coherent(&partial[(slice * rows + m) * columns + n])"),
    "transposed sum's halves": ("small_m.cu", "const bool upper = part & half;", "const bool upper = !(part & half);"),
    "mma fragment rows": ("small_m_mma.cu", "{upper[2 * j], lower[2 * j], upper[2 * j + 1], lower[2 * j + 1]}",
                          "{upper[2 * j], upper[2 * j + 1], lower[2 * j], lower[2 * j + 1]}"),
    "chunk factor's lane": ("small_m_mma.cu", "warp_shfl_xor(chunk_t_factor[h], t ^ c)",
                            "warp_shfl_xor(chunk_t_factor[h], c)"),
    "ldmatrix lane rows": ("gemm_mma.cu", "(warp / 2) * 32 + (matrix % 2) * 8 + row) * kLd + (matrix / 2) * 8",
                           "(warp / 2) * 32 + (matrix / 2) * 8 + row) * kLd + (matrix % 2) * 8"),
    "grad_x's weight tile not transposed": ("gemm_mma.cu", "ldmatrix_x4<true>(r, right_rows", "ldmatrix_x4<false>(r, right_rows"),
    "g's columns past N copied": ("gemm_mma.cu", "in ? left_bytes : 0u", "left_bytes"),
    "copies not waited for": ("gemm_mma.cu", "store_run<T, FMT>(next, table, after + w_store);\n    cp_async_wait<0>();",
                              "store_run<T, FMT>(next, table, after + w_store);"),
    "workspace rows skipped": ("dequantize.cu", "destination += gridDim.y * ld_out;", "destination += ld_out;"),
    "x copied past its row": ("lora.cu", "x_copy[m * ld_copy + kk] = value;", "x_copy[m * k + kk] = value;"),
}


def _smoke(build_dir: Path, replaced: dict) -> subprocess.CompletedProcess:
    args = [sys.executable, str(Path(cuda_emulation.__file__)), "--build", str(build_dir), "--schedules", "forward",
            "--replace", *(f"{stem}={wrapper}" for stem, wrapper in replaced.items())]
    return subprocess.run(args, capture_output=True, text=True, timeout=900, env={**os.environ, "MAX_JOBS": "1"})


def _mutant(folder: Path, file: str, text: str, replacement: str) -> dict:
    """The mutated file in `folder`, with csrc/'s headers and a wrapper for each kernel file that
    includes it; {stem: wrapper}."""
    source = (CSRC / file).read_text()
    assert source.count(text) == 1, f"the mutation's text is not once in csrc/{file}: update MUTANTS"
    folder.mkdir()
    (folder / file).write_text(source.replace(text, replacement))
    stems = [Path(file).stem] if file.endswith(".cu") else list(WRAPPERS)  # a header: every kernel file
    for header in [*CSRC.glob("*.cuh"), *CSRC.glob("*.h")]:  # found beside the mutant first, so they include it
        if not (folder / header.name).exists():
            shutil.copy(header, folder)
    for stem in stems:
        if not (folder / f"{stem}.cu").exists():
            shutil.copy(CSRC / f"{stem}.cu", folder)
        shutil.copy(WRAPPERS[stem], folder)  # includes "<stem>.cu", found beside it first
    return {stem: folder / f"{stem}.cpp" for stem in stems}


def test_planted_bugs_fail_and_the_source_as_is_passes(harness, tmp_path):
    def build_dir(name):  # a copy of the harness's: only the mutated translation units recompile
        return Path(shutil.copytree(harness, tmp_path / name, ignore=shutil.ignore_patterns("lock")))

    runs = {"control": (build_dir("control"), {})}
    for index, (name, (file, text, replacement)) in enumerate(MUTANTS.items()):
        runs[name] = (build_dir(f"build-{index}"), _mutant(tmp_path / f"mutant-{index}", file, text, replacement))
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # one compile job each
        results = dict(zip(runs, pool.map(lambda run: _smoke(*run), runs.values())))
    control = results.pop("control")
    assert control.returncode == 0 and "all smoke cases passed" in control.stdout, control.stdout + control.stderr[-3000:]
    for name, result in results.items():
        assert result.returncode != cuda_emulation.BUILD_FAILED, f"{name}: the mutant does not build\n{result.stderr[-3000:]}"
    missed = [name for name, result in results.items() if result.returncode == 0]
    assert not missed, f"planted bugs the harness did not catch: {missed}"


def test_the_emulation_header_is_only_reached_through_device_cuh():
    """The kernels use CUDA's primitives through csrc/device.cuh alone (tests/emulation/ replaces exactly those)."""
    assert (EMULATION / "emulated_device.h").is_file()
    for path in sorted(CSRC.glob("*.cu")) + sorted(CSRC.glob("*.cuh")):
        if path.name == "device.cuh":
            continue
        text = path.read_text()
        for primitive in ("__syncthreads", "__shfl", "atomicAdd", "__shared__", "<<<", "nvcuda", "getCurrentCUDAStream"):
            assert primitive not in text, f"csrc/{path.name} uses {primitive} directly: put it behind csrc/device.cuh"
