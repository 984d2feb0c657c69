"""Build and drive the CPU execution harness of the CUDA C++ kernels (tests/emulation/,
docs/design.md §6): csrc/'s kernels and host logic compiled as host C++ with torch's
cpp_extension, the device emulated; every case checked against the float64 oracle.

    python tests/cuda_emulation.py --build DIR [--replace STEM=WRAPPER ...] [--schedules forward shuffled:1]
        builds the harness (optionally with some translation units replaced: the planted-bug test's
        mutants), runs the smoke cases, exits 1 on the first failure, 2 if it does not build (used
        in a subprocess: the harness's ops may be registered once per process).
"""

import argparse
import os
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
CSRC = ROOT / "csrc"
EMULATION = TESTS / "emulation"
NAME = "fusedlora_emulated"
BUILD_FAILED = 2  # main's exit code when the harness does not build (1: a case failed)
WRAPPERS = {stem: EMULATION / f"{stem}.cpp" for stem in ("gemm", "gemm_mma", "dequantize", "small_m", "small_m_mma", "lora")}

sys.path.insert(0, str(TESTS))
from helpers import assert_close, float64_oracle, random_weight  # noqa: E402


def sources(replaced: Optional[dict] = None) -> list[str]:
    """The harness's translation units; `replaced` maps a kernel file's stem to another wrapper."""
    wrappers = {**WRAPPERS, **(replaced or {})}
    return [str(EMULATION / "harness.cpp"), *map(str, wrappers.values()), str(CSRC / "lora_ops.cpp")]


def build(build_dir: Path, replaced: Optional[dict] = None) -> Path:
    """Compile (ninja reuses what has not changed in `build_dir`) and load the harness; its path."""
    from torch.utils.cpp_extension import load

    build_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    # UBSan, fatal: undefined behaviour in a kernel (an overflowing shift, a misaligned vector
    # load, ...) aborts the run instead of passing unnoticed.
    sanitize = ["-fsanitize=undefined", "-fno-sanitize-recover=undefined"]
    load(name=NAME, sources=sources(replaced), extra_include_paths=[str(CSRC), str(EMULATION)],
         extra_cflags=["-std=c++20", "-O1", "-DFUSEDLORA_HOST_EMULATION", *sanitize], extra_ldflags=sanitize[:1],
         build_directory=str(build_dir), is_python_module=False, verbose=False)
    return build_dir / f"{NAME}.so"


@dataclass(frozen=True)
class Case:
    m: int
    k: int
    n: int
    r: int
    fmt: str
    dtype: torch.dtype
    bias: bool = True
    p: float = 0.0
    blocksize: int = 64
    double_quant: bool = True
    x_padding: int = 0  # x is a view of a wider tensor: row stride k + x_padding
    deterministic: bool = False  # dB through per-block partials instead of atomics
    weight_dtype: torch.dtype = torch.float32  # the dense format's stored dtype
    need_dx: bool = True
    lora_dtype: Optional[torch.dtype] = None  # A, B and the bias; None: x's dtype
    regime: str = "fused"  # past the small-M kernels: "workspace" dequantizes W for ATen's matmuls

    @property
    def label(self) -> str:
        return (f"{self.fmt}-{str(self.dtype)[6:]}-{self.m}x{self.k}x{self.n}-r{self.r}"
                f"{'-bias' if self.bias else ''}{f'-p{self.p}' if self.p else ''}"
                f"{'-strided' if self.x_padding else ''}{'-deterministic' if self.deterministic else ''}"
                f"{f'-lora-{str(self.lora_dtype)[6:]}' if self.lora_dtype else ''}"
                f"{'-workspace' if self.regime == 'workspace' else ''}")


