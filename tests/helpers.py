"""Shared test helpers: the one per-dtype tolerance table, an independent float64 oracle, what
bitsandbytes' bytes mean decoded by hand, and the checks every Triton-interpreter run wears
(poisoned outputs, the bf16 tl.dot fix)."""

import contextlib
from typing import Optional
from unittest import mock

import torch
import torch.nn.functional as F

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

# Below its normal range a dtype has a fixed absolute spacing (float16: 2^-24 ≈ 6e-8), so a result
# rounded there is off by up to half a spacing whatever its size, and a gradient passes through a
# few such roundings (u or du, then itself) scaled by values of order one. Every bound therefore
# also allows this many subnormal spacings of the dtype the result was computed in.
SUBNORMAL_SPACINGS = 4


def absolute_floor(dtype: torch.dtype) -> float:
    """The part of every bound that does not scale with the values: `SUBNORMAL_SPACINGS` subnormal
    spacings of `dtype`, and never less than float32's smallest normal (the kernels accumulate in it)."""
    info = torch.finfo(dtype)
    return SUBNORMAL_SPACINGS * info.smallest_normal * info.eps + torch.finfo(torch.float32).tiny


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "",
                 magnitude: Optional[torch.Tensor] = None, floor_gain=1.0) -> None:
    """Compare `actual` (computed in `dtype`) with a float64 `expected` using the table: normwise,
    scaled by max |expected|; or, given `magnitude` (the same computation on |inputs|, from
    `float64_magnitudes`), element by element, scaled by each element's own sum of |terms|. Both
    add `absolute_floor(dtype)`, times `floor_gain` (from `float64_floor_gains`) where given."""
    actual, expected = actual.detach().double(), expected.detach().double()
    if magnitude is None:
        scale = expected.abs().max() if expected.numel() else 1.0
        torch.testing.assert_close(actual, expected, atol=TOLERANCES[dtype] * float(scale) + absolute_floor(dtype),
                                   rtol=0, msg=lambda m: f"{what}: {m}")
        return
    bound = TOLERANCES[dtype] * magnitude.detach().double().abs() + absolute_floor(dtype) * floor_gain
    error = (actual - expected).abs()
    bad = ~(error <= bound)  # NaN counts as bad
    if bad.any():
        index = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} elements outside the bound; first at {index}: "
                             f"got {float(actual[index])}, expected {float(expected[index])}, bound "
                             f"{float(bound[index])}")


def spec_hash(index: int, seed: int) -> int:
    """The dropout hash of docs/design.md §3, transcribed with Python integers (independent of fusedlora)."""
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


def float64_magnitudes(x, w, lora_A, lora_B, scaling, bias, keep, p, grad_y):
    """`float64_oracle` on the absolute values of every input: the sums of |terms| that bound
    the rounding error of each result (Higham: |fl(A·B) - A·B| <= γ_n·|A|·|B|)."""
    def magnitude(t):
        return None if t is None else t.detach().abs()

    return float64_oracle(magnitude(x), w.abs(), magnitude(lora_A), magnitude(lora_B), abs(scaling), magnitude(bias),
                          keep, p, magnitude(grad_y))


# bitsandbytes is the oracle of what it writes (packed bytes, absmax, nested codes, state-dict keys),
# never of what its CPU kernels compute: those depend on the processor's instruction set (with
# AVX-512 its dequantize_4bit returned wrong bfloat16 values, and Linear4bit's eval forward repacks
# the weight and rounds its scales). What its bytes mean is decoded here by hand instead.
def decode_bnb_4bit(packed: torch.Tensor, state) -> torch.Tensor:
    """The weight that bitsandbytes' 4-bit `packed` bytes and `QuantState` stand for, in `state.dtype`
    and `state.shape`: `code[nibble] · absmax[i // blocksize]` in fp32, the high nibble first,
    a nested absmax being `state2.code[q] · state2.absmax[j // state2.blocksize] + state.offset`."""
    from bitsandbytes.functional import get_4bit_type

    n = state.shape.numel()
    data = packed.contiguous().view(torch.uint8).reshape(-1).to(torch.int64)  # any quant_storage dtype
    nibbles = torch.stack((data >> 4, data & 0xF), dim=1).reshape(-1)[:n]
    absmax = state.absmax
    if state.nested:
        nested = state.state2
        per_code = nested.absmax.repeat_interleave(nested.blocksize)[: absmax.numel()]
        absmax = nested.code[absmax.to(torch.int64)] * per_code + state.offset
    code = get_4bit_type(state.quant_type, device=data.device)  # bitsandbytes decodes with this, not state.code
    values = code[nibbles] * absmax.repeat_interleave(state.blocksize)[:n]
    return values.reshape(state.shape).to(state.dtype)


