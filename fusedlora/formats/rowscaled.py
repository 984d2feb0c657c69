"""int8 and fp8: one 8-bit value per weight and one fp32 scale per output row.

- int8 is bitsandbytes' LLM.int8 layout: int8 `weight` (N, K) and fp32 `SCB` (N,), the row's
  absmax; `W = q · (SCB · (1/127))`, quantized as `round(w · 127 / SCB)` (ties to even). The row
  scale is formed first (bitsandbytes multiplies `q · SCB` first, which can overflow fp32 and
  differs from this by at most an ulp); kernels apply the same row scale in their epilogue.
- fp8 is the per-row layout of torchao: `float8_e4m3fn` `weight` (N, K) and fp32 `weight_scale`
  (N,); `W = q · scale`, with `scale = absmax / 448` so each row spans e4m3's range.

The per-row scale factors out of a GEMM over K: kernels apply it in the epilogue.
"""

import torch

from ..contract import FORMAT_IDS, WeightArgs
from .base import (
    FrozenWeight,
    Tensor,
    check_finite_for_quantization,
    expect_dtype,
    expect_numel,
    register_format,
    require_key,
)

FP8_MAX = 448.0
_INT8_INV_127 = 1.0 / 127


class RowScaledWeight(FrozenWeight):
    """Shared shape of the per-row formats: `data` (N, K) and an fp32 `scale` per row."""

    tensor_fields = ("data", "scale")
    records_dtype = False
    storage_dtype: torch.dtype
    scale_key: str

    def __init__(self, data: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32):
        super().__init__(tuple(data.shape), dtype)
        self.data = data
        self.scale = scale

    @classmethod
    def quantize(cls, weight: Tensor) -> "RowScaledWeight":
        check_finite_for_quantization(weight, cls.fmt)
        row_absmax = weight.abs().amax(dim=1).float()
        return cls(cls._quantize_rows(weight.float(), row_absmax), cls._scale_from_absmax(row_absmax), weight.dtype)

    def requantize(self, weight: Tensor) -> "RowScaledWeight":
        return type(self).quantize(weight)

    def kernel_args(self) -> WeightArgs:
        data = self.data if self.data.stride(1) == 1 else self.data.contiguous()
        return WeightArgs(FORMAT_IDS[self.fmt], data, self.scale, None, None, None, None, data.stride(0), 1)

    def state_dict(self) -> dict[str, Tensor]:
        return {"weight": self.data, self.scale_key: self.scale}

    @classmethod
    def claims_state_dict(cls, state_dict) -> bool:
        return cls.scale_key in state_dict

    @classmethod
    def from_state_dict(cls, state_dict) -> "RowScaledWeight":
        data = expect_dtype(require_key(state_dict, "weight"), cls.storage_dtype, "weight")
        if data.dim() != 2:
            raise ValueError(f"state_dict['weight'] must be 2-D, got shape {tuple(data.shape)}")
        scale = require_key(state_dict, cls.scale_key).reshape(-1)
        expect_numel(scale, data.shape[0], cls.scale_key)
        return cls(data, expect_dtype(scale, torch.float32, cls.scale_key))

    @classmethod
    def from_tensors(cls, fmt, tensors, shape, blocksize) -> "RowScaledWeight":
        return cls(*tensors)


@register_format("int8")
class Int8Weight(RowScaledWeight):
    """bitsandbytes LLM.int8 weight: int8 (N, K) codes and the fp32 row absmax `SCB` (N,)."""

    fmt = "int8"
    storage_dtype = torch.int8
    scale_key = "SCB"

    @staticmethod
    def _quantize_rows(weight: Tensor, row_absmax: Tensor) -> Tensor:
        codes = torch.round(weight * (127.0 / row_absmax).unsqueeze(1))
        return torch.where(row_absmax.unsqueeze(1) > 0, codes, 0.0).to(torch.int8)

    @staticmethod
    def _scale_from_absmax(row_absmax: Tensor) -> Tensor:
        return row_absmax

    def dequantize(self, dtype=None) -> Tensor:
        return self.data.to(torch.float32, copy=True).mul_(self.row_scale().unsqueeze(1)).to(dtype or self.dtype)

    def row_scale(self) -> Tensor:
        """The fp32 factor of each row: SCB / 127 (as a product with the fp32 reciprocal)."""
        return self.scale * _INT8_INV_127

    def state_dict(self) -> dict[str, Tensor]:
        row_format = torch.tensor(0, dtype=torch.uint8, device=self.data.device)  # bitsandbytes' "row" layout
        return {**super().state_dict(), "weight_format": row_format}

    @classmethod
    def from_state_dict(cls, state_dict) -> "Int8Weight":
        weight_format = state_dict.get("weight_format")
        if weight_format is not None and int(weight_format) != 0:
            raise ValueError(f"state_dict['weight_format'] is {int(weight_format)}; only the row-major layout (0) is supported")
        return super().from_state_dict(state_dict)


@register_format("fp8")
class Fp8Weight(RowScaledWeight):
    """float8_e4m3fn (N, K) values and an fp32 per-row `weight_scale` (N,)."""

    fmt = "fp8"
    storage_dtype = torch.float8_e4m3fn
    scale_key = "weight_scale"

    @staticmethod
    def _quantize_rows(weight: Tensor, row_absmax: Tensor) -> Tensor:
        scale = Fp8Weight._scale_from_absmax(row_absmax)
        return (weight / scale.unsqueeze(1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)

    @staticmethod
    def _scale_from_absmax(row_absmax: Tensor) -> Tensor:
        # An all-zero row gets a tiny scale instead of 0, so that 0 / scale stays 0.
        return row_absmax.clamp(min=1e-12) / FP8_MAX

    def dequantize(self, dtype=None) -> Tensor:
        return self.data.to(torch.float32, copy=True).mul_(self.scale.unsqueeze(1)).to(dtype or self.dtype)