def check(case: Case, schedule: str = "forward", seed: int = 0) -> None:
    """Run the emulated forward and backward of `case` under `schedule` and compare y, u, dx, dA and
    dB with the float64 oracle (the shared tolerance table); raises AssertionError."""
    from fusedlora import quantize
    from fusedlora.dropout import keep_mask

    torch.ops.fusedlora_emulated.set_schedule(schedule, seed)
    g = torch.Generator().manual_seed(zlib.crc32(case.label.encode()))
    weight_values = random_weight(case.n, case.k, generator=g)
    if case.fmt == "dense":
        weight_values = weight_values.to(case.weight_dtype)
    weight = quantize(weight_values, case.fmt, case.blocksize, case.double_quant)
    wide = torch.randn(case.m, case.k + case.x_padding, generator=g).to(case.dtype)
    x = wide[:, :case.k]
    lora_dtype = case.lora_dtype or case.dtype
    lora_A = (torch.randn(case.r, case.k, generator=g) / case.k**0.5).to(lora_dtype)
    lora_B = torch.randn(case.n, case.r, generator=g).to(lora_dtype)
    bias = torch.randn(case.n, generator=g).to(lora_dtype) if case.bias else None
    grad_y = torch.randn(case.m, case.n, generator=g).to(case.dtype)
    seed_tensor, scaling = torch.tensor(1234), 1.5
    shape = [case.n, case.k]
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(case.deterministic)
    try:
        ops = torch.ops.fusedlora_emulated
        y, u = ops.forward(x, weight.tensors(), case.fmt, shape, weight.blocksize, lora_A, lora_B, scaling, bias,
                           case.p, seed_tensor, case.regime)
        dx, dA, dB = ops.backward(grad_y, x, u, weight.tensors(), case.fmt, shape, weight.blocksize, lora_A, lora_B,
                                  scaling, case.p, seed_tensor, case.need_dx, case.regime)
    finally:
        torch.use_deterministic_algorithms(previous)
    keep = keep_mask((case.m, case.k), case.p, 1234) if case.p > 0 else None
    y_ref, (dx_ref, dA_ref, dB_ref, _) = float64_oracle(x, weight.dequantize(torch.float64), lora_A, lora_B, scaling,
                                                        bias, keep, case.p, grad_y)
    dropped = x.double() if keep is None else torch.where(keep, x.double() / (1 - case.p), 0.0)
    u_ref = dropped @ lora_A.double().t()
    where = f"{case.label} ({schedule} schedule)"
    assert y.dtype == case.dtype and dA.dtype == dB.dtype == lora_dtype, where
    assert_close(y, y_ref, case.dtype, f"y of {where}")
    assert_close(u, u_ref, u.dtype, f"u of {where}")
    if case.need_dx:
        assert_close(dx, dx_ref, case.dtype, f"dx of {where}")
    else:
        assert dx.numel() == 0, where
    assert_close(dA, dA_ref, case.dtype, f"dA of {where}")
    assert_close(dB, dB_ref, case.dtype, f"dB of {where}")


# Every launcher once or more, on ragged shapes: the small-M kernels (FMAs for M <= 4, tensor cores
# for M <= 16; in one slice of K and in several) and both GEMMs (WMMA for K not a multiple of 64,
# mma.sync otherwise; a 64-row tile and a partial one), dB by atomics and by partials, dropout on
# both LoRA kernels.
SMOKE = [
    Case(3, 72, 80, 8, "nf4", torch.bfloat16, p=0.1),
    Case(70, 72, 136, 16, "nf4", torch.bfloat16, p=0.1),
    Case(33, 96, 72, 12, "int8", torch.float16, bias=False),
    Case(2, 64, 40, 4, "int8", torch.float16),
    Case(40, 80, 40, 8, "fp8", torch.float32, p=0.1, deterministic=True),
    Case(20, 72, 72, 4, "nf4", torch.float16, x_padding=8),  # x a view with row stride 80 (the WMMA GEMM: K % 64)
    Case(2, 832, 300, 8, "nf4", torch.bfloat16, p=0.1),  # FMA small M (K not a multiple of 256), four slices
    Case(12, 512, 136, 8, "nf4", torch.bfloat16, p=0.1),  # small M on tensor cores, in two slices
    Case(70, 128, 136, 16, "nf4", torch.bfloat16, p=0.1),  # the GEMMs on tensor cores: two steps, partial tiles
    Case(40, 128, 136, 8, "nf4", torch.bfloat16, p=0.1, regime="workspace"),  # W dequantized, its rows in 3 trips
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", type=Path, required=True)
    parser.add_argument("--replace", nargs="*", default=[], metavar="STEM=WRAPPER",
                        help="kernel files whose translation unit is another wrapper (a mutant's)")
    parser.add_argument("--schedules", nargs="+", default=["forward"], metavar="ORDER[:SEED]")
    args = parser.parse_args(argv)
    replaced = dict(item.split("=", 1) for item in args.replace)
    try:
        build(args.build, {stem: Path(path) for stem, path in replaced.items()})
    except Exception as error:
        print(f"the harness did not build: {error}", file=sys.stderr)
        return BUILD_FAILED
    for case in SMOKE:
        for schedule in args.schedules:
            order, _, seed = schedule.partition(":")
            try:
                check(case, order, int(seed or 0))
            except Exception as error:  # a mismatch or an emulation error: the harness caught something
                print(f"FAILED {case.label} ({schedule}): {type(error).__name__}: {str(error)[:500]}")
                return 1
    print("all smoke cases passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
