"""The benchmark's outputs: the printed table, the JSON of every raw figure, the plot.

Rates: up to 16 rows (decode) the weight bytes are the cost, so the forward reads as weight
GB/s and a fraction of the measured copy bandwidth; above, forward+backward reads as TFLOP/s
(the LoRA FLOPs counted for every provider but the floor) and a fraction of the measured bf16
matmul rate. `× floor` is a provider's forward+backward time over the floor's (1.00 = as fast
as a bare bf16 F.linear forward plus g·W); `speed-up vs X` is X's time over the provider's. Forward and backward are timed apart and
together; where fwd + bwd and fwd+bwd differ by more than their spreads together, or a phase had
outlier runs, the table says so under the provider's line.
"""

import json
import os
from collections import defaultdict
from typing import Optional

from ..backends.regimes import REGIMES
from .cases import Case

PEERS = ("reference", "peft-bnb", "peft-dense")
# The GPU backends with a large-M regime forced: what settles the regime thresholds, not what a
# user gets, so the summary leaves them to the table.
FORCED_REGIMES = tuple(f"fusedlora-{backend}-{regime}" for backend in ("triton", "cuda") for regime in REGIMES)


def flops(case: dict, provider: str) -> dict:
    """Useful FLOPs of forward, backward and both, for one provider on one case."""
    m, k, n, r = case["m"], case["k"], case["n"], case["rank"]
    base = 2 * m * n * k
    if provider == "floor":
        return {"forward": base, "backward": base, "forward_backward": 2 * base}
    forward = base + 2 * m * r * (k + n)
    backward = base + 2 * m * r * (2 * n + 2 * k)  # dx, du, dB, dA and dx's LoRA term
    return {"forward": forward, "backward": backward, "forward_backward": forward + backward}


def _group(results: list) -> dict:
    cases = defaultdict(dict)
    for result in results:
        cases[tuple(sorted(result["case"].items()))][result["provider"]] = result
    return cases


def derived(results: list, ceilings: dict) -> list:
    """The raw results with rates, fractions of the ceilings and ratios to the floor and the peers."""
    rows = []
    for providers in _group(results).values():
        floor = providers.get("floor", {})
        for name, result in providers.items():
            row = dict(result)
            if result["status"] == "ok":
                case = result["case"]
                work = flops(case, name)
                row["tflop_per_s"] = work["forward_backward"] / (result["forward_backward_ms"] * 1e-3) / 1e12
                row["fraction_of_matmul"] = row["tflop_per_s"] / ceilings["bf16_matmul_tflop_per_s"]
                row["weight_gb_per_s"] = result["weight_bytes"] / (result["forward_ms"] * 1e-3) / 1e9
                row["fraction_of_copy"] = row["weight_gb_per_s"] / ceilings["copy_gb_per_s"]
                if floor.get("status") == "ok":
                    row["times_floor"] = result["forward_backward_ms"] / floor["forward_backward_ms"]
                row["speedup_vs"] = {peer: providers[peer]["forward_backward_ms"] / result["forward_backward_ms"]
                                     for peer in PEERS if peer != name and providers.get(peer, {}).get("status") == "ok"}
                if not Case(**case).decode:  # decode times its forward without autograd: not the same forward
                    row["phase_gap_ms"] = result["forward_ms"] + result["backward_ms"] - result["forward_backward_ms"]
                    row["phases_agree"] = abs(row["phase_gap_ms"]) <= sum(result["spread_ms"].values())
            rows.append(row)
    return rows


def table(rows: list, clock_label: str, ceilings: dict) -> str:
    """A plain-text table, one block per case."""
    layouts = ceilings.get("bf16_matmul_tflop_per_s_by_layout", {})
    lines = [f"timing: {clock_label}; ceilings measured here: copy {ceilings['copy_gb_per_s']:.0f} GB/s, "
             f"bf16 matmul {ceilings['bf16_matmul_tflop_per_s']:.3g} TFLOP/s"
             + (" (the faster layout of " + ", ".join(f"{name} {rate:.3g}" for name, rate in layouts.items()) + ")"
                if layouts else "")]
    for providers in _group(rows).values():
        case = Case(**next(iter(providers.values()))["case"])
        rate = "wGB/s %copy" if case.decode else "TFLOP/s %mm"
        lines += ["", case.label,
                  f"  {'provider':26s} {'fwd ms':>9s} {'bwd ms':>9s} {'f+b ms':>9s} {'±':>6s} {rate:>13s} "
                  f"{'×floor':>7s} {'vs ref':>7s} {'vs bnb':>7s} {'saved MB':>9s} {'peak MB':>8s}"]
        for name, row in providers.items():
            if row["status"] != "ok":
                lines.append(f"  {name:26s} {row['status']}")
                continue
            value, fraction = ((row["weight_gb_per_s"], row["fraction_of_copy"]) if case.decode
                               else (row["tflop_per_s"], row["fraction_of_matmul"]))
            versus = row.get("speedup_vs", {})
            peak = "" if row["peak_bytes"] is None else f"{row['peak_bytes'] / 2**20:8.1f}"
            lines.append(
                f"  {name:26s} {row['forward_ms']:9.3f} {row['backward_ms']:9.3f} {row['forward_backward_ms']:9.3f} "
                f"{row['spread_ms']['forward_backward']:6.3f} {value:7.3g} {100 * fraction:4.0f}% "
                f"{_ratio(row.get('times_floor'))} {_ratio(versus.get('reference'))} {_ratio(versus.get('peft-bnb'))} "
                f"{row['saved_bytes'] / 2**20:9.2f} {peak}")
            lines += _timing_notes(row)
    return "\n".join(lines)


