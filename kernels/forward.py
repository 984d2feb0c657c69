"""Forward kernels: the LoRA shrink, the fused large-M GEMM, and the one-launch small-M kernel.

    u = drop(x)·Aᵀ                                   (M, r)  `lora_shrink_kernel`
    y = x·deq(W)ᵀ [·row_scale] + bias + s·u·Bᵀ         (M, N)  `lora_forward_kernel`
    both at once, split over K, for M <= 16             `lora_small_m_kernel`
    both at once, split over K, for M = 1, with FMAs    `lora_gemv_kernel`

All accumulate in fp32. x·deq(W)ᵀ runs in x's dtype (fp32: IEEE, not TF32; the small-M kernel's
4-bit word path multiplies the codes in x's dtype and scales the product by the absmax); the LoRA products
run in `LORA_DOT` (x's dtype for 16-bit x, see `fusedlora.backends.triton_launch._dot_args`),
except in the one-row kernel, whose FMAs take every operand in fp32; u is stored in the LoRA
dtype. The LoRA term and the bias are added in the epilogue, so y is written exactly once.
"""

import triton
import triton.language as tl

from .dequant import FP4, FP8, INT8, NF4, four_bit_codes, four_bit_pairs, four_bit_tile_times_x, load_weight, row_scale
from .dropout import RUNTIME_INTS, dropped
from .tiling import grouped_tile


@triton.jit(do_not_specialize=RUNTIME_INTS)
def lora_shrink_kernel(
    x_ptr, a_ptr, u_ptr, x_copy_ptr, M, K, R, stride_xm, stride_xk, stride_ar, stride_um, stride_cm,
    seed, threshold, keep_scale,
    HAS_DROPOUT: tl.constexpr, LORA_DOT: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """u[m, j] = Σ_k drop(x)[m, k]·A[j, k]: one read of x per BLOCK_R adapter rows (all of
    them when r <= BLOCK_R). Unless x_copy_ptr is None, the programs of the first adapter rows
    also copy x into x_copy[:, :K] (the cuBLAS regime's [x | u], docs/design.md §4) from the same
    read. Grid: (cdiv(M, BLOCK_M), cdiv(R, BLOCK_R))."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    m_mask = offs_m < M
    r_mask = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if x_copy_ptr is not None:
            tl.store(x_copy_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_k[None, :], x,
                     mask=m_mask[:, None] & k_mask[None, :] & (tl.program_id(1) == 0))
        x = dropped(x.to(tl.float32), offs_m, offs_k, K, seed, threshold, keep_scale, HAS_DROPOUT)
        a = tl.load(a_ptr + offs_r[None, :].to(tl.int64) * stride_ar + offs_k[:, None],
                    mask=k_mask[:, None] & r_mask[None, :], other=0.0)
        acc = tl.dot(x.to(LORA_DOT), a.to(LORA_DOT), acc, input_precision=LORA_PRECISION)
    tl.store(u_ptr + offs_m[:, None].to(tl.int64) * stride_um + offs_r[None, :],
             acc.to(u_ptr.dtype.element_ty), mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def _accumulate_x_wt(acc, x_ptr, w_ptr, scale_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr,
                     offs_m, m_mask, offs_n, offs_k, k0, k_mask, N, K, stride_xm, stride_xk, stride_wn,
                     FMT: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr, K_ALIGNED: tl.constexpr,
                     PAIRED: tl.constexpr, BLOCK_K: tl.constexpr, X_DOT: tl.constexpr, X_PRECISION: tl.constexpr,
                     W_ROWS_FIRST: tl.constexpr, WORD_ALIGNED: tl.constexpr):
    """One K step of x·deq(W)ᵀ: acc += x[offs_m, offs_k]·W[offs_n, offs_k]ᵀ, or with W_ROWS_FIRST
    its transpose, acc (BLOCK_N, BLOCK_M) += W·xᵀ (W's rows span the MMA's M dimension: what a few
    rows of x need). Returns (acc, the x tile). k_mask may end before K (a split-K slice); W's tile
    is masked at K, and x's zeros cover the rest."""
    x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk,
                mask=m_mask[:, None] & k_mask[None, :], other=0.0)
    if W_ROWS_FIRST and (FMT == NF4 or FMT == FP4) and PAIRED and K_ALIGNED and BLOCK_K <= BLOCKSIZE:
        # One absmax per row: it scales the step's (BLOCK_N, BLOCK_M) product, not each code.
        if WORD_ALIGNED:
            codes, absmax = four_bit_codes(w_ptr, scale_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr,
                                           nested_offset_ptr, offs_n, k0, N, K, stride_wn, NESTED, BLOCKSIZE,
                                           BLOCK_K, X_DOT)
        else:
            even, odd, absmax = four_bit_pairs(w_ptr, scale_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr,
                                               nested_offset_ptr, offs_n, k0, N, K, stride_wn, NESTED, BLOCKSIZE,
                                               K_ALIGNED, BLOCK_K)
            codes = tl.reshape(tl.join(even, odd), (offs_n.shape[0], BLOCK_K)).to(X_DOT)
        acc += tl.dot(codes, tl.trans(x.to(X_DOT)), input_precision=X_PRECISION) * absmax
        return acc, x
    w = load_weight(w_ptr, scale_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr,
                    offs_n, k0, N, K, stride_wn, FMT, NESTED, BLOCKSIZE, K_ALIGNED, PAIRED, BLOCK_K)
    if W_ROWS_FIRST:
        acc = tl.dot(w.to(X_DOT), tl.trans(x.to(X_DOT)), acc, input_precision=X_PRECISION)
    else:
        acc = tl.dot(x.to(X_DOT), tl.trans(w.to(X_DOT)), acc, input_precision=X_PRECISION)
    return acc, x


