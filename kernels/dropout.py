"""The dropout keep-mask inside kernels, bit-identical to `fusedlora.dropout` (docs/design.md §3).

keep(i) = fmix32((lo32(i)·0x9E3779B1) ^ (hi32(i)·0x85EBCA77) ^ seed) >= threshold, for the int64
row-major element index i = m·K + k; uint32 arithmetic wraps mod 2^32 as the hash requires.
"""

import triton
import triton.language as tl

# Kernel arguments that change every call (the seed, and the threshold with p): never specialised
# on their values (1, multiples of 16), so a new seed never compiles a new kernel.
RUNTIME_INTS = ["seed", "threshold"]


@triton.jit
def fmix32(h):
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def keep_mask(offs_m, offs_k, K, seed, threshold):
    """Boolean tile: which elements (offs_m[:, None], offs_k[None, :]) of x dropout keeps."""
    index = offs_m.to(tl.int64)[:, None] * K + offs_k.to(tl.int64)[None, :]
    low = (index & 0xFFFFFFFF).to(tl.uint32)
    high = (index >> 32).to(tl.uint32)
    h = fmix32((low * 0x9E3779B1) ^ (high * 0x85EBCA77) ^ seed.to(tl.uint32))
    return h.to(tl.int64) >= threshold


@triton.jit
def dropped(x, offs_m, offs_k, K, seed, threshold, keep_scale, HAS_DROPOUT: tl.constexpr):
    """drop(x) for an fp32 tile x: kept values scaled by 1 / (1 - p), the rest 0."""
    if HAS_DROPOUT:
        x = tl.where(keep_mask(offs_m, offs_k, K, seed, threshold), x * keep_scale, 0.0)
    return x
