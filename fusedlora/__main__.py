"""Command line: `python -m fusedlora demo` (the main job), `info`, `bench`, `bench-model`, `inspect`
and `plan`."""

import argparse
import platform

import torch

from . import __version__
from .backends import Problem, backends


def info() -> None:
    """Print versions and which backend can run on which device, or why not."""
    print(f"fusedlora {__version__}, torch {torch.__version__}, python {platform.python_version()}")
    from .extension import load

    reason = load()
    print(f"  CUDA extension fusedlora._C: {'loaded' if reason is None else reason}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        problem = Problem(torch.device(device), torch.bfloat16, torch.float32, "nf4", 16, 4096, 4096)
        for backend in backends():
            reason = backend.why_not(problem)
            print(f"  {device:5s} {backend.name:10s} {'available' if reason is None else 'unavailable: ' + reason}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fusedlora")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("demo", help="fine-tune all-MiniLM-L6-v2 (NF4 base, fused LoRA) for review sentiment",
                        add_help=False)
    commands.add_parser("info", help="versions and available backends")
    commands.add_parser("bench", help="benchmark against the peers (python -m fusedlora bench --help)", add_help=False)
    commands.add_parser("inspect", help="compiled kernels counted from SASS, and a MODEL of their speed "
                        "(python -m fusedlora inspect --help)", add_help=False)
    commands.add_parser("bench-model", help="training steps of a whole model, stack beside stack "
                        "(python -m fusedlora bench-model --help)", add_help=False)
    commands.add_parser("plan", help="memory per GPU of a LoRA run under FSDP2 (python -m fusedlora plan --help)",
                        add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "bench-model":
        from .benchmark.whole_model import main as bench_model_main

        raise SystemExit(bench_model_main(rest))
    if args.command == "plan":
        from .plan import main as plan_main

        raise SystemExit(plan_main(rest))
    if args.command == "inspect":
        from .inspection.cli import main as inspect_main

        raise SystemExit(inspect_main(rest))
    if args.command == "bench":
        from .benchmark.cli import main as bench_main

        raise SystemExit(bench_main(rest))
    if args.command == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    info()


if __name__ == "__main__":
    main()