@triton.jit
def _scaled_plus_bias(acc, scale_ptr, bias_ptr, offs_n, n_mask, FMT: tl.constexpr):
    """acc·row_scale + bias for a (rows, len(offs_n)) tile of y; bias_ptr is None (a compile-time
    constant) when the layer has no bias."""
    if FMT == INT8 or FMT == FP8:
        acc = acc * row_scale(scale_ptr, offs_n, n_mask, FMT)[None, :]
    if bias_ptr is not None:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _lora_epilogue(acc, u, b_ptr, scale_ptr, bias_ptr, offs_n, n_mask, offs_r, r_mask, scaling, stride_bn,
                   FMT: tl.constexpr, HAS_LORA: tl.constexpr, LORA_DOT: tl.constexpr, LORA_PRECISION: tl.constexpr):
    """acc·row_scale + bias + s·u·Bᵀ for a (BLOCK_M, BLOCK_N) tile; u is (BLOCK_M, BLOCK_R)."""
    acc = _scaled_plus_bias(acc, scale_ptr, bias_ptr, offs_n, n_mask, FMT)
    if HAS_LORA:
        b = tl.load(b_ptr + offs_n[None, :].to(tl.int64) * stride_bn + offs_r[:, None],
                    mask=r_mask[:, None] & n_mask[None, :], other=0.0)
        acc += scaling * tl.dot(u.to(LORA_DOT), b.to(LORA_DOT), input_precision=LORA_PRECISION)
    return acc


