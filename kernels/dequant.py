"""Loading a tile of the frozen weight W (N, K), dequantized in registers (docs/design.md §2).

`FMT` selects the storage: DENSE (returned as stored), INT8 and FP8 (values only, as fp32: the
per-row scale factors out of the K loop and is applied by the caller, see `row_scale`), NF4 / FP4
(4-bit code times its block's absmax, the absmax decoded from nested codes when NESTED). Element
W[n, k] of a 4-bit weight is element i = n·K + k of the flattened weight: nibble (i odd: low,
even: high) of byte i // 2, scaled by absmax[i // BLOCKSIZE]. When K is a multiple of BLOCKSIZE
and the tile's BLOCK_K columns lie in one block per row, one absmax per row serves the tile.
Indices are int64, so weights past 2^31 elements work.
"""

import triton
import triton.language as tl

from fusedlora.contract import FORMAT_IDS

DENSE = tl.constexpr(FORMAT_IDS["dense"])
INT8 = tl.constexpr(FORMAT_IDS["int8"])
FP8 = tl.constexpr(FORMAT_IDS["fp8"])
NF4 = tl.constexpr(FORMAT_IDS["nf4"])
FP4 = tl.constexpr(FORMAT_IDS["fp4"])


@triton.jit
def _block_absmax(block, mask, scale_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr, NESTED: tl.constexpr):
    """fp32 absmax of the (int64) block indices `block`."""
    if NESTED:
        code = tl.load(scale_ptr + block, mask=mask, other=0).to(tl.int32)
        return tl.load(nested_code_ptr + code) * tl.load(nested_absmax_ptr + block // 256, mask=mask, other=0.0) \
            + tl.load(nested_offset_ptr)
    else:
        return tl.load(scale_ptr + block, mask=mask, other=0.0)


@triton.jit
def load_weight(w_ptr, scale_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr,
                offs_n, n_mask, offs_k, k0, mask, K, stride_wn,
                FMT: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr, K_ALIGNED: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """W at the broadcast index tile (offs_n, offs_k), 0 where `mask` is False.

    offs_n / n_mask and offs_k broadcast against each other (e.g. offs_k[:, None] and
    offs_n[None, :] for a (BLOCK_K, BLOCK_N) tile); k0 is the tile's first column. K_ALIGNED
    says K % BLOCKSIZE == 0. For INT8 / FP8 the per-row scale is NOT applied.
    """
    n = offs_n.to(tl.int64)
    if FMT == NF4 or FMT == FP4:
        index = n * K + offs_k
        byte = tl.load(w_ptr + (index >> 1), mask=mask, other=0).to(tl.int32)
        nibble = (byte >> (((index & 1) ^ 1) * 4).to(tl.int32)) & 0xF
        value = tl.load(code_ptr + nibble)  # 0..15: always in range, masked bytes read as code 0
        if K_ALIGNED and BLOCK_K <= BLOCKSIZE:
            absmax = _block_absmax(n * (K // BLOCKSIZE) + k0 // BLOCKSIZE, n_mask, scale_ptr, nested_absmax_ptr,
                                   nested_code_ptr, nested_offset_ptr, NESTED)
        else:
            absmax = _block_absmax(index // BLOCKSIZE, mask, scale_ptr, nested_absmax_ptr, nested_code_ptr,
                                   nested_offset_ptr, NESTED)
        return value * absmax
    elif FMT == DENSE:
        return tl.load(w_ptr + n * stride_wn + offs_k, mask=mask, other=0.0)
    else:
        return tl.load(w_ptr + n * stride_wn + offs_k, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def row_scale(scale_ptr, offs_n, mask, FMT: tl.constexpr):
    """The fp32 factor of rows offs_n for the per-row formats (int8: SCB·(1/127); fp8: scale)."""
    scale = tl.load(scale_ptr + offs_n, mask=mask, other=0.0)
    if FMT == INT8:
        scale = scale * (1.0 / 127.0)
    return scale
