"""The large-M regimes of the Triton backend (docs/design.md §4): "fused" (W dequantized inside
the GEMM's loop) or "workspace" (W dequantized into a workspace, then one cuBLAS GEMM). The
launcher picks one by M and weight format (`kernels/configs.gemm_regime`); `with
force_regime("workspace"):` (or FUSEDLORA_TRITON_REGIME outside any such block) forces one, which
is how the benchmark times each. Apart from the launcher so that this imports no Triton.
"""

import contextlib
import os
from contextvars import ContextVar
from typing import Iterator, Optional

SMALL_M = 16  # calls of at most this many rows take the one-launch small-M kernel
REGIMES = ("fused", "workspace")
REGIME_ENV = "FUSEDLORA_TRITON_REGIME"
_REGIME: ContextVar[Optional[str]] = ContextVar("fusedlora_triton_regime", default=None)


def _checked_regime(name: str, source: str) -> str:
    if name not in REGIMES:
        raise ValueError(f"{source} is {name!r}; expected one of {REGIMES} (or unset: chosen by M)")
    return name


def scoped_regime() -> Optional[str]:
    """The regime of the innermost `force_regime` block around this call, or None."""
    return _REGIME.get()


def forced_regime() -> Optional[str]:
    """The large-M regime forced for calls made here (`force_regime`, else FUSEDLORA_TRITON_REGIME),
    or None: the launcher chooses by M."""
    scoped = scoped_regime()
    if scoped is not None:
        return scoped
    name = os.environ.get(REGIME_ENV, "").strip()
    return _checked_regime(name, REGIME_ENV) if name else None


@contextlib.contextmanager
def force_regime(name: str) -> Iterator[None]:
    """Run the Triton backend's large-M calls made inside in regime `name` ("fused" or "workspace";
    this thread or task only). Calls the workspace regime cannot take (fp32 x, or LoRA products
    outside x's dtype) stay fused."""
    token = _REGIME.set(_checked_regime(name, "force_regime's name"))
    try:
        yield
    finally:
        _REGIME.reset(token)
