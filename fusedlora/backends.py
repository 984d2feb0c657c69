"""The backend registry: each backend says why it cannot take a call, dispatch takes the first
that can (in order of preference), and `FUSEDLORA_BACKEND=<name>` forces one and fails loudly.
"""

import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import reference

BACKEND_ENV = "FUSEDLORA_BACKEND"


@dataclass(frozen=True)
class Problem:
    """What a backend looks at to decide whether it can take a call."""

    device: torch.device
    x_dtype: torch.dtype
    adapter_dtype: torch.dtype
    fmt: str
    rank: int
    in_features: int
    out_features: int


@dataclass(frozen=True)
class Backend:
    """`forward` and `backward` have the signatures of `fusedlora.reference.forward/backward`."""

    name: str
    why_not: Callable[[Problem], Optional[str]]
    forward: Callable
    backward: Callable
    priority: int = 0


_BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend; higher `priority` is tried first."""
    _BACKENDS[backend.name] = backend


def backends() -> list[Backend]:
    """Registered backends, most preferred first."""
    return sorted(_BACKENDS.values(), key=lambda b: -b.priority)


def select_backend(problem: Problem) -> Backend:
    """The backend that runs `problem`: the forced one, or the first that can take it."""
    forced = os.environ.get(BACKEND_ENV, "").strip()
    if forced:
        if forced not in _BACKENDS:
            raise ValueError(f"{BACKEND_ENV}={forced!r} names no backend; known backends: {sorted(_BACKENDS)}")
        reason = _BACKENDS[forced].why_not(problem)
        if reason is not None:
            raise RuntimeError(f"{BACKEND_ENV}={forced} cannot run this call: {reason}")
        return _BACKENDS[forced]
    reasons = {}
    for backend in backends():
        reason = backend.why_not(problem)
        if reason is None:
            return backend
        reasons[backend.name] = reason
    raise RuntimeError(f"no fusedlora backend can run this call: {reasons}")


def _reference_why_not(problem: Problem) -> Optional[str]:
    return None


def _triton_launchers():
    from fusedlora.kernels import launch  # imports triton: only once a call may need it

    return launch


def _triton_why_not(problem: Problem) -> Optional[str]:
    if problem.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return "CPU tensors run on Triton only under TRITON_INTERPRET=1"
    try:
        launchers = _triton_launchers()
    except ImportError as err:
        return f"triton is not importable ({err})"
    return launchers.why_not(problem)


def _triton_forward(*args):
    return _triton_launchers().forward(*args)


def _triton_backward(*args):
    return _triton_launchers().backward(*args)


register_backend(Backend("reference", _reference_why_not, reference.forward, reference.backward, priority=0))
register_backend(Backend("triton", _triton_why_not, _triton_forward, _triton_backward, priority=10))
