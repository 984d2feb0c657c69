"""The dropout mask: a pure function of (seed, element index), identical in every backend.

For element i of the row-major flattened (M, K) input and a 32-bit seed (docs/design.md §3):

    h    = (lo32(i) · 0x9E3779B1) ^ (hi32(i) · 0x85EBCA77) ^ seed          (mod 2^32)
    h    = fmix32(h)                       (MurmurHash3's finaliser)
    keep = h >= floor(p · 2^32)

Backward regenerates the mask from the seed instead of storing it. Torch has no uint32
arithmetic, so 32-bit products are formed from 16-bit halves in int64 (no overflow).
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


def keep_mask(shape: tuple[int, int], p: float, seed: int, device=None) -> Tensor:
    """Boolean (M, K) mask of the elements that dropout with probability `p` keeps."""
    rows, cols = shape
    index = torch.arange(rows * cols, dtype=torch.int64, device=device).view(rows, cols)
    return element_hash(index, seed) >= drop_threshold(p)


def apply_dropout(t: Tensor, p: float, seed: int) -> Tensor:
    """drop(t) for a 2-D `t`: masked elements become 0, kept ones are scaled by 1 / (1 - p)."""
    if p == 0.0:
        return t
    keep = keep_mask(tuple(t.shape), p, seed, t.device)
    return torch.where(keep, t * (1.0 / (1.0 - p)), torch.zeros((), dtype=t.dtype, device=t.device))
