"""The backend registry: each backend says why it cannot take a call, dispatch takes the first
that can (in order of preference). `with force_backend("triton"):` forces one for the calls made
inside (`FUSEDLORA_BACKEND=triton|cuda|reference` is the default outside any such block), and a
forced backend that cannot take a call fails loudly. The backward of a call always runs on the
backend that ran its forward (`fusedlora.ops` records it).
"""

import contextlib
import os
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from . import reference
from .contract import MAX_RANK

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


_FORCED: ContextVar[Optional[str]] = ContextVar("fusedlora_forced_backend", default=None)


def forced_backend() -> str:
    """The backend forced for calls made here: the innermost `force_backend` block's, else
    FUSEDLORA_BACKEND's, else "" (none: dispatch chooses)."""
    scoped = _FORCED.get()
    return scoped if scoped is not None else os.environ.get(BACKEND_ENV, "").strip()


@contextlib.contextmanager
def force_backend(name: str) -> Iterator[None]:
    """Run the fusedlora calls made inside on backend `name` (this thread or task only)."""
    backend_named(name)
    token = _FORCED.set(name)
    try:
        yield
    finally:
        _FORCED.reset(token)


def backend_named(name: str) -> Backend:
    """The registered backend called `name`."""
    if name not in _BACKENDS:
        raise ValueError(f"backend {name!r} is not known; known backends: {sorted(_BACKENDS)}")
    return _BACKENDS[name]


def select_backend(problem: Problem) -> Backend:
    """The backend that runs `problem`: the forced one, or the first that can take it."""
    forced = forced_backend()
    if forced:
        if forced not in _BACKENDS:
            raise ValueError(f"the forced backend {forced!r} ({BACKEND_ENV} or force_backend) names no backend; "
                             f"known backends: {sorted(_BACKENDS)}")
        reason = _BACKENDS[forced].why_not(problem)
        if reason is not None:
            raise RuntimeError(f"the forced backend {forced} cannot run this call: {reason}")
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


_CUDA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _cuda_why_not(problem: Problem) -> Optional[str]:
    if problem.device.type != "cuda":
        return "takes CUDA tensors only"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    from . import extension

    reason = extension.load()
    if reason is not None:
        return reason
    capability = torch.cuda.get_device_capability(problem.device)
    if capability < (8, 0):
        return f"needs compute capability 8.0 or newer, got {capability}"
    if problem.fmt == "fp8" and capability < (8, 9):
        return f"fp8 weights need compute capability 8.9 or newer, got {capability}"
    if problem.x_dtype not in _CUDA_DTYPES or problem.adapter_dtype not in _CUDA_DTYPES:
        return f"x and the adapters must be float16, bfloat16 or float32, got {problem.x_dtype} and {problem.adapter_dtype}"
    if problem.rank > MAX_RANK:
        return f"rank {problem.rank} is above the kernels' limit of {MAX_RANK}"
    return None


def _cuda_forward(*args):
    from . import extension

    return extension.forward(*args)


def _cuda_backward(*args):
    from . import extension

    return extension.backward(*args)


# Preference: Triton first, then CUDA C++ (for CUDA tensors Triton cannot take, or when forced),
# then the reference. The benchmark times both GPU families side by side, so that measurements
# decide this order.
register_backend(Backend("reference", _reference_why_not, reference.forward, reference.backward, priority=0))
register_backend(Backend("cuda", _cuda_why_not, _cuda_forward, _cuda_backward, priority=5))
register_backend(Backend("triton", _triton_why_not, _triton_forward, _triton_backward, priority=10))
