"""Argument checks for the public op: a clear TypeError/ValueError naming the argument and what
was expected, before anything reaches a kernel."""

import math
from numbers import Real

import torch

from .dropout import SEED_LIMIT
from .formats import FORMATS, DenseWeight, FrozenWeight
from .formats.base import check_dense_weight

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def as_weight(weight) -> FrozenWeight:
    """A `FrozenWeight` as is, or a plain float (N, K) tensor wrapped as dense."""
    if isinstance(weight, FrozenWeight):
        return weight
    if isinstance(weight, torch.Tensor):
        return DenseWeight(check_dense_weight(weight))
    raise TypeError(f"weight must be a FrozenWeight (see fusedlora.quantize) or a 2-D float tensor, got {type(weight).__name__}")


def check_real(name: str, value) -> None:
    """A plain real number (a Python or NumPy scalar, not a bool or a tensor)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")


def check_quant(quant, name: str = "quant") -> None:
    """`quant` (the argument `name`) must name a weight format or be None (the base kept dense)."""
    if quant is not None and quant not in FORMATS:
        raise ValueError(f"{name} must be one of {list(FORMATS)} or None (the base kept dense), got {quant!r}")


def check_probability(name: str, value) -> float:
    """A dropout probability: a real number in [0, 1). Returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
    return float(value)


def _check_float_tensor(name: str, t, dtypes=ACTIVATION_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have a floating dtype in {[str(d) for d in dtypes]}, got {t.dtype}")


def check_lora_inputs(x, weight: FrozenWeight, lora_A, lora_B, scaling, bias, dropout_p, seed) -> None:
    """Validate the arguments of `fused_lora_linear` (shapes, dtypes, devices, values)."""
    out_features, in_features = weight.shape
    _check_float_tensor("x", x)
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"x must have shape (..., in_features={in_features}), got {tuple(x.shape)}")
    _check_float_tensor("lora_A", lora_A)
    _check_float_tensor("lora_B", lora_B)
    if lora_A.dim() != 2 or lora_A.shape[1] != in_features:
        raise ValueError(f"lora_A must have shape (r, in_features={in_features}), got {tuple(lora_A.shape)}")
    rank = lora_A.shape[0]
    if rank < 1:
        raise ValueError(f"lora_A must have at least one row (rank r >= 1), got shape {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (out_features, rank):
        raise ValueError(f"lora_B must have shape (out_features={out_features}, r={rank}), got {tuple(lora_B.shape)}")
    if bias is not None:
        _check_float_tensor("bias", bias)
        if tuple(bias.shape) != (out_features,):
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
    named = {"weight": weight.device, "lora_A": lora_A.device, "lora_B": lora_B.device}
    if bias is not None:
        named["bias"] = bias.device
    for name, device in named.items():
        if device != x.device:
            raise ValueError(f"{name} is on {device} but x is on {x.device}; move them to one device")
    check_real("scaling", scaling)
    if not math.isfinite(scaling):
        raise ValueError(f"scaling must be finite, got {scaling!r}")
    check_real("dropout_p", dropout_p)
    check_probability("dropout_p", dropout_p)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT):
        raise ValueError(f"seed must be None or an int in [0, 2**32), got {seed!r}")
