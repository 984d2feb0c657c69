"""Compile the Triton kernels for a GPU on a machine without one (Triton's ahead-of-time path)
and read the registers and spills that ptxas reports.

    python -m fusedlora.kernels.aot [--arch 90] [--all-candidates] [--check]

One row per kernel variant: every weight format (fp8 from sm_89), bf16 activations, fp32
adapters, the skinny kernels' shipped configs and the first autotuning candidate of each GEMM
(`--all-candidates`: every one). Pointers, strides and N, K get Triton's runtime alignment hint
(divisible by 16), as a launch on Llama-style shapes would. `--check` exits 1 if a variant
fails to compile, spills or needs more shared memory than a block may have. Run it without
TRITON_INTERPRET (the interpreter cannot compile). TRITON_PTXAS_PATH chooses the ptxas, as it
does for Triton itself.
"""

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from fusedlora.contract import FORMAT_IDS

from . import configs
from .backward import lora_grad_a_kernel, lora_grad_u_kernel, lora_grad_x_kernel
from .forward import lora_forward_kernel, lora_shrink_kernel, lora_small_m_kernel

# name: (FMT, the types of the weight's six pointers in `WeightArgs.pointers` order; None: the
# format has no such tensor and the kernel sees the constant None, as a launch passes it).
_WEIGHTS = {
    "nf4": (FORMAT_IDS["nf4"], ("*u8", "*u8", "*fp32", "*fp32", "*fp32", "*fp32")),
    "nf4-plain": (FORMAT_IDS["nf4"], ("*u8", "*fp32", "*fp32", None, None, None)),
    "fp4": (FORMAT_IDS["fp4"], ("*u8", "*u8", "*fp32", "*fp32", "*fp32", "*fp32")),
    "int8": (FORMAT_IDS["int8"], ("*i8", "*fp32", None, None, None, None)),
    "fp8": (FORMAT_IDS["fp8"], ("*fp8e4nv", "*fp32", None, None, None, None)),
    "dense": (FORMAT_IDS["dense"], ("*bf16", None, None, None, None, None)),
}
_WEIGHT_PARAMS = ("w_ptr", "scale_ptr", "code_ptr", "nested_absmax_ptr", "nested_code_ptr", "nested_offset_ptr")
_POINTERS = {"x_ptr": "*bf16", "y_ptr": "*bf16", "bias_ptr": "*bf16", "g_ptr": "*bf16", "dx_ptr": "*bf16",
             "u_ptr": "*fp32", "a_ptr": "*fp32", "b_ptr": "*fp32", "du_ptr": "*fp32", "db_ptr": "*fp32",
             "da_ptr": "*fp32"}
# The most shared memory one block may use, by compute capability (CUDA's per-architecture limits).
SHARED_MEMORY_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
_SCALARS = {"scaling": "fp32", "keep_scale": "fp32", "seed": "i64", "threshold": "i64"}
_ALIGNED_INTS = re.compile(r"^(N|K|stride_\w+)$")
_BF16_DOTS = dict(X_DOT=tl.bfloat16, X_PRECISION="tf32", LORA_DOT=tl.bfloat16, LORA_PRECISION="tf32", BLOCK_R=16)


@dataclass(frozen=True)
class Variant:
    name: str
    kernel: object
    constexprs: dict
    types: dict
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class Report:
    name: str
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    tensor_cores: str


