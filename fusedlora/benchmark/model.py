"""The cost model beside the benchmark (fusedlora.inspection: the compiled kernels' SASS counted,
then an analytic MODEL; its figures are estimates, never measurements).

- A run on a CPU prints what the headline cases are expected to take on an H200, so that a user
  without a GPU learns what the package should do there, and why (`python -m fusedlora inspect`
  shows the per-kernel counts behind it).
- A run on a GPU the model describes gets the model's figure beside each measured headline figure
  of fusedlora's backends (`attach`), so the model's error is known (bench/gpu_check.sh).
"""

import importlib.util
import os
from typing import Optional

from .cases import LLAMA3_8B, Case

CPU_PREVIEW_ARCH = 90  # the GPU a CPU run describes: H200


def unavailable() -> Optional[str]:
    """Why the model cannot run in this process, or None."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "TRITON_INTERPRET=1 is set (interpreted kernels cannot be compiled); unset it to see the model"
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    return None


def estimates(cases: list[Case], arch: int, backends=("triton",)) -> list[dict]:
    """The MODEL's estimate of each of `cases` (Llama-3-8B shapes) on sm_`arch`, per backend:
    rows of fusedlora.inspection.cli.case_estimate with "backend"."""
    from ..inspection import cuda
    from ..inspection.cli import case_estimate, inspect_triton
    from ..inspection.model import GPUS

    gpu = GPUS[arch]
    rows = []
    if "triton" in backends:
        rows += inspect_triton(gpu, cases)["cases"]
    if "cuda" in backends:
        rows += cuda.inspect(gpu, cases, case_estimate)["cases"]
    return rows


def headline(rows: list[dict]) -> list[Case]:
    """The measured headline cases (summary's) of fusedlora's backends that the model can describe."""
    largest = max((row["case"]["m"] for row in rows if row["status"] == "ok"), default=0)
    cases = {Case(**row["case"]) for row in rows
             if row["provider"].startswith("fusedlora-") and row["status"] == "ok"
             and LLAMA3_8B.get(row["case"]["shape"]) == (row["case"]["k"], row["case"]["n"])}
    return sorted((c for c in cases if c.headline_training(largest) or c.headline_decode),
                  key=lambda c: (c.m, c.shape, c.fmt, c.rank))


def attach(rows: list[dict], model: list[dict]) -> None:
    """Set `model_ms` (forward for decode, forward+backward for training) and `measured_over_model`
    on each measured fusedlora-<backend> row that `model` estimates."""
    by_case = {(f"fusedlora-{estimate['backend']}", estimate["case"]): estimate for estimate in model}
    for row in rows:
        estimate = by_case.get((row["provider"], Case(**row["case"]).label))
        if estimate is None or row["status"] != "ok":
            continue
        measured = row["forward_ms"] if Case(**row["case"]).decode else row["forward_backward_ms"]
        row["model_ms"] = estimate["model_seconds"] * 1e3
        row["measured_over_model"] = measured / row["model_ms"]


def preview(model: list[dict], gpu_name: str) -> str:
    """The CPU run's lines: the MODEL's figures for the headline GPU cases, against the targets."""
    lines = [f"MODEL estimates for {gpu_name}, from this commit's compiled kernels (not measurements; "
             "per-kernel counts: python -m fusedlora inspect)"]
    for row in model:
        if "model_ratio_to_bf16" in row:
            figure = (f"fwd+bwd {row['model_seconds'] * 1e3:7.3f} ms, {row['model_ratio_to_bf16']:.2f}x the bf16 "
                      f"F.linear fwd+dgrad (target <= {row['target_ratio_to_bf16']:.2f}x)")
        else:
            figure = (f"forward {row['model_seconds'] * 1e3:7.3f} ms, {row['model_copy_fraction']:.1%} of copy "
                      f"bandwidth (target >= {row['target_copy_fraction']:.0%})")
        lines.append(f"  {row['backend']:16s} {row['case']:40s} {figure}")
    return "\n".join(lines)
