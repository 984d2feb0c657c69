"""The reference backend, in PyTorch: the oracle every kernel is tested against, and the
fallback on any device. It computes what PEFT computes (docs/design.md §1), unfused, the LoRA
term accumulated into the base product's buffer (one rounding of the sum where PEFT rounds the
product, its scaling and the sum; and no temporaries, whose first touch a CPU pays for):

    y  = (x·deq(W)ᵀ + bias  in x's dtype)  +  s·(drop(x)·Aᵀ)·Bᵀ  in the LoRA dtype, cast to x's dtype
    du = s·g·B        dB = s·gᵀ·u        dA = duᵀ·drop(x)        dx = g·deq(W) + drop'(du·A)

The LoRA dtype is the promotion of x's, A's and B's dtypes (PEFT casts x to fp32 adapters).
scaling = 0 turns the branch off: y is the base output bit for bit, u and dA, dB are zeros, and
NaN/Inf in A or B cannot leak in through 0·NaN. It materialises deq(W) and drop(x), which the
kernels never do.
"""

import torch
import torch.nn.functional as F

from ..contract import lora_dtype
from ..dropout import apply_dropout, apply_mask, drop_mask
from ..formats import FrozenWeight
from .registry import Problem

Tensor = torch.Tensor


def why_not(problem: Problem) -> None:
    """The reference takes every problem."""
    return None


def forward(x, weight: FrozenWeight, lora_A, lora_B, scaling, bias, dropout_p, seed) -> tuple[Tensor, Tensor]:
    """x (M, K), lora_A (r, K), lora_B (N, r), bias (N,) or None → y (M, N) in x's dtype, u (M, r)."""
    compute = lora_dtype(x.dtype, lora_A.dtype, lora_B.dtype)
    with torch.autocast(x.device.type, enabled=False):
        base = F.linear(x, weight.dequantize(x.dtype), None if bias is None else bias.to(x.dtype))
        if scaling == 0.0:
            return base, x.new_zeros((x.shape[0], lora_A.shape[0]), dtype=compute)
        u = apply_dropout(x.to(compute), dropout_p, seed) @ lora_A.to(compute).t()
        y = base.to(compute).addmm_(u, lora_B.to(compute).t(), alpha=scaling)  # base's buffer is fresh
    return y.to(x.dtype), u


def backward(grad_y, x, u, weight: FrozenWeight, lora_A, lora_B, scaling, dropout_p, seed, need_dx):
    """grad_y (M, N), x (M, K), u (M, r) → (dx (M, K) or None, dA (r, K), dB (N, r))."""
    compute = u.dtype
    with torch.autocast(x.device.type, enabled=False):
        if scaling == 0.0:
            grad_x = (grad_y @ weight.dequantize(grad_y.dtype)).to(x.dtype) if need_dx else None
            return grad_x, torch.zeros_like(lora_A, memory_format=torch.contiguous_format), \
                torch.zeros_like(lora_B, memory_format=torch.contiguous_format)
        dropped = drop_mask(tuple(x.shape), dropout_p, seed, x.device) if dropout_p > 0.0 else None

        def drop(t: Tensor) -> Tensor:  # one mask for dA and dx
            return t if dropped is None else apply_mask(t, dropped, dropout_p)

        g = grad_y.to(compute)
        du = (g @ lora_B.to(compute)).mul_(scaling)
        grad_B = (g.t() @ u).mul_(scaling)
        grad_A = du.t() @ drop(x.to(compute))
        grad_x = None
        if need_dx:
            base = (grad_y @ weight.dequantize(grad_y.dtype)).to(compute)
            lora_A_c = lora_A.to(compute)
            summed = base.addmm_(du, lora_A_c) if dropped is None else drop(du @ lora_A_c).add_(base)
            grad_x = summed.to(x.dtype)
    return grad_x, grad_A.to(lora_A.dtype), grad_B.to(lora_B.dtype)
