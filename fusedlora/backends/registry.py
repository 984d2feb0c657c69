"""The backend registry: each backend says why it cannot take a call, dispatch takes the first
that can (in order of preference). `with force_backend("triton"):` forces one for the calls made
inside (`FUSEDLORA_BACKEND=triton|cuda|reference` is the default outside any such block), and a
forced backend that cannot take a call fails loudly. The backward of a call always runs on the
backend that ran its forward (`fusedlora.ops` records it). Also the checks that both GPU
backends make of a problem.
"""

import contextlib
import os
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch

from ..contract import KERNEL_DTYPES, MAX_RANK

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
    """`forward` and `backward` have the signatures of `fusedlora.backends.reference.forward/backward`."""

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


def backend_id(name: str) -> int:
    """The number of backend `name` (its place in the registry), as the ops carry it in a tensor."""
    backend_named(name)
    return list(_BACKENDS).index(name)


def backend_with_id(number: int) -> Backend:
    """The backend whose `backend_id` is `number`."""
    return list(_BACKENDS.values())[number]


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


def gpu_refusal(problem: Problem) -> Optional[str]:
    """Why a GPU kernel family cannot run `problem` on its CUDA device, or None: compute capability
    8.0 (fp8 weights 8.9), then `kernel_refusal`."""
    return capability_refusal(torch.cuda.get_device_capability(problem.device), problem.fmt) or kernel_refusal(problem)


def capability_refusal(capability: tuple[int, int], fmt: str) -> Optional[str]:
    """Why a GPU of `capability` cannot run the kernels on `fmt` weights, or None."""
    if capability < (8, 0):
        return f"needs a GPU of compute capability 8.0 or newer, got {capability}"
    if fmt == "fp8" and capability < (8, 9):
        return f"fp8 weights need compute capability 8.9 or newer, got {capability}"
    return None


def kernel_refusal(problem: Problem) -> Optional[str]:
    """Why the kernels cannot take `problem`'s dtypes or rank (the contract's KERNEL_DTYPES and
    MAX_RANK), or None."""
    names = ", ".join(str(d).removeprefix("torch.") for d in KERNEL_DTYPES)
    if problem.x_dtype not in KERNEL_DTYPES:
        return f"x has dtype {problem.x_dtype}; the kernels take {names}"
    if problem.adapter_dtype not in KERNEL_DTYPES:
        return f"the adapters have dtype {problem.adapter_dtype}; the kernels take {names}"
    if problem.rank > MAX_RANK:
        return f"rank {problem.rank} is above the kernels' limit of {MAX_RANK}"
    return None