def _timing_notes(row: dict) -> list:
    notes = []
    if not row.get("phases_agree", True):
        notes.append(f"    fwd + bwd - f+b = {row['phase_gap_ms']:+.3f} ms, more than the three spreads together "
                     f"({sum(row['spread_ms'].values()):.3f} ms)")
    if row.get("outliers"):
        runs = ", ".join(f"{phase} {count}" for phase, count in row["outliers"].items())
        notes.append(f"    outlier runs (beyond Q3 + 3 IQR; the median is the figure): {runs}")
    return notes


def _ratio(value) -> str:
    return f"{value:7.2f}" if value is not None else f"{'-':>7s}"


def write_json(path, meta: dict, ceilings: dict, rows: list, model: Optional[dict] = None) -> None:
    """Write the results (and the cost model's estimates, when given) to `path` whole or not at
    all (a run may be stopped while it writes)."""
    partial = f"{path}.partial"
    recorded = {"meta": meta, "ceilings": ceilings, "results": rows, **({"model": model} if model else {})}
    with open(partial, "w") as handle:
        json.dump(recorded, handle, indent=1)
    os.replace(partial, path)


def plot(path, rows: list) -> bool:
    """Speed relative to the floor (floor time / provider time, forward+backward) by M, one panel
    per shape and format at the smallest rank. Returns False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    ok = [row for row in rows if row["status"] == "ok" and "times_floor" in row]
    if not ok:
        return False
    smallest_rank = min(row["case"]["rank"] for row in ok)
    panels = sorted({(row["case"]["shape"], row["case"]["fmt"]) for row in ok if row["case"]["rank"] == smallest_rank})
    figure, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for axis, (shape, fmt) in zip(axes[0], panels):
        lines = defaultdict(list)
        for row in ok:
            case = row["case"]
            if (case["shape"], case["fmt"], case["rank"]) == (shape, fmt, smallest_rank):
                lines[row["provider"]].append((case["m"], 1.0 / row["times_floor"]))
        for provider, points in sorted(lines.items()):
            points.sort()
            axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=provider)
        axis.set_xscale("log", base=2)
        axis.axhline(1.0, color="gray", linewidth=0.8)
        axis.set_title(f"{shape} {fmt} r={smallest_rank}", fontsize=9)
        axis.set_xlabel("M (rows)")
        axis.set_ylabel("speed vs bf16 F.linear (fwd+bwd)")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def summary(rows: list, ceilings: dict) -> str:
    """The headline figures (the targets of the GPU check): training at the largest M with nf4
    against the floor and the peers, decode weight bandwidth, and saved bytes against x + u; each
    case by fusedlora's fastest GPU backend as dispatched (no forced regime), or by its reference
    backend (the CPU path) where no GPU backend could run the case; a GPU backend that ran and
    failed is shown failing. Where the cost model's estimate was recorded beside a measured row
    (`model_ms`: forward for decode, forward+backward for training), it is shown with the
    measured/model ratio."""
    ok = [row for row in rows if row["status"] == "ok"]
    if not ok:
        return "summary: no case was measured"
    largest = max(row["case"]["m"] for row in ok)
    lines = ["summary (fusedlora's fastest backend per case; model: the cost model's estimate, not a measurement)",
             f"  {'case':44s} {'backend':17s} {'f+b ms':>8s} {'×floor':>7s} {'vs ref':>7s} {'vs bnb':>7s} "
             f"{'wGB/s':>7s} {'%copy':>6s} {'saved/(x+u)':>11s} {'model ms':>9s} {'meas/model':>10s}"]
    best = {}
    for providers in _group(rows).values():
        backends = [row for name, row in providers.items() if name.startswith("fusedlora-")
                    and name not in FORCED_REGIMES and not row["status"].startswith("unavailable")]
        candidates = backends or [row for name, row in providers.items() if name == "reference"]
        ran = [row for row in candidates if row["status"] == "ok"]
        if candidates:
            best[tuple(sorted(candidates[0]["case"].items()))] = (min(ran, key=lambda r: r["forward_backward_ms"])
                                                                  if ran else candidates[0])
    for row in sorted(best.values(), key=lambda r: (r["case"]["m"] != largest, r["case"]["m"], r["case"]["shape"])):
        case = Case(**row["case"])
        if not (case.headline_training(largest) or case.headline_decode):
            continue
        if row["status"] != "ok":
            lines.append(f"  {case.label:44s} {row['provider']:17s} {row['status']}")
            continue
        activations = case.m * (case.k + case.rank) * 2  # x and u in bf16
        versus = row.get("speedup_vs", {})
        model = row.get("model_ms")
        lines.append(f"  {case.label:44s} {row['provider']:17s} {row['forward_backward_ms']:8.3f} "
                     f"{_ratio(row.get('times_floor'))} {_ratio(versus.get('reference'))} "
                     f"{_ratio(versus.get('peft-bnb'))} {row['weight_gb_per_s']:7.0f} {100 * row['fraction_of_copy']:5.0f}% "
                     f"{row['saved_bytes'] / activations:11.3f} "
                     + (f"{model:9.3f} {row['measured_over_model']:10.2f}" if model else f"{'-':>9s} {'-':>10s}"))
    if len(lines) == 2:
        lines.append("  (no fusedlora case at the headline sizes was measured)")
    return "\n".join(lines)
