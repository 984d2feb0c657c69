"""`python -m fusedlora bench`: measure, print the table, write JSON + PNG; with the cost model's
estimates beside (a MODEL, see fusedlora/benchmark/model.py)."""

import argparse
import datetime
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..checks import check_probability
from . import cases as case_lists
from . import model as cost_model
from .providers import providers as all_providers
from .report import derived, plot, summary, table, write_json
from .runner import CaseRunner
from .timing import Clock, ceilings


def _commit() -> str:
    """The source commit: git where the source is a checkout, else $FUSEDLORA_COMMIT (set by
    bench/gpu_check.sh on machines that receive the tree without its .git)."""
    here = Path(__file__).resolve().parent
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("FUSEDLORA_COMMIT", "unknown")


def _versions() -> dict:
    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for module in ("triton", "peft", "bitsandbytes", "transformers"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            versions[module] = None
    return versions


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fusedlora bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a small subset (a few shapes, M values, nf4 and dense)")
    parser.add_argument("--shapes", help="comma-separated: q_proj,kv_proj,up_proj,down_proj,tiny,tiny_wide or KxN")
    parser.add_argument("--formats", help="comma-separated formats (nf4,int8,fp8,dense)")
    parser.add_argument("--providers", help="comma-separated providers (default: all)")
    parser.add_argument("--rows", help="comma-separated M values")
    parser.add_argument("--ranks", help="comma-separated LoRA ranks")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    parser.add_argument("--dropout", type=float, default=0.0,
                        help="the adapters' dropout probability while timed (default 0; checks run without)")
    parser.add_argument("--reps", type=int, default=20, help="timed runs per figure (>= 20 for reported figures)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--budget", type=float, help="seconds: start no new case after this (headline cases run first)")
    parser.add_argument("--out", default="bench/results", help="folder for the JSON and the PNG")
    parser.add_argument("--summarize", metavar="JSON", help="print the headline summary of an earlier run and exit")
    parser.add_argument("--model", action="store_true",
                        help="with --summarize of a GPU run: put the cost model's estimate beside each measured "
                             "headline figure (written into the JSON)")
    parser.add_argument("--no-model", action="store_true",
                        help="a CPU run: do not print the cost model's estimates for the headline GPU cases")
    return parser


def _cases(args, gpu: bool) -> list:
    chosen = case_lists.default_cases(gpu, args.quick)
    if not (args.shapes or args.formats or args.rows or args.ranks):
        return chosen
    shapes = case_lists.parse_shapes(args.shapes) if args.shapes else {c.shape: (c.k, c.n) for c in chosen}
    formats = args.formats.split(",") if args.formats else sorted({c.fmt for c in chosen})
    unknown = set(formats) - set(case_lists.FORMATS)
    if unknown:
        raise SystemExit(f"--formats: unknown {sorted(unknown)}; choose from {case_lists.FORMATS}")
    rows = [int(v) for v in args.rows.split(",")] if args.rows else sorted({c.m for c in chosen})
    ranks = [int(v) for v in args.ranks.split(",")] if args.ranks else sorted({c.rank for c in chosen})
    return case_lists.order_cases(case_lists.build_cases(shapes, rows, ranks, formats))


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.model and not args.summarize:
        raise SystemExit("--model goes with --summarize JSON (a GPU run's results)")
    try:
        check_probability("--dropout", args.dropout)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    if args.summarize:
        return _summarize(Path(args.summarize), args.model)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    chosen = _cases(args, device.type == "cuda")
    providers = all_providers(args.providers.split(",") if args.providers else None)
    clock = Clock(device, warmup=args.warmup, reps=args.reps)
    started = time.monotonic()
    measured_ceilings = ceilings(clock)
    runner = CaseRunner(clock, providers, args.dropout)
    meta = {
        "commit": _commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})",
        "capability": "%d.%d" % capability if capability else None,
        "versions": _versions(),
        "timing": clock.label,
        "dropout": args.dropout,
        "argv": argv if argv is not None else [],
        "complete": False,  # until the last case: a file left by a run stopped from outside says so
        "cases_total": len(chosen),
        "cases_done": 0,
        "cases_skipped_by_budget": 0,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench-{datetime.datetime.now():%Y%m%d-%H%M%S}-{device.type}"
    results, skipped = [], 0
    for index, case in enumerate(bar := tqdm(chosen, desc="benchmark", unit="case")):
        if args.budget is not None and time.monotonic() - started > args.budget:
            skipped = len(chosen) - index
            break
        bar.set_postfix_str(case.label)
        results += [m.to_json() for m in runner.run(case)]
        meta["cases_done"] = index + 1
        # Written after every case, so that a run stopped from outside keeps what it measured.
        write_json(stem.with_suffix(".json"), meta, measured_ceilings, derived(results, measured_ceilings))
    meta["cases_skipped_by_budget"] = skipped
    meta["complete"] = True
    rows = derived(results, measured_ceilings)
    write_json(stem.with_suffix(".json"), meta, measured_ceilings, rows)
    plotted = plot(stem.with_suffix(".png"), rows)
    print(table(rows, clock.label, measured_ceilings))
    print("\n" + summary(rows, measured_ceilings))
    if device.type == "cpu" and not args.no_model:  # after the measurements are written and printed
        model = _cpu_preview()
        write_json(stem.with_suffix(".json"), meta, measured_ceilings, rows, model)
        print("\n" + (cost_model.preview(model["estimates"], model["gpu"]) if "estimates" in model
                      else f"model: {model['unavailable']}"))
    print(f"\n{meta['device']}, commit {meta['commit'][:12]}; wrote {stem}.json"
          + (f" and {stem}.png" if plotted else " (no plot: matplotlib missing or nothing to plot)")
          + (f"; {skipped} cases left out by --budget" if skipped else ""))
    return 0