def variants(arch: int, all_candidates: bool = False) -> list[Variant]:
    """The kernel variants to compile for sm_`arch`."""
    chosen = []
    for fmt, (fmt_id, pointer_types) in _WEIGHTS.items():
        if fmt == "fp8" and arch < 89:
            continue
        four_bit = configs.is_four_bit(fmt_id)
        gemm = configs.gemm_candidates((arch // 10, arch % 10), four_bit)
        absent = {param: None for param, kind in zip(_WEIGHT_PARAMS, pointer_types) if kind is None}
        weight = dict(FMT=fmt_id, NESTED=pointer_types[3] is not None, BLOCKSIZE=64 if four_bit else 1,
                      K_ALIGNED=True, **absent)
        types = {**_POINTERS, **dict(zip(_WEIGHT_PARAMS, pointer_types))}
        for index, candidate in enumerate(gemm if all_candidates else gemm[:1]):
            tiles = dict(candidate.kwargs)
            common = dict(**weight, **_BF16_DOTS, **tiles)
            chosen.append(Variant(f"forward/{fmt}/{index}", lora_forward_kernel,
                                  dict(common, HAS_LORA=True), types,
                                  candidate.num_warps, candidate.num_stages))
            chosen.append(Variant(f"grad_x/{fmt}/{index}", lora_grad_x_kernel,
                                  dict(common, HAS_LORA=True, HAS_DROPOUT=True), types,
                                  candidate.num_warps, candidate.num_stages))
        small_m, _ = configs.small_m_config(4096, 4096, 132, four_bit)
        chosen.append(Variant(f"small_m/{fmt}", lora_small_m_kernel,
                              dict(weight, **_BF16_DOTS, **small_m.meta, HAS_LORA=True,
                                   HAS_DROPOUT=True, SPLIT_K=4, BLOCK_M=16),
                              types, small_m.num_warps, small_m.num_stages))
    lora = dict(LORA_DOT=tl.bfloat16, LORA_PRECISION="tf32", BLOCK_R=16)
    for name, kernel, config, extra in [
        ("shrink", lora_shrink_kernel, configs.shrink_config(8192, 16), dict(HAS_DROPOUT=True)),
        ("grad_u", lora_grad_u_kernel, configs.grad_u_config(8192), dict(ATOMIC_DB=True)),
        ("grad_a", lora_grad_a_kernel, configs.grad_a_config(8192, 4096, 132)[0], dict(HAS_DROPOUT=True, SPLIT_M=4)),
    ]:
        chosen.append(Variant(name, kernel, dict(lora, **extra, **config.meta), _POINTERS,
                              config.num_warps, config.num_stages))
    return chosen


def compile_variant(variant: Variant, arch: int):
    """The compiled kernel of `variant` for sm_`arch` (sm_90 builds sm_90a, as Triton does)."""
    params = list(inspect.signature(variant.kernel.fn).parameters)
    signature = {p: "constexpr" if p in variant.constexprs else variant.types.get(p) or _SCALARS.get(p, "i32")
                 for p in params}
    aligned = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params)
               if signature[p].startswith("*") or (signature[p] == "i32" and _ALIGNED_INTS.match(p))}
    source = ASTSource(variant.kernel, signature, variant.constexprs, aligned)
    options = {"num_warps": variant.num_warps, "num_stages": variant.num_stages}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def resource_report(name: str, compiled) -> Report:
    """Registers and spills from `ptxas -v` on the kernel's PTX, with the ptxas that Triton compiled
    it with (its bundled one, or TRITON_PTXAS_PATH's: the PTX's version is the one that ptxas reads)."""
    ptx = compiled.asm["ptx"]
    target = re.search(r"\.target\s+(sm_(\d+)\w*)", ptx)
    ptxas = get_ptxas(int(target.group(2))).path
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as handle:
        handle.write(ptx)
    try:
        log = subprocess.run([ptxas, f"-arch={target.group(1)}", "-v", handle.name, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(handle.name)
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    stores, loads = map(int, re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups())
    tensor_cores = "wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else "none"
    return Report(name, registers, stores, loads, compiled.metadata.shared, tensor_cores)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedlora.kernels.aot", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability as an integer (80, 89, 90)")
    parser.add_argument("--all-candidates", action="store_true", help="compile every GEMM autotuning candidate")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 on a compile failure, a spill or more shared memory than a block may use")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    failures = 0
    print(f"{'kernel':24s} {'regs':>5s} {'spill st':>9s} {'spill ld':>9s} {'shared':>8s}  tensor cores   (sm_{args.arch})")
    for variant in variants(args.arch, args.all_candidates):
        try:
            report = resource_report(variant.name, compile_variant(variant, args.arch))
        except Exception as err:  # a compile error is a result to report, not a crash
            failures += 1
            print(f"{variant.name:24s} FAILED: {str(err).splitlines()[0][:200]}")
            continue
        too_much_shared = report.shared_bytes > SHARED_MEMORY_LIMIT.get(args.arch, SHARED_MEMORY_LIMIT[80])
        failures += bool(report.spill_stores or report.spill_loads or too_much_shared)
        print(f"{report.name:24s} {report.registers:5d} {report.spill_stores:9d} {report.spill_loads:9d} "
              f"{report.shared_bytes:8d}  {report.tensor_cores}" + ("  over the shared-memory limit" * too_much_shared))
    return 1 if args.check and failures else 0


if __name__ == "__main__":
    sys.exit(main())