@contextlib.contextmanager
def bnb_linear4bit_decoded_by_hand(bnb):
    """`bnb.nn.Linear4bit.forward` as its bytes define it (see `decode_bnb_4bit`): the input cast to
    the layer's compute dtype, F.linear with the decoded weight and bias, cast back."""
    def forward(self, x):
        dtype = self.compute_dtype or x.dtype
        weight = decode_bnb_4bit(self.weight.data, self.weight.quant_state).to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), weight, bias).to(x.dtype)

    with mock.patch.object(bnb.nn.Linear4bit, "forward", forward):
        yield


def float64_floor_gains(x, lora_A, lora_B, scaling, keep, p, grad_y):
    """How far the absolute floor of each result reaches: u and du are rounded into the compute
    dtype too, so their own subnormal error arrives in y through s·B, in dx through A/(1-p), in dA
    through drop(x) and in dB through s·g. Returns the factors (>= 1) for y and [dx, dA, dB, dbias],
    each broadcastable to its result."""
    x64 = x.detach().double().abs().reshape(-1, x.shape[-1])
    dropped = x64 if keep is None else torch.where(keep, x64 / (1 - p), 0.0)
    a, b, g = (t.detach().double().abs() for t in (lora_A, lora_B, grad_y))
    s = abs(scaling)
    y = 1 + s * b.sum(1)[None, :]
    dx = 1 + a.sum(0)[None, :] / (1 - p)
    da = 1 + dropped.sum(0)[None, :]
    db = 1 + s * g.sum(0)[:, None]
    return y, [dx, da, db, 1.0]


@contextlib.contextmanager
def poisoned_triton_outputs():
    """Every buffer the Triton kernels must fill starts as NaN: a missed element shows up."""
    from fusedlora.backends import triton_launch as launch

    def poisoned(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    with mock.patch.object(launch, "new_output", poisoned):
        yield


@contextlib.contextmanager
def interpreter_bf16_dot():
    """Test-only patch (docs/design.md §6): the interpreter's tl.dot multiplies bf16 operands as raw
    uint16 bits; upcast them to fp32 first, as the tensor cores do."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    def fp32_handle(handle):
        if handle.dtype != tl.bfloat16:
            return handle
        data = interpreter._convert_float(handle.data, tl.bfloat16, tl.float32, None)
        return interpreter.TensorHandle(data.view(np.float32), tl.float32)

    original = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original(self, fp32_handle(a), fp32_handle(b), d, input_precision, max_num_imprecise_acc)

    with mock.patch.object(interpreter.InterpreterBuilder, "create_dot", create_dot):
        yield


@contextlib.contextmanager
def on_backend(backend: str, device: str = "cpu"):
    """Force `backend` (`fusedlora.backends.force_backend`: this thread only) for the calls inside;
    Triton on the CPU also gets the interpreter checks above."""
    from fusedlora.backends import force_backend

    with force_backend(backend):
        if backend == "triton" and device == "cpu":
            with poisoned_triton_outputs(), interpreter_bf16_dot():
                yield
        else:
            yield


def unpack_codes(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The n 4-bit codes (int64) held in `packed`, high nibble first (the layout, spelled out apart
    from the package's decoding)."""
    packed = packed.to(torch.int64)
    return torch.stack((packed >> 4, packed & 0xF), dim=1).reshape(-1)[:n]
