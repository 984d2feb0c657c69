"""The large-M regimes of the GPU backends (docs/design.md §4): "fused" (W dequantized inside the
GEMM's loop) or "workspace" (W dequantized into a workspace, then one cuBLAS GEMM). Both backends
pick one by M and weight format (`large_m_regime`); `with force_regime("workspace"):` (or
FUSEDLORA_TRITON_REGIME outside any such block: the name predates the CUDA backend's regimes)
forces one, which is how the benchmark times each. Apart from the launchers so that this imports
no Triton and no extension.
"""

import contextlib
import math
import os
from contextvars import ContextVar
from typing import Iterator, Optional

import torch

SMALL_M = 16  # calls of at most this many rows take the one-launch small-M kernel
REGIMES = ("fused", "workspace")
REGIME_ENV = "FUSEDLORA_TRITON_REGIME"
_REGIME: ContextVar[Optional[str]] = ContextVar("fusedlora_triton_regime", default=None)


# "fused" dequantizes W inside the GEMM's reduction loop; "workspace" dequantizes all of W into a
# 16-bit workspace (bandwidth-bound) and runs cuBLAS on it with the LoRA term folded in. The
# workspace costs a pass over W per GEMM, which the fused loop's dequantization outweighs once
# enough rows share each weight tile. The rows below are the crossovers the MODEL (`python -m
# fusedlora inspect`; Llama-3-8B's up_proj and q_proj, r = 16) finds per architecture family for
# the Triton kernels: on Hopper their fused loop waits for each wgmma (its dequantization does not
# overlap the tensor cores), so the workspace wins from about 512 rows; on Ampere mma.sync overlaps
# it, and the fused 4-bit loop keeps up at every M (int8 and fp8 cross over near 1024). A dense
# weight has no dequantization to save and stays fused. The CUDA backend's fused GEMM runs
# mma.sync, which on Hopper reaches about 2/3 of wgmma's rate (the MODEL's assumption): there
# cuBLAS wins for a dense weight too, and the rest cross over at least as early. The benchmark
# times both regimes, so one GPU run settles these rows.
WORKSPACE_MIN_M = {
    "hopper": {"nf4": 512, "fp4": 512, "int8": 512, "fp8": 512},
    "ampere": {"int8": 1024, "fp8": 1024},
}
CUDA_WORKSPACE_MIN_M = {"hopper": {**WORKSPACE_MIN_M["hopper"], "dense": 512}, "ampere": WORKSPACE_MIN_M["ampere"]}


def products_in_x_dtype(x_dtype: torch.dtype, adapter_dtypes: tuple) -> bool:
    """Whether a call's LoRA products run on the tensor cores in x's dtype: x is 16-bit and each
    adapter is x's dtype or fp32 (rounded to x's: an error below the 16-bit output's own rounding).
    The workspace regime folds the LoRA term into x's GEMM, so it takes only these calls."""
    return x_dtype != torch.float32 and all(d in (x_dtype, torch.float32) for d in adapter_dtypes)


def large_m_regime(m: int, fmt: str, capability: tuple[int, int], workspace_possible: bool,
                   crossovers: dict = WORKSPACE_MIN_M) -> str:
    """The regime of a GPU backend's call of M rows (past the small-M kernels) on a weight of format
    `fmt` on a device of `capability`: "fused" where the workspace cannot take the call
    (`workspace_possible` false); else the forced regime (`forced_regime`); else "fused" under
    `torch.use_deterministic_algorithms(True)` (the kernels are deterministic by themselves, cuBLAS
    needs CUBLAS_WORKSPACE_CONFIG under older torch); else by M: `crossovers`, the backend's table
    (`WORKSPACE_MIN_M` for Triton, `CUDA_WORKSPACE_MIN_M`)."""
    if not workspace_possible:
        return "fused"
    forced = forced_regime()
    if forced is not None:
        return forced
    if torch.are_deterministic_algorithms_enabled():
        return "fused"
    rows = crossovers["hopper" if capability[0] >= 9 else "ampere"].get(fmt, math.inf)
    return "workspace" if m >= rows else "fused"


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
    """Run the GPU backends' large-M calls made inside in regime `name` ("fused" or "workspace";
    this thread or task only). Calls the workspace regime cannot take (fp32 x, LoRA products
    outside x's dtype, for the CUDA backend a weight or x its GEMMs do not read in 16-byte chunks)
    stay fused."""
    token = _REGIME.set(_checked_regime(name, "force_regime's name"))
    try:
        yield
    finally:
        _REGIME.reset(token)