@triton.jit
def lora_forward_kernel(
    x_ptr, w_ptr, scale_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr,
    u_ptr, b_ptr, bias_ptr, y_ptr,
    M, N, K, R, scaling, stride_xm, stride_xk, stride_wn, stride_um, stride_bn, stride_ym,
    M_BUCKET,  # only an autotuning key: the bucketed M
    FMT: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr, K_ALIGNED: tl.constexpr,
    PAIRED: tl.constexpr, HAS_LORA: tl.constexpr,
    X_DOT: tl.constexpr, X_PRECISION: tl.constexpr, LORA_DOT: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """y = x·deq(W)ᵀ + bias + s·u·Bᵀ, W dequantized tile by tile in the K loop; u from the
    shrink kernel. Grid: (cdiv(M, BLOCK_M)·cdiv(N, BLOCK_N),), grouped along M so that
    consecutive programs share W tiles in L2. Needs R <= BLOCK_R."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    m_mask = offs_m < M
    n_mask = offs_n < N
    r_mask = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        acc, x = _accumulate_x_wt(acc, x_ptr, w_ptr, scale_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr,
                                  nested_offset_ptr, offs_m, m_mask, offs_n, offs_k, k0, offs_k < K, N, K,
                                  stride_xm, stride_xk, stride_wn, FMT, NESTED, BLOCKSIZE, K_ALIGNED, PAIRED,
                                  BLOCK_K, X_DOT, X_PRECISION, False, False)

    u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if HAS_LORA:
        u = tl.load(u_ptr + offs_m[:, None].to(tl.int64) * stride_um + offs_r[None, :],
                    mask=m_mask[:, None] & r_mask[None, :], other=0.0)
    acc = _lora_epilogue(acc, u, b_ptr, scale_ptr, bias_ptr, offs_n, n_mask, offs_r, r_mask, scaling, stride_bn,
                         FMT, HAS_LORA, LORA_DOT, LORA_PRECISION)
    tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _sum_of_slices(acc, u, partial_ptr, u_partial_ptr, counter_ptr, pid_n, pid_k, offs_m, offs_n, offs_r,
                   y_mask, u_mask, M, N, R, SPLIT_K: tl.constexpr):
    """The split-K reduction inside the launch (docs/design.md §4): every program stores its
    slice's fp32 partial y tile and u, then counts itself in on its column's counter; the program
    that arrives last sums the SPLIT_K slices in slice order (the same sums whatever the arrival
    order) and resets the counter for the next call. Returns (last, acc, u): only `last` is the
    column's sum. The barrier before the counter orders all of the program's stores before its
    release; the partials are read past L1 (.cg), which is not coherent across SMs."""
    tile = offs_m[:, None].to(tl.int64) * N + offs_n[None, :]
    lora = offs_m[:, None].to(tl.int64) * R + offs_r[None, :]
    column = (pid_n * SPLIT_K).to(tl.int64) * M * R
    slice_elements = (tl.zeros((), dtype=tl.int64) + M) * N  # M·N in 64 bits (M may be a literal 1)
    tl.store(partial_ptr + pid_k * slice_elements + tile, acc, mask=y_mask)
    tl.store(u_partial_ptr + column + pid_k * M * R + lora, u, mask=u_mask)
    tl.debug_barrier()
    last = tl.atomic_add(counter_ptr + pid_n, 1, sem="acq_rel") == SPLIT_K - 1
    if last:
        acc = tl.zeros_like(acc)
        u = tl.zeros_like(u)
        for s in tl.static_range(SPLIT_K):
            acc += tl.load(partial_ptr + s * slice_elements + tile, mask=y_mask, other=0.0, cache_modifier=".cg")
            u += tl.load(u_partial_ptr + column + s * M * R + lora, mask=u_mask, other=0.0, cache_modifier=".cg")
        tl.store(counter_ptr + pid_n, 0)
    return last, acc, u


@triton.jit(do_not_specialize=RUNTIME_INTS)
def lora_small_m_kernel(
    x_ptr, w_ptr, scale_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr,
    a_ptr, b_ptr, bias_ptr, y_ptr, u_ptr, partial_ptr, u_partial_ptr, counter_ptr,
    M, N, K, R, scaling, seed, threshold, keep_scale,
    stride_xm, stride_xk, stride_wn, stride_ar, stride_bn, stride_ym, stride_um,
    FMT: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr, K_ALIGNED: tl.constexpr,
    PAIRED: tl.constexpr, WORD_ALIGNED: tl.constexpr, HAS_LORA: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    X_DOT: tl.constexpr, X_PRECISION: tl.constexpr, LORA_DOT: tl.constexpr, LORA_PRECISION: tl.constexpr,
    SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """Small M (all rows in one BLOCK_M): y and u in one launch, the weight read once.

    Program (n, s) takes columns n·BLOCK_N.. and the s-th of SPLIT_K slices of K, multiplying
    deq(W)·xᵀ so that the MMA's M dimension is W's BLOCK_N rows, not x's few; it forms its
    slice's share of u too. With SPLIT_K > 1 the slices meet in the launch's last program of
    each column (`_sum_of_slices`), through partial_ptr (SPLIT_K, M, N), u_partial_ptr
    (cdiv(N, BLOCK_N), SPLIT_K, M, R), both fp32, and counter_ptr (cdiv(N, BLOCK_N),) int32,
    zero before the launch and zero again after it; that program adds the epilogue and stores y
    and u. Grid: (cdiv(N, BLOCK_N), SPLIT_K). Needs M <= BLOCK_M and R <= BLOCK_R.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    m_mask = offs_m < M
    n_mask = offs_n < N
    r_mask = offs_r < R
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_begin = pid_k * k_per_split
    k_end = min(k_begin + k_per_split, K)
    acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    u = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_end
        acc_t, x = _accumulate_x_wt(acc_t, x_ptr, w_ptr, scale_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr,
                                    nested_offset_ptr, offs_m, m_mask, offs_n, offs_k, k0, k_mask, N, K,
                                    stride_xm, stride_xk, stride_wn, FMT, NESTED, BLOCKSIZE, K_ALIGNED, PAIRED,
                                    BLOCK_K, X_DOT, X_PRECISION, True, WORD_ALIGNED)
        if HAS_LORA:
            x_dropped = dropped(x.to(tl.float32), offs_m, offs_k, K, seed, threshold, keep_scale, HAS_DROPOUT)
            a = tl.load(a_ptr + offs_r[None, :].to(tl.int64) * stride_ar + offs_k[:, None],
                        mask=k_mask[:, None] & r_mask[None, :], other=0.0)
            u = tl.dot(x_dropped.to(LORA_DOT), a.to(LORA_DOT), u, input_precision=LORA_PRECISION)

    acc = tl.trans(acc_t)
    y_mask = m_mask[:, None] & n_mask[None, :]
    u_mask = m_mask[:, None] & r_mask[None, :]
    last = True
    if SPLIT_K > 1:
        last, acc, u = _sum_of_slices(acc, u, partial_ptr, u_partial_ptr, counter_ptr, pid_n, pid_k, offs_m,
                                      offs_n, offs_r, y_mask, u_mask, M, N, R, SPLIT_K)
    if last:
        u_rounded = u.to(u_ptr.dtype.element_ty)  # u rounded to the LoRA dtype, as the reference keeps it
        acc = _lora_epilogue(acc, u_rounded, b_ptr, scale_ptr, bias_ptr, offs_n, n_mask, offs_r, r_mask, scaling,
                             stride_bn, FMT, HAS_LORA, LORA_DOT, LORA_PRECISION)
        tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :],
                 acc.to(y_ptr.dtype.element_ty), mask=y_mask)
        tl.store(u_ptr + offs_m[:, None].to(tl.int64) * stride_um + offs_r[None, :], u_rounded,
                 mask=u_mask & (pid_n == 0))


