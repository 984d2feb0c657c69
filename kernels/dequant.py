"""Loading a tile of the frozen weight W (N, K), dequantized in registers (docs/design.md §2), and
the kernel that dequantizes all of W into a workspace (the cuBLAS regime, §4).

`FMT` selects the storage: DENSE (returned as stored), INT8 and FP8 (values only, as fp32: the
per-row scale factors out of the K loop and is applied by the caller, see `row_scale`), NF4 / FP4
(4-bit code times its block's absmax, the absmax decoded from nested codes when NESTED). Element
W[n, k] of a 4-bit weight is element i = n·K + k of the flattened weight: nibble (i odd: low,
even: high) of byte i // 2, scaled by absmax[i // BLOCKSIZE]. When K is even, rows start on a
byte and a tile's codes are one contiguous byte tile (PAIRED). When K is a multiple of BLOCKSIZE
and the tile's BLOCK_K columns lie in one block per row, one absmax per row serves the tile.
Indices are int64, so weights past 2^31 elements work.
"""

import triton
import triton.language as tl

from fusedlora.contract import FORMAT_IDS, PAIRS_BF16 as _PAIRS_BF16, PAIRS_FP16 as _PAIRS_FP16, \
    PAIRS_FP32 as _PAIRS_FP32

DENSE = tl.constexpr(FORMAT_IDS["dense"])
INT8 = tl.constexpr(FORMAT_IDS["int8"])
FP8 = tl.constexpr(FORMAT_IDS["fp8"])
NF4 = tl.constexpr(FORMAT_IDS["nf4"])
FP4 = tl.constexpr(FORMAT_IDS["fp4"])
PAIRS_FP32 = tl.constexpr(_PAIRS_FP32)  # where the code table's byte pairs start, in words
PAIRS_BF16 = tl.constexpr(_PAIRS_BF16)
PAIRS_FP16 = tl.constexpr(_PAIRS_FP16)


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
def _fp32_pair_table(code_ptr):
    """The 256 fp32 byte pairs of the code table, one int64 each (the high nibble's value low)."""
    return tl.load((code_ptr + PAIRS_FP32).to(tl.pointer_type(tl.int64), bitcast=True) + tl.arange(0, 256))


