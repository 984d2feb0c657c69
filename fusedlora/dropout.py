"""The dropout mask: a pure function of (seed, element index), identical in every backend.

For element i of the row-major flattened (M, K) input and a 32-bit seed (docs/design.md §3):

    h    = (lo32(i) · 0x9E3779B1) ^ (hi32(i) · 0x85EBCA77) ^ seed          (mod 2^32)
    h    = fmix32(h)                       (MurmurHash3's finaliser)
    keep = h >= floor(p · 2^32)

Backward regenerates the mask from the seed instead of storing it. Torch has no full uint32
arithmetic: a mask of at most 2^31 elements is hashed in int32, whose products wrap mod 2^32 as
uint32's do (a logical shift is an arithmetic one masked; the comparison flips the sign bit), in
place, a third of the memory traffic of int64; larger ones in int64, each 32-bit product formed
from 16-bit halves (no overflow). Both give the same bits (tests/test_dropout.py).
"""

import math

import torch

Tensor = torch.Tensor

_MASK32 = 0xFFFFFFFF
SEED_LIMIT = 2**32


def drop_threshold(p: float) -> int:
    """floor(p · 2^32): an element is kept when its hash is at least this."""
    return math.floor(p * 2.0**32)


def _mul32(a: Tensor, constant: int) -> Tensor:
    """(a · constant) mod 2^32 for int64 `a` in [0, 2^32), without int64 overflow."""
    low = (a & 0xFFFF) * constant
    high = (((a >> 16) * constant) & 0xFFFF) << 16
    return (low + high) & _MASK32


def _fmix32(h: Tensor) -> Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def element_hash(index: Tensor, seed: int) -> Tensor:
    """The 32-bit hash (as int64) of int64 element indices `index` under `seed`."""
    mixed = _mul32(index & _MASK32, 0x9E3779B1) ^ _mul32(index >> 32, 0x85EBCA77) ^ seed
    return _fmix32(mixed)


def _signed(value: int) -> int:
    """The int32 whose bits are the uint32 `value`."""
    return value - 2**32 if value >= 2**31 else value


def _hash32_(h: Tensor, seed: int) -> Tensor:
    """`element_hash` of int32 indices `h` (below 2^31: hi32(i) is 0), in place, as int32 bits;
    one scratch tensor for the shifts (h ^= h >>> s: an arithmetic shift, masked)."""
    h.mul_(_signed(0x9E3779B1)).bitwise_xor_(_signed(seed))
    shifted = torch.empty_like(h)
    for shift, multiplier in ((16, 0x85EBCA6B), (13, 0xC2B2AE35), (16, None)):
        torch.bitwise_right_shift(h, shift, out=shifted).bitwise_and_((1 << (32 - shift)) - 1)
        h.bitwise_xor_(shifted)
        if multiplier is not None:
            h.mul_(_signed(multiplier))
    return h


def keep_mask(shape: tuple[int, int], p: float, seed: int, device=None) -> Tensor:
    """Boolean (M, K) mask of the elements that dropout with probability `p` keeps."""
    return _mask(shape, p, seed, device, keep=True)


def drop_mask(shape: tuple[int, int], p: float, seed: int, device=None) -> Tensor:
    """Boolean (M, K) mask of the elements that dropout with probability `p` zeroes: ~keep_mask."""
    return _mask(shape, p, seed, device, keep=False)


def _mask(shape: tuple[int, int], p: float, seed: int, device, keep: bool) -> Tensor:
    rows, cols = shape
    threshold = drop_threshold(p)
    if rows * cols <= 2**31:  # uint32 h vs threshold, as the int32 comparison of both with the sign bit flipped
        h = _hash32_(torch.arange(rows * cols, dtype=torch.int32, device=device), seed).bitwise_xor_(-(2**31))
        threshold -= 2**31
    else:
        h = element_hash(torch.arange(rows * cols, dtype=torch.int64, device=device), seed)
    return (h >= threshold if keep else h < threshold).view(rows, cols)


def apply_mask(t: Tensor, dropped: Tensor, p: float) -> Tensor:
    """drop(t) for the mask `dropped` (`drop_mask` of t's shape) of dropout probability `p`:
    a new tensor."""
    return (t * (1.0 / (1.0 - p))).masked_fill_(dropped, 0.0)


def apply_dropout(t: Tensor, p: float, seed: int) -> Tensor:
    """drop(t) for a 2-D `t`: masked elements become 0, kept ones are scaled by 1 / (1 - p)."""
    if p == 0.0:
        return t
    return apply_mask(t, drop_mask(tuple(t.shape), p, seed, t.device), p)
