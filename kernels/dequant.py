"""Loading a tile of the frozen weight W (N, K), dequantized in registers (DESIGN §2).

`FMT` selects the storage: DENSE, INT8, FP8 (values only: the per-row scale factors out of the
K loop and is applied by the caller, see `row_scale`), NF4 / FP4 (4-bit codes times their
block's absmax, the absmax decoded from nested codes when NESTED). Element W[n, k] of a 4-bit
weight is element i = n·K + k of the flattened weight: nibble (i odd: low, even: high) of byte
i // 2, scaled by absmax[i // BLOCKSIZE]. Indices are int64 so weights past 2^31 elements work.
"""

import triton
import triton.language as tl

DENSE = tl.constexpr(0)
INT8 = tl.constexpr(1)
FP8 = tl.constexpr(2)
NF4 = tl.constexpr(3)
FP4 = tl.constexpr(4)


@triton.jit
def load_weight(w_ptr, scale_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr,
                offs_n, offs_k, mask, K, stride_wn,
                FMT: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr):
    """fp32 values of W at the broadcast index tile (offs_n, offs_k), 0 where `mask` is False.

    offs_n and offs_k broadcast against each other (e.g. offs_k[:, None] and offs_n[None, :]
    for a (BLOCK_K, BLOCK_N) tile); for INT8 / FP8 the per-row scale is NOT applied.
    """
    n = offs_n.to(tl.int64)
    k = offs_k.to(tl.int64)
    if FMT == NF4 or FMT == FP4:
        index = n * K + k
        byte = tl.load(w_ptr + (index >> 1), mask=mask, other=0).to(tl.int32)
        nibble = (byte >> ((1 - (index & 1)) * 4).to(tl.int32)) & 0xF
        value = tl.load(code_ptr + nibble, mask=mask, other=0.0)
        block = index // BLOCKSIZE
        if NESTED:
            absmax_code = tl.load(scale_ptr + block, mask=mask, other=0).to(tl.int32)
            absmax = tl.load(nested_code_ptr + absmax_code, mask=mask, other=0.0) \
                * tl.load(nested_absmax_ptr + block // 256, mask=mask, other=0.0) + tl.load(nested_offset_ptr)
        else:
            absmax = tl.load(scale_ptr + block, mask=mask, other=0.0)
        return value * absmax
    else:
        return tl.load(w_ptr + n * stride_wn + k, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def row_scale(scale_ptr, offs_n, mask, FMT: tl.constexpr):
    """The fp32 factor of rows offs_n for the per-row formats (int8: SCB·(1/127); fp8: scale)."""
    scale = tl.load(scale_ptr + offs_n, mask=mask, other=0.0)
    if FMT == INT8:
        scale = scale * (1.0 / 127.0)
    return scale