def _cpu_preview() -> dict:
    """The MODEL's estimates of the headline GPU cases on an H200 (the Triton backend), or why not."""
    from ..inspection.cli import supported_cases
    from ..inspection.model import GPUS

    reason = cost_model.unavailable()
    if reason:
        return {"unavailable": reason}
    arch = cost_model.CPU_PREVIEW_ARCH
    try:
        estimates = cost_model.estimates(supported_cases(arch, ["nf4"]), arch)
    except Exception as error:  # the measurements stand without the model
        return {"unavailable": f"the model failed: {type(error).__name__}: {str(error)[:300]}"}
    return {"arch": arch, "gpu": GPUS[arch].name, "estimates": estimates}


def _summarize(path: Path, with_model: bool) -> int:
    """Print an earlier run's summary; with `with_model`, first record the cost model's estimate
    beside each measured headline figure of a GPU run the model describes (rewriting `path`)."""
    from ..inspection.model import GPUS

    try:
        recorded = json.loads(path.read_text())
        meta = recorded["meta"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"--summarize {path}: not a benchmark result this command wrote "
                         f"({type(err).__name__}: {err})") from None
    if meta.get("benchmark") == "whole model":
        raise SystemExit(f"--summarize {path}: a bench-model result (whole-model training steps); its table is "
                         "printed when it runs, and the JSON holds one row per stack")
    if with_model:
        capability = meta.get("capability")
        arch = int(capability.replace(".", "")) if capability else None
        described = f"the model describes sm_{' and sm_'.join(map(str, GPUS))}"
        if arch is None:
            reason = (f"{described}; this run is a CPU run" if meta.get("device", "").startswith("CPU")
                      else f"{described}; this run recorded no compute capability")
        else:
            reason = None if arch in GPUS else f"{described}; this run is sm_{arch}"
        reason = cost_model.unavailable() or reason
        if reason:
            print(f"model: {reason}")
        else:
            product = GPUS[arch].name.split()[0]
            if product not in meta.get("device", ""):
                print(f"model: it describes {GPUS[arch].name}, this run's GPU is {meta.get('device')}: clocks, SM "
                      "count and bandwidth differ, and so does the model's error")
            backends = sorted({row["provider"].removeprefix("fusedlora-") for row in recorded["results"]
                               if row["provider"] in ("fusedlora-triton", "fusedlora-cuda") and row["status"] == "ok"})
            estimates = cost_model.estimates(cost_model.headline(recorded["results"]), arch, backends)
            cost_model.attach(recorded["results"], estimates)
            recorded["model"] = {"arch": arch, "gpu": GPUS[arch].name, "estimates": estimates}
            write_json(path, meta, recorded["ceilings"], recorded["results"], recorded["model"])
    print(summary(recorded["results"], recorded["ceilings"]))
    if not meta.get("complete", True):
        print(f"(an incomplete run: stopped after {meta['cases_done']} of {meta['cases_total']} cases)")
    return 0
