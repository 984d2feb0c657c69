"""`python -m fusedlora inspect`: the compiled kernels of both backends (Triton and CUDA C++) in
the headline cases, counted from their SASS, and a MODEL of their speed on a GPU this machine may
not have.

    python -m fusedlora inspect [--arch 90 80] [--formats nf4 int8 ...] [--backends triton cuda]
                                [--json PATH] [--check] [--write-budgets]

    python -m fusedlora inspect --arch 90 80 --all-candidates --check   (every tile config)

Prints one row per compiled kernel (registers, spills, shared memory, CTAs per SM, main-loop
instructions per warp and iteration, thread instructions per dequantized weight element, gathers
per element, instructions per MMA, wgmma wait depth), then the MODEL's estimates for the headline
cases against their targets. `--check` exits 1 when a kernel spills, does not fit on an SM, or
exceeds bench/budgets.json (see `fusedlora.inspection.budgets`).
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from ..backends.regimes import REGIMES, large_m_regime
from ..backends.registry import capability_refusal
from ..backends.triton_launch import LibraryGemm
from ..benchmark.cases import LLAMA3_8B, Case
from . import cuda
from .budgets import BUDGETS, COMPILERS, budget_key, check, comparable_families, load, measured, write
from .kernels import DROPOUT, inspect_launch, library_gemm_time, record_case, weight_bytes
from .model import GPUS, bf16_linear_seconds
from .sass import cuobjdump

TRAINING_ROWS = 8192
DECODE_ROWS = (1, 16)
SHAPES = ("up_proj", "q_proj")
FORMATS = ("nf4", "fp4", "int8", "fp8", "dense")
TARGETS = {"training_ratio": 1.10, "decode_copy_fraction": {"up_proj": 0.75, "q_proj": 0.60}}


def headline_cases(formats) -> list[Case]:
    return [Case(shape, m, *LLAMA3_8B[shape], 16, fmt) for fmt in formats for shape in SHAPES
            for m in (TRAINING_ROWS, *DECODE_ROWS)]


def _commit() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def supported_cases(arch: int, formats) -> list[Case]:
    """The headline cases a GPU of sm_`arch` runs (fp8 needs sm_89)."""
    return [case for case in headline_cases(formats) if not capability_refusal((arch // 10, arch % 10), case.fmt)]


def inspect_triton(gpu, cases: list[Case], all_candidates: bool = False) -> dict:
    """{"kernels": [row per distinct compiled kernel], "cases": [MODEL estimate per case]}.

    A training case is estimated in each large-M regime (backend "triton-fused",
    "triton-workspace") and once more as "triton", in the regime the launcher picks for its M.
    An autotuned GEMM is its first candidate, or with `all_candidates` every candidate (the
    model then takes the fastest, as the autotuner would); a cuBLAS GEMM is timed by
    `library_gemm_time`."""
    seen = set()  # specializations: one row per distinct compiled kernel
    kernels, estimates = [], []
    for case in cases:
        for regime in (None,) if case.decode else REGIMES:
            seconds = _triton_seconds(case, gpu, regime, all_candidates, seen, kernels)
            estimates.append({**case_estimate(case, gpu, seconds), "backend": "triton" if regime is None
                              else f"triton-{regime}"})
            if regime == large_m_regime(case.m, case.fmt, (gpu.arch // 10, gpu.arch % 10), True):
                estimates.append({**estimates[-1], "backend": "triton", "regime": regime})
    return {"kernels": kernels, "cases": estimates}


def _triton_seconds(case: Case, gpu, regime, all_candidates: bool, seen: set, kernels: list) -> float:
    """The MODEL's time of `case` in `regime`; each kernel compiled for the first time adds its row
    to `kernels`."""
    seconds, autotuned = 0.0, {}
    for launch in record_case(case, gpu, regime):
        if isinstance(launch, LibraryGemm):
            seconds += library_gemm_time(launch, gpu).total + gpu.launch_seconds
            continue
        if launch.candidate not in (None, 0) and not all_candidates:
            continue
        report = inspect_launch(launch, gpu)
        if report.specialization not in seen:
            seen.add(report.specialization)
            kernels.append(dict(key=budget_key(report.kernel, case.fmt, regime), fmt=case.fmt, case=case.label,
                                family="triton", **measured(report)))
        if launch.candidate is not None:
            autotuned[report.kernel] = min(autotuned.get(report.kernel, float("inf")), report.time.total)
            continue
        seconds += report.time.total + gpu.launch_seconds
    return seconds + sum(autotuned.values()) + len(autotuned) * gpu.launch_seconds


def case_estimate(case: Case, gpu, seconds: float) -> dict:
    """The MODEL's figures of `case` done in `seconds`: its ratio to the bare bf16 GEMMs (training)
    or its fraction of copy bandwidth (decode), with the target."""
    row = dict(case=case.label, shape=case.shape, m=case.m, fmt=case.fmt, model_seconds=seconds)
    if case.decode:
        row["model_copy_fraction"] = weight_bytes(case) / seconds / gpu.copy_bandwidth
        row["target_copy_fraction"] = TARGETS["decode_copy_fraction"][case.shape]
        row["model_speedup_over_bf16_linear"] = bf16_linear_seconds(gpu, case.m, case.n, case.k) / seconds
    else:
        baseline = 2 * bf16_linear_seconds(gpu, case.m, case.n, case.k)  # forward + dgrad
        row["model_bf16_forward_dgrad_seconds"] = baseline
        row["model_ratio_to_bf16"] = seconds / baseline
        row["target_ratio_to_bf16"] = TARGETS["training_ratio"]
    return row


def _cell(value, width: int, decimals: int) -> str:
    return format("-" if value is None else f"{value:.{decimals}f}", f">{width}")


def _print_kernels(rows, arch) -> None:
    print(f"sm_{arch}: compiled kernels (counts from SASS; /elem = thread instructions per dequantized weight "
          "element in the main loop, gather = loads of <= 4 bytes per element, wait = wgmma wait depth; "
          "'-': no main loop counted)")
    print(f"  {'kernel':34s} {'case':36s} {'cand':>4s} {'regs':>4s} {'spill':>5s} {'shared':>7s} {'CTA/SM':>6s} "
          f"{'loop':>5s} {'/elem':>6s} {'gather':>6s} {'/MMA':>6s} {'wait':>4s}")
    for row in rows:
        print(f"  {row['key']:34s} {row['case']:36s} {_cell(row['candidate'], 4, 0)} {row['registers']:4d} "
              f"{row['local_bytes']:5d} {row['shared_bytes']:7d} {row['ctas_per_sm']:6d} {row['loop_instructions']:5d} "
              f"{_cell(row['instructions_per_element'], 6, 1)} {_cell(row['scalar_loads_per_element'], 6, 2)} "
              f"{_cell(row['instructions_per_mma'], 6, 1)} {_cell(row['wgmma_wait_depth'], 4, 0)}")


def _print_cases(rows, arch) -> None:
    gpu = GPUS[arch]
    print(f"\nsm_{arch}: MODEL estimates for {gpu.name} (not measurements; assumptions in "
          f"fusedlora/inspection/model.py), r=16, bf16, dropout {DROPOUT} (training) and 0 (decode)")
    for row in rows:
        backend = f"  {row['backend']:16s} {row['case']:40s}"
        bound = ">=" if row.get("timed_by_bytes") else "  "
        if "model_ratio_to_bf16" in row:
            print(f"{backend} fwd+bwd {bound}{row['model_seconds'] * 1e3:8.3f} ms (model)  "
                  f"{row['model_ratio_to_bf16']:5.2f}x bf16 F.linear fwd+dgrad "
                  f"(target <= {row['target_ratio_to_bf16']:.2f}x)")
        else:
            print(f"{backend} forward {bound}{row['model_seconds'] * 1e3:8.3f} ms (model)  "
                  f"{row['model_copy_fraction']:6.1%} of copy bandwidth (target >= {row['target_copy_fraction']:.0%}), "
                  f"{row['model_speedup_over_bf16_linear']:4.2f}x bf16 F.linear")
    if any(row.get("timed_by_bytes") for row in rows):
        print("  >=: a lower bound; it holds kernels timed by their bytes and FMAs alone, with no main loop to count "
              "(the CUDA LoRA kernels, the dense CUDA small-M kernel: fusedlora/inspection/cuda.py)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fusedlora inspect", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90], choices=sorted(GPUS),
                        help="compute capabilities to compile for (default: 90)")
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=FORMATS)
    parser.add_argument("--backends", nargs="+", default=["triton", "cuda"], choices=["triton", "cuda"],
                        help="the kernel families to inspect (cuda: csrc/ compiled with nvcc; default: both)")
    parser.add_argument("--json", type=Path, help="write the results here (default: bench/results/static/)")
    parser.add_argument("--all-candidates", action="store_true",
                        help="compile every autotuning candidate of the GEMMs (default: the first)")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when a kernel spills, does not fit on an SM, or exceeds bench/budgets.json")
    parser.add_argument("--write-budgets", action="store_true",
                        help="set bench/budgets.json's limits of the kernels inspected to today's figures "
                             "(after an improvement, so that the gate holds it)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    import triton

    results = {"commit": _commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "versions": {"python": platform.python_version(), "torch": torch.__version__,
                            "triton": triton.__version__, "nvcc": cuda.nvcc_version() if "cuda" in args.backends else None,
                            "cuobjdump": cuobjdump()},
               "kind": "static inspection and MODEL estimates, not measurements", "archs": {}}
    for arch in args.arch:
        gpu, cases = GPUS[arch], supported_cases(arch, args.formats)
        parts = []
        if "triton" in args.backends:
            parts.append(inspect_triton(gpu, cases, args.all_candidates))
        if "cuda" in args.backends:
            parts.append(cuda.inspect(gpu, cases, case_estimate))
        inspected = {name: [row for part in parts for row in part[name]] for name in ("kernels", "cases")}
        results["archs"][str(arch)] = {"gpu": asdict(GPUS[arch]), **inspected}
        _print_kernels(inspected["kernels"], arch)
        _print_cases(inspected["cases"], arch)
    path = args.json or Path("bench/results/static") / f"inspect-{results['commit'][:10]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwrote {path}")
    if args.write_budgets:
        write(results)
        print(f"wrote {BUDGETS}")
    if not args.check:
        return 0
    budgets = load()
    families = comparable_families(budgets, results["versions"])
    for family in sorted(set(args.backends) - families):
        compiler = COMPILERS[family]
        print(f"{family}: not the compiler the budgets were measured with ({compiler} {results['versions'][compiler]}, "
              f"budgets: {budgets.get('measured_with', {}).get(compiler)}): spills and fit checked, counts not compared")
    violations = [violation for arch, inspected in results["archs"].items()
                  for violation in check(inspected["kernels"], int(arch), budgets, families)]
    for violation in violations:
        print(f"over budget: {violation}")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
