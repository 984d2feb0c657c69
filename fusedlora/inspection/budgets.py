"""The CI gate on compiled code: bench/budgets.json holds, per GPU architecture and per kernel
(and weight format), the most main-loop instructions per dequantized weight element (per warp
and iteration for kernels that read no weight), the most gathers (global loads of <= 4 bytes)
per element, no spills, and the fewest CTAs per SM. The limits are the figures of the code they
were written from (`python -m fusedlora inspect --write-budgets` sets them to today's figures once
a change improves them, so the gate holds the gain); `targets` lists what the performance issues
must reach.

Every compiled kernel, each autotuning candidate included, must not spill and must fit on an SM.
The counts and the CTAs per SM are limited for the shipped configs (the first candidate of an
autotuned GEMM), and only under the compiler the budgets were measured with (Triton for the
Triton kernels, nvcc for the CUDA C++ ones): another compiler emits other code, so its counts are
reported but not compared. The CUDA LoRA kernels and the dense CUDA small-M kernel have no main
loop that counts (fusedlora/inspection/cuda.py): their resources are limited, not their counts.
"""

import json
import math
from pathlib import Path
from typing import Optional

BUDGETS = Path(__file__).resolve().parents[2] / "bench" / "budgets.json"
TOLERANCE = 0.02  # toolchain noise: a limit is exceeded only by more than this fraction
_WEIGHT_KERNELS = ("lora_forward_kernel", "lora_grad_x_kernel", "lora_small_m_kernel", "lora_gemv_kernel",
                   "dequantize_kernel")
_WORKSPACE_VARIANTS = ("lora_shrink_kernel",)
_MOST = ("instructions_per_element", "scalar_loads_per_element", "loop_instructions", "local_bytes")


def budget_key(kernel: str, fmt: str, regime: Optional[str] = None) -> str:
    """Kernels that read the weight have a budget per format; the LoRA kernels one in all, and one
    more for the variant the workspace `regime` launches (the shrink that also copies x)."""
    key = f"{kernel}/{fmt}" if kernel in _WEIGHT_KERNELS else kernel
    return f"{key}+workspace" if regime == "workspace" and kernel in _WORKSPACE_VARIANTS else key


def measured(report) -> dict:
    """The JSON row of a `KernelReport`: what the budgets limit, and the counts behind them."""
    loop = report.loop
    return dict(kernel=report.kernel, candidate=report.candidate, warps=report.warps, stages=report.stages,
                registers=report.registers, local_bytes=report.local_bytes, shared_bytes=report.shared_bytes,
                ctas_per_sm=report.ctas_per_sm, instructions=report.instructions,
                loop_instructions=loop.instructions, loop_by_class=loop.by_class,
                global_loads_by_width=loop.global_loads_by_width, async_copies_by_width=loop.async_copies_by_width,
                tensor_ops=loop.tensor_ops, wgmma_wait_depth=loop.wgmma_wait_depth,
                weight_elements_per_iteration=report.work.weight_elements,
                instructions_per_element=report.per_element, scalar_loads_per_element=report.scalar_loads_per_element,
                instructions_per_mma=report.per_mma,
                model_seconds=dict(issue=report.time.issue, tensor=report.time.tensor, memory=report.time.memory,
                                   total=report.time.total, bound=report.time.bound))


def load(path: Path = BUDGETS) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"no budget file at {path}: the budgets live in a checkout of the repository")
    return json.loads(path.read_text())


COMPILERS = {"triton": "triton", "cuda": "nvcc"}  # kernel family -> the compiler its counts depend on


def comparable_families(budgets: dict, versions: dict) -> set:
    """The kernel families whose counts, compiled with `versions` ({compiler: version}), may be held
    to `budgets`' limits: those whose limits were measured with the same compiler version."""
    measured_with = budgets.get("measured_with", {})
    return {family for family, compiler in COMPILERS.items()
            if versions.get(compiler) is not None and measured_with.get(family, {}).get(compiler) == versions[compiler]}


def shipped(row: dict) -> bool:
    return row["candidate"] in (None, 0)


def check(rows: list[dict], arch: int, budgets: dict, families: set) -> list[str]:
    """Every way the kernels in `rows` exceed the budgets of sm_`arch` (empty: within them); counts
    are compared for the kernel `families` whose compiler the budgets were measured with."""
    limits = budgets["limits"].get(str(arch), {})
    violations = []
    for row in rows:
        where = f"sm_{arch} {row['key']} ({row['case']}, candidate {row['candidate']})"
        if row["local_bytes"] or row["ctas_per_sm"] < 1:
            violations.append(f"{where}: {row['local_bytes']} bytes of spills, {row['ctas_per_sm']} CTAs per SM")
        if not (row["family"] in families and shipped(row)):
            continue
        limit = limits.get(row["key"])
        if limit is None:
            violations.append(f"sm_{arch} {row['key']}: no budget (add one with --write-budgets)")
            continue
        for name in _MOST:
            if name in limit and row[name] is None:  # a main loop the budget counts is gone (a lost tensor op, say)
                violations.append(f"{where}: no main loop found to count {name} (budget {limit[name]})")
            elif name in limit and row[name] > limit[name] * (1 + TOLERANCE):
                violations.append(f"{where}: {name} {row[name]:.3g} > budget {limit[name]}")
        if row["ctas_per_sm"] < limit.get("min_ctas_per_sm", 1):
            violations.append(f"{where}: {row['ctas_per_sm']} CTAs per SM < budget {limit['min_ctas_per_sm']}")
    return violations


def write(results: dict, path: Path = BUDGETS) -> None:
    """Set the limits of each key inspected in `results` to today's figures (the worst of its rows:
    an improvement lowers them, a deliberate trade raises them), and record, per kernel family
    inspected, the compiler version and commit they were measured with. A count a limit holds but
    today's rows lack (a main loop gone) is kept, so that the gate goes on reporting it."""
    budgets = load(path) if path.is_file() else {"limits": {}, "targets": {}}
    families = set()
    for arch, inspected in results["archs"].items():
        limits = budgets["limits"].setdefault(arch, {})
        todays: dict = {}
        for row in filter(shipped, inspected["kernels"]):
            families.add(row["family"])
            figures = todays.setdefault(row["key"], {"local_bytes": 0})
            counted = {name: row[name] for name in ("instructions_per_element", "scalar_loads_per_element")
                       if row[name] is not None}
            if not counted and row["loop_instructions"]:  # a loop that reads no weight: its length
                counted["loop_instructions"] = row["loop_instructions"]
            for name, value in counted.items():
                figures[name] = max(figures.get(name, 0.0), math.ceil(value * 1000) / 1000)
            figures["min_ctas_per_sm"] = min(figures.get("min_ctas_per_sm", row["ctas_per_sm"]), row["ctas_per_sm"])
        for key, figures in todays.items():
            lost = {name: value for name, value in limits.get(key, {}).items() if name in _MOST and name not in figures}
            limits[key] = {**lost, **figures}
    measured_with = budgets.setdefault("measured_with", {})
    for family in families:
        compiler = COMPILERS[family]
        measured_with[family] = {compiler: results["versions"][compiler], "commit": results["commit"]}
    path.write_text(json.dumps(budgets, indent=1, sort_keys=True) + "\n")
