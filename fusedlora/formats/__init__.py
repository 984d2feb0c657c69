"""Frozen-weight formats: nf4, fp4, int8, fp8 and dense (docs/design.md §2).

`quantize` makes a `FrozenWeight` from a float (N, K) tensor; `FrozenWeight.from_state_dict`
and `from_bnb_module` take weights that bitsandbytes quantized, reusing their bytes.
"""

import torch

from .base import FrozenWeight, check_dense_weight, format_class
from .dense import DenseWeight
from .fourbit import VALID_BLOCKSIZES, FourBitWeight, check_blocksize
from .rowscaled import Fp8Weight, Int8Weight

FORMATS = ("nf4", "fp4", "int8", "fp8", "dense")


def quantize(weight: torch.Tensor, fmt: str, blocksize: int = 64, double_quant: bool = True) -> FrozenWeight:
    """Store a float weight (N, K) in `fmt` ("nf4", "fp4", "int8", "fp8" or "dense").

    `blocksize` (a power of two, 32…4096) and `double_quant` (nested absmax quantization, on by
    default as in bitsandbytes) apply to the 4-bit formats; nf4/fp4 bytes and absmax equal
    what bitsandbytes writes for the same weight. "dense" keeps the tensor as given.
    """
    weight = check_dense_weight(weight).detach()
    weight_class = format_class(fmt)
    if weight_class is FourBitWeight:
        return FourBitWeight.quantize(weight, fmt, blocksize, double_quant)
    return weight_class.quantize(weight)


def from_bnb_module(module: torch.nn.Module) -> FrozenWeight:
    """The weight of a bitsandbytes `Linear4bit` or `Linear8bitLt`, sharing its bytes.

    The layer must already hold quantized data (bitsandbytes quantizes when the layer is moved
    to a device); nothing is re-quantized.
    """
    kind = type(module).__name__
    weight = getattr(module, "weight", None)
    if kind.startswith("Linear4bit") or hasattr(weight, "quant_state"):
        if getattr(weight, "quant_state", None) is None:
            raise ValueError(f"{kind} holds no quantized weight yet; move it to a device (e.g. .to('cpu')) so bitsandbytes quantizes it")
    elif kind.startswith("Linear8bitLt") or hasattr(weight, "SCB"):
        if getattr(weight, "SCB", None) is None and getattr(module.state, "SCB", None) is None:
            raise ValueError(f"{kind} holds no quantized weight yet; move it to a device so bitsandbytes quantizes it")
    else:
        raise TypeError(f"module must be a bitsandbytes Linear4bit or Linear8bitLt, got {kind}")
    state = {key: value for key, value in module.state_dict().items() if key != "bias"}
    return FrozenWeight.from_state_dict(state)


__all__ = [
    "FORMATS",
    "VALID_BLOCKSIZES",
    "DenseWeight",
    "FourBitWeight",
    "Fp8Weight",
    "Int8Weight",
    "FrozenWeight",
    "check_blocksize",
    "from_bnb_module",
    "quantize",
]
