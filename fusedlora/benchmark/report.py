"""The benchmark's outputs: the printed table, the JSON of every raw figure, the plot.

Rates: up to 16 rows (decode) the weight bytes are the cost, so the forward reads as weight
GB/s and a fraction of the measured copy bandwidth; above, forward+backward reads as TFLOP/s
(the LoRA FLOPs counted for every provider but the floor) and a fraction of the measured bf16
matmul rate. `× floor` is a provider's forward+backward time over the floor's (1.00 = as fast
as a bare bf16 F.linear forward plus g·W); `speed-up vs X` is X's time over the provider's.
"""

import json
import os
from collections import defaultdict

from .cases import Case

PEERS = ("reference", "peft-bnb", "peft-dense")


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
            rows.append(row)
    return rows


def table(rows: list, clock_label: str, ceilings: dict) -> str:
    """A plain-text table, one block per case."""
    lines = [f"timing: {clock_label}; ceilings measured here: copy {ceilings['copy_gb_per_s']:.0f} GB/s, "
             f"bf16 matmul {ceilings['bf16_matmul_tflop_per_s']:.3g} TFLOP/s"]
    for providers in _group(rows).values():
        case = Case(**next(iter(providers.values()))["case"])
        rate = "wGB/s %copy" if case.decode else "TFLOP/s %mm"
        lines += ["", case.label,
                  f"  {'provider':18s} {'fwd ms':>9s} {'bwd ms':>9s} {'f+b ms':>9s} {'±':>6s} {rate:>13s} "
                  f"{'×floor':>7s} {'vs ref':>7s} {'vs bnb':>7s} {'saved MB':>9s} {'peak MB':>8s}"]
        for name, row in providers.items():
            if row["status"] != "ok":
                lines.append(f"  {name:18s} {row['status']}")
                continue
            value, fraction = ((row["weight_gb_per_s"], row["fraction_of_copy"]) if case.decode
                               else (row["tflop_per_s"], row["fraction_of_matmul"]))
            versus = row.get("speedup_vs", {})
            peak = "" if row["peak_bytes"] is None else f"{row['peak_bytes'] / 2**20:8.1f}"
            lines.append(
                f"  {name:18s} {row['forward_ms']:9.3f} {row['backward_ms']:9.3f} {row['forward_backward_ms']:9.3f} "
                f"{row['spread_ms']['forward_backward']:6.3f} {value:7.3g} {100 * fraction:4.0f}% "
                f"{_ratio(row.get('times_floor'))} {_ratio(versus.get('reference'))} {_ratio(versus.get('peft-bnb'))} "
                f"{row['saved_bytes'] / 2**20:9.2f} {peak}")
    return "\n".join(lines)


def _ratio(value) -> str:
    return f"{value:7.2f}" if value is not None else f"{'-':>7s}"


def write_json(path, meta: dict, ceilings: dict, rows: list) -> None:
    """Write the results to `path` whole or not at all (a run may be stopped while it writes)."""
    partial = f"{path}.partial"
    with open(partial, "w") as handle:
        json.dump({"meta": meta, "ceilings": ceilings, "results": rows}, handle, indent=1)
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
    against the floor and the peers, decode weight bandwidth, and saved bytes against x + u."""
    ok = [row for row in rows if row["status"] == "ok"]
    if not ok:
        return "summary: no case was measured"
    fused = [row for row in ok if row["provider"].startswith("fusedlora-")]
    largest = max(row["case"]["m"] for row in ok)
    lines = ["summary (fusedlora's fastest backend per case)",
             f"  {'case':44s} {'f+b ms':>8s} {'×floor':>7s} {'vs ref':>7s} {'vs bnb':>7s} {'wGB/s':>7s} {'%copy':>6s} "
             f"{'saved/(x+u)':>11s}"]
    best = {}
    for row in fused:
        key = tuple(sorted(row["case"].items()))
        if key not in best or row["forward_backward_ms"] < best[key]["forward_backward_ms"]:
            best[key] = row
    for row in sorted(best.values(), key=lambda r: (r["case"]["m"] != largest, r["case"]["m"], r["case"]["shape"])):
        case = Case(**row["case"])
        if not (case.m == largest and case.fmt == "nf4") and not (case.decode and case.fmt in ("nf4", "int8")):
            continue
        activations = case.m * (case.k + case.rank) * 2  # x and u in bf16
        versus = row.get("speedup_vs", {})
        lines.append(f"  {case.label:44s} {row['forward_backward_ms']:8.3f} {_ratio(row.get('times_floor'))} "
                     f"{_ratio(versus.get('reference'))} {_ratio(versus.get('peft-bnb'))} "
                     f"{row['weight_gb_per_s']:7.0f} {100 * row['fraction_of_copy']:5.0f}% "
                     f"{row['saved_bytes'] / activations:11.3f}")
    if len(lines) == 2:
        lines.append("  (no fusedlora case at the headline sizes was measured)")
    return "\n".join(lines)
