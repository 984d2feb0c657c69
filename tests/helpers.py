"""Shared test helpers: the one per-dtype tolerance table and an independent float64 oracle."""

import torch

# Largest error of a result computed in `dtype`, as a fraction of the largest |value| of its
# float64 reference (a normwise bound: the rounding error of a dot product scales with its
# terms, not with its possibly cancelled result). The reference path measures about 1.7 ulps
# of each dtype (fp16 8e-4, bf16 6.7e-3); the table leaves room for kernels' accumulation orders.
TOLERANCES = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """Compare `actual` (computed in `dtype`) with a float64 `expected` using the table."""
    actual, expected = actual.detach(), expected.detach()
    scale = expected.double().abs().max().clamp(min=torch.finfo(torch.float64).tiny) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected.double(), atol=TOLERANCES[dtype] * float(scale), rtol=0,
                               msg=lambda m: f"{what}: {m}")


def spec_hash(index: int, seed: int) -> int:
    """DESIGN §1's dropout hash transcribed with Python integers (independent of fusedlora)."""
    m = 0xFFFFFFFF
    h = ((index & m) * 0x9E3779B1 & m) ^ (((index >> 32) * 0x85EBCA77) & m) ^ seed
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & m
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & m
    return h ^ (h >> 16)


def float64_lora(x, w, lora_A, lora_B, scaling, bias=None, keep=None, p=0.0):
    """y = x·Wᵀ + s·(drop(x)·Aᵀ)·Bᵀ + bias in float64 from a dense W and an explicit keep mask."""
    x64 = x.detach().double().reshape(-1, x.shape[-1])
    dropped = x64 if keep is None else torch.where(keep, x64 / (1 - p), 0.0)
    y = x64 @ w.double().t() + scaling * (dropped @ lora_A.detach().double().t()) @ lora_B.detach().double().t()
    if bias is not None:
        y = y + bias.detach().double()
    return y.reshape(*x.shape[:-1], w.shape[0])


def random_weight(n: int, k: int, dtype=torch.float32, generator=None) -> torch.Tensor:
    """A weight with rows of very different scales, as real layers have."""
    scales = 10.0 ** torch.empty(n, 1).uniform_(-2, 1, generator=generator)
    return (torch.randn(n, k, generator=generator) * scales).to(dtype)


def float64_oracle(x, w, lora_A, lora_B, scaling, bias, keep, p, grad_y):
    """y and (dx, dA, dB, dbias) in float64 by autograd, from a dense W and an explicit keep mask."""
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, lora_A, lora_B, bias)]
    x64, a64, b64, bias64 = leaves
    dropped = x64 if keep is None else torch.where(keep, x64 / (1 - p), 0.0)
    y = x64 @ w.double().t() + scaling * (dropped @ a64.t()) @ b64.t()
    if bias64 is not None:
        y = y + bias64
    y.backward(grad_y.double())
    return y.detach(), [None if t is None else t.grad for t in leaves]