@triton.jit
def _fp32_pair_values(pair):
    """An int64 fp32 pair split into (the high nibble's value, the low nibble's), fp32."""
    return (pair & 0xFFFFFFFF).to(tl.int32).to(tl.float32, bitcast=True), \
        (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def four_bit_pairs(w_ptr, scale_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr,
                   offs_n, k0, N, K, stride_wn,
                   NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr, K_ALIGNED: tl.constexpr, BLOCK_K: tl.constexpr):
    """A PAIRED 4-bit tile W[offs_n, k0 : k0 + BLOCK_K] as (even, odd, absmax): the codes of its even
    and odd columns, each (len(offs_n), BLOCK_K/2) fp32, and the absmax that scales both, one per
    row (len(offs_n), 1) when the tile lies in one block per row (K_ALIGNED, BLOCK_K <= BLOCKSIZE),
    else one per byte. The codes of a byte come from one 8-byte load of its (high, low) pair in
    the 256-entry table after the 16 codes (the byte is 0..255, always in range)."""
    n = offs_n.to(tl.int64)[:, None]
    n_mask = (offs_n < N)[:, None]
    offs_byte = k0 // 2 + tl.arange(0, BLOCK_K // 2)
    if K_ALIGNED and BLOCK_K <= BLOCKSIZE:  # BLOCK_K divides K: no tile crosses it
        byte_mask = n_mask & (offs_byte >= 0)[None, :]
    else:
        byte_mask = n_mask & (offs_byte < K // 2)[None, :]
    byte = tl.load(w_ptr + n * stride_wn + offs_byte[None, :], mask=byte_mask, other=0).to(tl.int32)
    if K_ALIGNED and BLOCK_K <= BLOCKSIZE:
        absmax = _block_absmax(n * (K // BLOCKSIZE) + k0 // BLOCKSIZE, n_mask, scale_ptr, nested_absmax_ptr,
                               nested_code_ptr, nested_offset_ptr, NESTED)
    else:  # both nibbles of a byte lie in one block (BLOCKSIZE is even)
        absmax = _block_absmax((n * K + 2 * offs_byte[None, :]) // BLOCKSIZE, byte_mask, scale_ptr,
                               nested_absmax_ptr, nested_code_ptr, nested_offset_ptr, NESTED)
    even, odd = _fp32_pair_values(tl.load((code_ptr + PAIRS_FP32).to(tl.pointer_type(tl.int64), bitcast=True) + byte))
    return even, odd, absmax


@triton.jit
def _columns_of_bytes(x_half):
    """The (BLOCK_K/8, 4) columns of x that meet bytes 0..3 of each 32-bit word, as a tuple of four
    (BLOCK_K/8,) tensors (byte j of word w holds elements 8w + 2j and 8w + 2j + 1)."""
    x02, x13 = tl.split(tl.reshape(x_half, (x_half.shape[0], 2, 2)))
    x0, x2 = tl.split(x02)
    x1, x3 = tl.split(x13)
    return x0, x1, x2, x3


@triton.jit
def _four_bit_words(w_ptr, scale_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr, offs_n, k0, N, K,
                    stride_wn, NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr, BLOCK_K: tl.constexpr):
    """A 4-bit step W[offs_n, k0 : k0 + BLOCK_K] that lies in one absmax block per row, from 4-byte
    aligned storage: its codes as (len(offs_n), BLOCK_K/8) int32 words (16-byte loads: the mask
    is constant along K) and its (len(offs_n), 1) absmax."""
    tl.static_assert(BLOCK_K % 8 == 0, "a step of whole 32-bit words")
    n = offs_n.to(tl.int64)[:, None]
    n_mask = (offs_n < N)[:, None]
    offs_word = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    words = tl.load(w_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + n * (stride_wn // 4) + offs_word[None, :],
                    mask=n_mask & (offs_word >= 0)[None, :], other=0)
    absmax = _block_absmax(n * (K // BLOCKSIZE) + k0 // BLOCKSIZE, n_mask, scale_ptr, nested_absmax_ptr,
                           nested_code_ptr, nested_offset_ptr, NESTED)
    return words, absmax


@triton.jit
def _looked_up_bytes(table, words, BLOCK_K: tl.constexpr):
    """table[byte] for the four bytes of every word (ROWS, BLOCK_K/8), as (ROWS, BLOCK_K/8, 2, 2):
    [..., i, j] holds byte 2i + j. One gather: the table sits in shared memory, so each lookup
    is a 32-bit address folded into the load (a global table costs a 64-bit one per byte)."""
    rows: tl.constexpr = words.shape[0]
    bytes4 = tl.join(tl.join(words & 0xFF, (words >> 16) & 0xFF), tl.join((words >> 8) & 0xFF, (words >> 24) & 0xFF))
    return tl.reshape(tl.gather(table, tl.reshape(bytes4, (rows * (BLOCK_K // 8) * 4,)), 0),
                      (rows, BLOCK_K // 8, 2, 2))


@triton.jit
def four_bit_tile_times_x(w_ptr, scale_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr,
                          x, offs_n, k0, N, K, stride_wn,
                          NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr, BLOCK_K: tl.constexpr):
    """Σ_k W[offs_n, k]·x[k] over k0 <= k < k0 + BLOCK_K, as (len(offs_n), 1) fp32, for a 4-bit step
    as `_four_bit_words` takes it; x is the step's (BLOCK_K,) fp32 values.

    Each byte's fp32 pair meets x's matching columns in one chain of FMAs per word (a reduction
    tree would spend a multiply and an add per element); one absmax per row scales the row's
    sum. docs/design.md §4 counts the instructions."""
    words, absmax = _four_bit_words(w_ptr, scale_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr,
                                    offs_n, k0, N, K, stride_wn, NESTED, BLOCKSIZE, BLOCK_K)
    pairs02, pairs13 = tl.split(_looked_up_bytes(_fp32_pair_table(code_ptr), words, BLOCK_K))
    pair0, pair2 = tl.split(pairs02)
    pair1, pair3 = tl.split(pairs13)
    pairs = (pair0, pair1, pair2, pair3)
    x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_K // 8, 4, 2)))
    x_high = _columns_of_bytes(x_even)
    x_low = _columns_of_bytes(x_odd)
    sums = tl.zeros(words.shape, dtype=tl.float32)
    for j in tl.static_range(4):
        high, low = _fp32_pair_values(pairs[j])
        sums += high * x_high[j][None, :]
        sums += low * x_low[j][None, :]
    return tl.sum(sums, axis=1, keep_dims=True) * absmax


@triton.jit
def four_bit_codes(w_ptr, scale_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr,
                   offs_n, k0, N, K, stride_wn,
                   NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr):
    """A 4-bit step as `_four_bit_words` takes it, as (codes, absmax): the unscaled codes
    (len(offs_n), BLOCK_K) in the MMA's dtype DOT and the (len(offs_n), 1) fp32 absmax that scales
    the step's product. A 16-bit DOT looks each byte up in the table's pairs of that dtype: one
    32-bit word, the MMA operand's two values k and k + 1, with no conversion."""
    words, absmax = _four_bit_words(w_ptr, scale_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr,
                                    offs_n, k0, N, K, stride_wn, NESTED, BLOCKSIZE, BLOCK_K)
    if DOT == tl.float32:
        high, low = _fp32_pair_values(_looked_up_bytes(_fp32_pair_table(code_ptr), words, BLOCK_K))
    else:
        start: tl.constexpr = PAIRS_BF16 if DOT == tl.bfloat16 else PAIRS_FP16
        table = tl.load((code_ptr + start).to(tl.pointer_type(tl.int32), bitcast=True) + tl.arange(0, 256))
        pairs = _looked_up_bytes(table, words, BLOCK_K)
        high = (pairs & 0xFFFF).to(tl.int16).to(DOT, bitcast=True)
        low = (pairs >> 16).to(tl.int16).to(DOT, bitcast=True)
    return tl.reshape(tl.join(high, low), (offs_n.shape[0], BLOCK_K)), absmax


@triton.jit
def load_weight(w_ptr, scale_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr,
                offs_n, k0, N, K, stride_wn,
                FMT: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr, K_ALIGNED: tl.constexpr,
                PAIRED: tl.constexpr, BLOCK_K: tl.constexpr):
    """The tile W[offs_n, k0 : k0 + BLOCK_K] as (len(offs_n), BLOCK_K); rows past N and columns past
    K hold finite values (0, or a masked read's code times absmax) that the caller's masks drop
    (x's or g's zeros, or the store's mask). For INT8 / FP8 the per-row scale is NOT applied; 4-bit
    and per-row values are fp32.

    stride_wn is the row stride of W's storage. K_ALIGNED says K % BLOCKSIZE == 0: a tile with
    BLOCK_K <= BLOCKSIZE then lies in one absmax block per row, and loads one absmax per row.
    PAIRED (4-bit, K even: each row starts on a byte, stride_wn = K/2 bytes): the tile's codes are
    one contiguous (rows, BLOCK_K/2) byte tile, each byte holding two elements (high nibble: the
    even one), decoded by `four_bit_pairs` and interleaved; 16-divisible strides make its loads
    16 bytes wide. Otherwise (odd K) element i = n·K + k is read from byte i // 2 on its own.
    """
    n = offs_n.to(tl.int64)[:, None]
    n_mask = (offs_n < N)[:, None]
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask = n_mask & (offs_k < K)[None, :]
    if FMT == NF4 or FMT == FP4:
        if PAIRED:
            even, odd, absmax = four_bit_pairs(w_ptr, scale_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr,
                                               nested_offset_ptr, offs_n, k0, N, K, stride_wn, NESTED,
                                               BLOCKSIZE, K_ALIGNED, BLOCK_K)
            return tl.reshape(tl.join(even * absmax, odd * absmax), (offs_n.shape[0], BLOCK_K))
        else:
            index = n * K + offs_k[None, :]
            byte = tl.load(w_ptr + (index >> 1), mask=mask, other=0).to(tl.int32)
            absmax = _block_absmax(index // BLOCKSIZE, mask, scale_ptr, nested_absmax_ptr, nested_code_ptr,
                                   nested_offset_ptr, NESTED)
            nibble = (byte >> (((index & 1) ^ 1) * 4).to(tl.int32)) & 0xF
            return tl.load(code_ptr + nibble) * absmax
    elif FMT == DENSE:
        return tl.load(w_ptr + n * stride_wn + offs_k[None, :], mask=mask, other=0.0)
    else:
        return tl.load(w_ptr + n * stride_wn + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def row_scale(scale_ptr, offs_n, mask, FMT: tl.constexpr):
    """The fp32 factor of rows offs_n for the per-row formats (int8: SCB·(1/127); fp8: scale)."""
    scale = tl.load(scale_ptr + offs_n, mask=mask, other=0.0)
    if FMT == INT8:
        scale = scale * (1.0 / 127.0)
    return scale


@triton.jit
def dequantize_kernel(
    w_ptr, scale_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr, out_ptr,
    N, K, stride_wn, stride_on,
    FMT: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr, K_ALIGNED: tl.constexpr,
    PAIRED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[n, k] = deq(W)[n, k] in out's dtype, the per-row scale included: the workspace of the
    cuBLAS regime (docs/design.md §4). Bandwidth-bound: W read once, out written once.
    Grid: (cdiv(N, BLOCK_N), cdiv(K, BLOCK_K))."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    value = load_weight(w_ptr, scale_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr,
                        offs_n, k0, N, K, stride_wn, FMT, NESTED, BLOCKSIZE, K_ALIGNED, PAIRED, BLOCK_K)
    if FMT == INT8 or FMT == FP8:
        value = value * row_scale(scale_ptr, offs_n, offs_n < N, FMT)[:, None]
    tl.store(out_ptr + offs_n.to(tl.int64)[:, None] * stride_on + offs_k[None, :], value.to(out_ptr.dtype.element_ty),
             mask=(offs_n < N)[:, None] & (offs_k < K)[None, :])
