"""Backward kernels (docs/design.md §1, §4), for g = dL/dy (M, N):

    du = s·g·B  and  dB = s·gᵀ·u      one pass over g                 `lora_grad_u_kernel`
    dx = g·deq(W) + drop'(du·A)       GEMM over N, dequant in the loop  `lora_grad_x_kernel`
    dx = drop'(du·A)                  the cuBLAS regime's LoRA share     `lora_dx_kernel`
    dA = duᵀ·drop(x)                  mask regenerated from the seed    `lora_grad_a_kernel`

du is kept in fp32 (M, r). dB and dA reduce over M: each program writes its own fp32 partial
(summed afterwards, deterministic) or, for dB, adds into one fp32 buffer with atomics.
Nothing here stores a dequantized W or drop(x).
"""

import triton
import triton.language as tl

from .dequant import FP8, INT8, load_weight, row_scale
from .dropout import RUNTIME_INTS, dropped
from .tiling import grouped_tile


@triton.jit
def lora_grad_u_kernel(
    g_ptr, u_ptr, b_ptr, du_ptr, db_ptr, M, N, R, scaling,
    stride_gm, stride_um, stride_bn, stride_dum, stride_dbp, stride_dbn,
    ATOMIC_DB: tl.constexpr, LORA_DOT: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Rows m..m+BLOCK_M: du = s·g·B over all of N, and that block's share of dB = s·gᵀ·u,
    stored as partial `pid` of db (ATOMIC_DB: added into partial 0). Grid: (cdiv(M, BLOCK_M),)."""
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    m_mask = offs_m < M
    r_mask = offs_r < R
    u = tl.load(u_ptr + offs_m[:, None].to(tl.int64) * stride_um + offs_r[None, :],
                mask=m_mask[:, None] & r_mask[None, :], other=0.0).to(LORA_DOT)
    du = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if ATOMIC_DB:
        db_base = db_ptr
    else:
        db_base = db_ptr + pid.to(tl.int64) * stride_dbp
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        g = tl.load(g_ptr + offs_m[:, None].to(tl.int64) * stride_gm + offs_n[None, :],
                    mask=m_mask[:, None] & n_mask[None, :], other=0.0).to(LORA_DOT)
        b = tl.load(b_ptr + offs_n[:, None].to(tl.int64) * stride_bn + offs_r[None, :],
                    mask=n_mask[:, None] & r_mask[None, :], other=0.0)
        du = tl.dot(g, b.to(LORA_DOT), du, input_precision=LORA_PRECISION)
        db = scaling * tl.dot(tl.trans(g), u, input_precision=LORA_PRECISION)
        db_ptrs = db_base + offs_n[:, None].to(tl.int64) * stride_dbn + offs_r[None, :]
        db_mask = n_mask[:, None] & r_mask[None, :]
        if ATOMIC_DB:
            tl.atomic_add(db_ptrs, db, mask=db_mask)
        else:
            tl.store(db_ptrs, db, mask=db_mask)
    tl.store(du_ptr + offs_m[:, None].to(tl.int64) * stride_dum + offs_r[None, :], scaling * du,
             mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def _dropped_du_a(du_ptr, a_ptr, offs_m, m_mask, offs_k, k_mask, K, R, seed, threshold, keep_scale,
                  stride_dum, stride_ar, HAS_DROPOUT: tl.constexpr, LORA_DOT: tl.constexpr,
                  LORA_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr):
    """drop'(du·A) for the (offs_m, offs_k) tile of dx, in fp32: dropout's mask and scale of x."""
    offs_r = tl.arange(0, BLOCK_R)
    r_mask = offs_r < R
    du = tl.load(du_ptr + offs_m[:, None].to(tl.int64) * stride_dum + offs_r[None, :],
                 mask=m_mask[:, None] & r_mask[None, :], other=0.0)
    a = tl.load(a_ptr + offs_r[:, None].to(tl.int64) * stride_ar + offs_k[None, :],
                mask=r_mask[:, None] & k_mask[None, :], other=0.0)
    lora = tl.dot(du.to(LORA_DOT), a.to(LORA_DOT), input_precision=LORA_PRECISION)
    return dropped(lora, offs_m, offs_k, K, seed, threshold, keep_scale, HAS_DROPOUT)


@triton.jit(do_not_specialize=RUNTIME_INTS)
def lora_dx_kernel(
    du_ptr, a_ptr, dx_ptr, M, K, R, seed, threshold, keep_scale, stride_dum, stride_ar, stride_dxm,
    HAS_DROPOUT: tl.constexpr, LORA_DOT: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """dx = drop'(du·A) in dx's dtype: the LoRA share of dx in the cuBLAS regime, onto which
    g·deq(W) is then accumulated (docs/design.md §4). Grid: (cdiv(M, BLOCK_M), cdiv(K, BLOCK_K))."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    k_mask = offs_k < K
    lora = _dropped_du_a(du_ptr, a_ptr, offs_m, m_mask, offs_k, k_mask, K, R, seed, threshold, keep_scale,
                         stride_dum, stride_ar, HAS_DROPOUT, LORA_DOT, LORA_PRECISION, BLOCK_R)
    tl.store(dx_ptr + offs_m[:, None].to(tl.int64) * stride_dxm + offs_k[None, :], lora.to(dx_ptr.dtype.element_ty),
             mask=m_mask[:, None] & k_mask[None, :])


@triton.jit(do_not_specialize=RUNTIME_INTS)
def lora_grad_x_kernel(
    g_ptr, w_ptr, scale_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr,
    du_ptr, a_ptr, dx_ptr, M, N, K, R, seed, threshold, keep_scale,
    stride_gm, stride_wn, stride_dum, stride_ar, stride_dxm,
    M_BUCKET,  # only an autotuning key: the bucketed M
    FMT: tl.constexpr, NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr, K_ALIGNED: tl.constexpr,
    PAIRED: tl.constexpr, HAS_LORA: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    X_DOT: tl.constexpr, X_PRECISION: tl.constexpr, LORA_DOT: tl.constexpr, LORA_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """dx = g·deq(W) + drop'(du·A) for a (BLOCK_M, BLOCK_K) tile, reducing over N in BLOCK_N
    steps. Per-row scales (int8, fp8) scale g's columns. Grid: (cdiv(M, BLOCK_M)·cdiv(K, BLOCK_K),)."""
    pid_m, pid_k = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    k_mask = offs_k < K
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        g = tl.load(g_ptr + offs_m[:, None].to(tl.int64) * stride_gm + offs_n[None, :],
                    mask=m_mask[:, None] & n_mask[None, :], other=0.0)
        if FMT == INT8 or FMT == FP8:
            g = g.to(tl.float32) * row_scale(scale_ptr, offs_n, n_mask, FMT)[None, :]
        w = load_weight(w_ptr, scale_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset_ptr,
                        offs_n, pid_k * BLOCK_K, N, K, stride_wn, FMT, NESTED, BLOCKSIZE, K_ALIGNED, PAIRED, BLOCK_K)
        acc = tl.dot(g.to(X_DOT), w.to(X_DOT), acc, input_precision=X_PRECISION)
    if HAS_LORA:
        acc += _dropped_du_a(du_ptr, a_ptr, offs_m, m_mask, offs_k, k_mask, K, R, seed, threshold, keep_scale,
                             stride_dum, stride_ar, HAS_DROPOUT, LORA_DOT, LORA_PRECISION, BLOCK_R)
    tl.store(dx_ptr + offs_m[:, None].to(tl.int64) * stride_dxm + offs_k[None, :],
             acc.to(dx_ptr.dtype.element_ty), mask=m_mask[:, None] & k_mask[None, :])


@triton.jit(do_not_specialize=RUNTIME_INTS)
def lora_grad_a_kernel(
    du_ptr, x_ptr, da_ptr, M, K, R, seed, threshold, keep_scale,
    stride_dum, stride_xm, stride_xk, stride_dap, stride_dar,
    HAS_DROPOUT: tl.constexpr, LORA_DOT: tl.constexpr, LORA_PRECISION: tl.constexpr,
    SPLIT_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """Partial s of dA[:, k..k+BLOCK_K] = duᵀ·drop(x) over the s-th of SPLIT_M slices of the
    rows, into da[s] (fp32). Grid: (cdiv(K, BLOCK_K), SPLIT_M)."""
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    k_mask = offs_k < K
    r_mask = offs_r < R
    rows_per_split = tl.cdiv(tl.cdiv(M, BLOCK_M), SPLIT_M) * BLOCK_M
    m_begin = pid_s * rows_per_split
    m_end = min(m_begin + rows_per_split, M)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(m_begin, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_mask = offs_m < m_end
        du = tl.load(du_ptr + offs_m[:, None].to(tl.int64) * stride_dum + offs_r[None, :],
                     mask=m_mask[:, None] & r_mask[None, :], other=0.0)
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
        x = dropped(x, offs_m, offs_k, K, seed, threshold, keep_scale, HAS_DROPOUT)
        acc = tl.dot(tl.trans(du).to(LORA_DOT), x.to(LORA_DOT), acc, input_precision=LORA_PRECISION)
    tl.store(da_ptr + pid_s.to(tl.int64) * stride_dap + offs_r[:, None].to(tl.int64) * stride_dar + offs_k[None, :],
             acc, mask=r_mask[:, None] & k_mask[None, :])