@triton.jit
def _row_times_x(w_ptr, scale_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr, x_ptr,
                 offs_n, k0, k_end, N, K, stride_wn, stride_xk,
                 FMT: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr, K_ALIGNED: tl.constexpr,
                 PAIRED: tl.constexpr, WORD_ALIGNED: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """Σ_k W[offs_n, k]·x[k] over k0 <= k < min(k0 + BLOCK_K, k_end), as (len(offs_n), 1) fp32, and
    the x tile (BLOCK_K,) fp32. A 4-bit step in one absmax block per row, from word-aligned
    storage, is `four_bit_tile_times_x`; another PAIRED 4-bit tile multiplies its even and odd codes by x's even
    and odd columns (no interleave), and one absmax per row scales the row's sum, not each code."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    if EVEN_K:  # no tile crosses K or a slice's end
        x = tl.load(x_ptr + offs_k * stride_xk).to(tl.float32)
    else:
        x = tl.load(x_ptr + offs_k * stride_xk, mask=offs_k < k_end, other=0.0).to(tl.float32)
    if (FMT == NF4 or FMT == FP4) and PAIRED and K_ALIGNED and BLOCK_K <= BLOCKSIZE and WORD_ALIGNED:
        return four_bit_tile_times_x(w_ptr, scale_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr,
                                     x, offs_n, k0, N, K, stride_wn, NESTED, BLOCKSIZE, BLOCK_K), x
    if (FMT == NF4 or FMT == FP4) and PAIRED:
        x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_K // 2, 2)))
        even, odd, absmax = four_bit_pairs(w_ptr, scale_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr,
                                           nested_offset_ptr, offs_n, k0, N, K, stride_wn, NESTED, BLOCKSIZE,
                                           K_ALIGNED, BLOCK_K)
        products = even * x_even[None, :] + odd * x_odd[None, :]
        if K_ALIGNED and BLOCK_K <= BLOCKSIZE:
            return tl.sum(products, axis=1, keep_dims=True) * absmax, x
        return tl.sum(products * absmax, axis=1, keep_dims=True), x
    w = load_weight(w_ptr, scale_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr,
                    offs_n, k0, N, K, stride_wn, FMT, NESTED, BLOCKSIZE, K_ALIGNED, PAIRED, BLOCK_K)
    return tl.sum(w.to(tl.float32) * x[None, :], axis=1, keep_dims=True), x


@triton.jit(do_not_specialize=RUNTIME_INTS)
def lora_gemv_kernel(
    x_ptr, w_ptr, scale_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr,
    a_ptr, b_ptr, bias_ptr, y_ptr, u_ptr, partial_ptr, u_partial_ptr, counter_ptr,
    N, K, R, scaling, seed, threshold, keep_scale, stride_xk, stride_wn, stride_ar, stride_bn,
    FMT: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr, K_ALIGNED: tl.constexpr,
    PAIRED: tl.constexpr, WORD_ALIGNED: tl.constexpr, HAS_LORA: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    EVEN_K: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """One row of x (M = 1, decode): y = x·deq(W)ᵀ [·row_scale] + bias + s·u·Bᵀ and u = drop(x)·Aᵀ
    in one launch, with fp32 FMAs (no MMA has a dimension of 1), the weight read once.

    Program (n, s) takes rows n·BLOCK_N.. of W and the s-th of SPLIT_K slices of K; each K step
    sums its W tile times x along K per row, and adds x times A's tile into u's partial products.
    The slices meet in each column's last program (`_sum_of_slices`; partial_ptr (SPLIT_K, N),
    u_partial_ptr (cdiv(N, BLOCK_N), SPLIT_K, R), counter_ptr as there), which adds the epilogue.
    EVEN_K says BLOCK_K divides K; WORD_ALIGNED that W's storage starts on 4 bytes (a 4-bit W is
    then read as words, `four_bit_tile_times_x`). Grid: (cdiv(N, BLOCK_N), SPLIT_K). Needs R <= BLOCK_R.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    row = tl.arange(0, 1)
    n_mask = offs_n < N
    r_mask = offs_r < R
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_begin = pid_k * k_per_split
    k_end = min(k_begin + k_per_split, K)
    acc = tl.zeros((BLOCK_N, 1), dtype=tl.float32)
    u_products = tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        partial, x = _row_times_x(w_ptr, scale_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr,
                                  x_ptr, offs_n, k0, k_end, N, K, stride_wn, stride_xk, FMT, NESTED, BLOCKSIZE,
                                  K_ALIGNED, PAIRED, WORD_ALIGNED, EVEN_K, BLOCK_K)
        acc += partial
        if HAS_LORA:
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x_dropped = dropped(x[None, :], row, offs_k, K, seed, threshold, keep_scale, HAS_DROPOUT)
            a = tl.load(a_ptr + offs_r[None, :].to(tl.int64) * stride_ar + offs_k[:, None],
                        mask=(offs_k < k_end)[:, None] & r_mask[None, :], other=0.0)
            u_products += tl.reshape(x_dropped, (BLOCK_K, 1)) * a.to(tl.float32)

    acc = tl.reshape(acc, (1, BLOCK_N))
    u = tl.sum(u_products, axis=0, keep_dims=True)
    y_mask = n_mask[None, :]
    u_mask = r_mask[None, :]
    last = True
    if SPLIT_K > 1:
        last, acc, u = _sum_of_slices(acc, u, partial_ptr, u_partial_ptr, counter_ptr, pid_n, pid_k, row, offs_n,
                                      offs_r, y_mask, u_mask, 1, N, R, SPLIT_K)
    if last:
        u = u.to(u_ptr.dtype.element_ty).to(tl.float32)  # u rounded to the LoRA dtype, as the reference keeps it
        acc = _scaled_plus_bias(acc, scale_ptr, bias_ptr, offs_n, n_mask, FMT)
        if HAS_LORA:  # s·u·Bᵀ with FMAs: u has one row
            b = tl.load(b_ptr + offs_n[:, None].to(tl.int64) * stride_bn + offs_r[None, :],
                        mask=n_mask[:, None] & r_mask[None, :], other=0.0)
            acc += scaling * tl.reshape(tl.sum(b.to(tl.float32) * u, axis=1), (1, BLOCK_N))
        tl.store(y_ptr + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=y_mask)
        tl.store(u_ptr + offs_r[None, :], u.to(u_ptr.dtype.element_ty), mask=u_mask & (pid_n == 0))
