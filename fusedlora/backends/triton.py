"""The Triton backend: the kernels of kernels/ (installed as `fusedlora.kernels`) through the
launchers of `triton_launch`, which import Triton the first time a call needs them.

CUDA tensors run on the compiled kernels. Under TRITON_INTERPRET=1 (read by Triton when it first
compiles the kernels) they run through Triton's interpreter instead, which takes CPU tensors only,
and only when this backend is forced: on the CPU the reference is the faster path.

Large M runs in one of two regimes, "fused" or "workspace" (docs/design.md §4; `regimes`).
"""

import os
import sys
from typing import Optional

from .registry import Problem, forced_backend, gpu_refusal, kernel_refusal


def _interpreting() -> bool:
    """Whether the kernels run through Triton's interpreter: fixed once the launchers are imported
    (Triton reads TRITON_INTERPRET then), read from the environment before that."""
    launchers = sys.modules.get(f"{__package__}.triton_launch")
    if launchers is not None:
        return launchers.INTERPRETING
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_not(problem: Problem) -> Optional[str]:
    """Why the Triton backend cannot run `problem`, or None when it can."""
    device = problem.device
    if device.type == "cuda":
        if _interpreting():
            return "TRITON_INTERPRET=1 is set, so Triton runs CPU tensors only"
        reason = gpu_refusal(problem)
    elif device.type == "cpu":
        if not _interpreting():
            return "CPU tensors run on Triton only under TRITON_INTERPRET=1"
        if forced_backend() != "triton":
            return "the Triton interpreter takes CPU tensors only when the triton backend is forced"
        reason = kernel_refusal(problem)
    else:
        return f"{device.type} tensors are not supported"
    if reason is None:
        try:
            from . import triton_launch  # noqa: F401  (imports triton)
        except ImportError as err:
            return f"triton is not importable ({err})"
    return reason


def forward(*args):
    """`fusedlora.backends.reference.forward`'s signature."""
    from . import triton_launch

    return triton_launch.forward(*args)


def backward(*args):
    """`fusedlora.backends.reference.backward`'s signature."""
    from . import triton_launch

    return triton_launch.backward(*args)
