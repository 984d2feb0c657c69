"""dense: the frozen weight as it is (bf16, fp16 or fp32), for an unquantized base."""

import torch

from ..contract import FORMAT_IDS, WeightArgs
from .base import FrozenWeight, Tensor, register_format, require_key


@register_format("dense")
class DenseWeight(FrozenWeight):
    """An (N, K) floating-point weight kept as given (no copy); dtype casts apply to it."""

    fmt = "dense"
    tensor_fields = ("weight",)
    follows_dtype_casts = True
    claims_any_float_weight = True

    def __init__(self, weight: Tensor):
        super().__init__(tuple(weight.shape), weight.dtype)
        self.weight = weight

    @classmethod
    def quantize(cls, weight: Tensor) -> "DenseWeight":
        return cls(weight.detach())

    def requantize(self, weight: Tensor) -> "DenseWeight":
        return DenseWeight(weight.detach().to(self.dtype))

    def dequantize(self, dtype=None) -> Tensor:
        return self.weight.to(dtype or self.dtype)

    def kernel_args(self) -> WeightArgs:
        data = self.weight if self.weight.stride(1) == 1 else self.weight.contiguous()
        return WeightArgs(FORMAT_IDS["dense"], data, None, None, None, None, None, data.stride(0), 1)

    def state_dict(self) -> dict[str, Tensor]:
        return {"weight": self.weight}

    @classmethod
    def claims_state_dict(cls, state_dict) -> bool:
        weight = state_dict.get("weight")
        return weight is not None and weight.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64)

    @classmethod
    def from_state_dict(cls, state_dict) -> "DenseWeight":
        weight = require_key(state_dict, "weight")
        if weight.dim() != 2:
            raise ValueError(f"state_dict['weight'] must be 2-D, got shape {tuple(weight.shape)}")
        return cls(weight)

    @classmethod
    def from_tensors(cls, fmt, tensors, shape, blocksize) -> "DenseWeight":
        return cls(tensors[0])
