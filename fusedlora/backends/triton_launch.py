"""Launchers of the Triton backend (host glue): allocate, grid, launch the kernels of kernels/.

`forward` and `backward` have the signatures of `fusedlora.backends.reference.forward/backward`;
`fusedlora.backends.triton.why_not` has already accepted the problem. Kernels are chosen by M:
M <= 16 takes the one-launch small-M kernel; larger M runs in one of two regimes (docs/design.md
§4, `regimes.large_m_regime`): "fused", the shrink plus the GEMM that dequantizes W in its loop, or
"workspace", W dequantized into a 16-bit workspace and multiplied by cuBLAS (torch.mm / addmm)
with the LoRA term folded into the same GEMM. Under
TRITON_INTERPRET=1 (read when Triton compiles the kernels, at import) CPU tensors run through
the interpreter. Importing this module imports Triton.

Under `recording(...)` the launchers run on meta tensors and record each launch (kernel,
arguments, options; a cuBLAS GEMM as a `LibraryGemm`) instead of running it, for a GPU named by
its capability and SM count: the cost model (`fusedlora.inspection`) compiles exactly what a
launch would compile.
"""

import contextlib
import contextvars
import functools
import os
import threading
from dataclasses import dataclass, field
from typing import Optional

import torch
import triton
import triton.language as tl

from ..contract import FORMAT_IDS, WeightArgs, lora_dtype
from ..dropout import drop_threshold
from ..formats import FrozenWeight
from ..kernels import configs
from ..kernels.backward import lora_dx_kernel, lora_grad_a_kernel, lora_grad_u_kernel, lora_grad_x_kernel
from ..kernels.dequant import dequantize_kernel
from ..kernels.forward import lora_forward_kernel, lora_gemv_kernel, lora_shrink_kernel, lora_small_m_kernel
from .regimes import SMALL_M, large_m_regime, products_in_x_dtype

INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
# One caller launches at a time: Triton's autotuner and its interpreter keep per-kernel state that
# concurrent calls would corrupt. Launches are asynchronous, so the lock costs only host time.
_LAUNCH_LOCK = threading.RLock()


def _weight_constexprs(w: WeightArgs, k: int) -> dict:
    """The compile-time description of the weight that `load_weight` specializes on."""
    return dict(FMT=w.fmt, NESTED=w.nested, BLOCKSIZE=w.blocksize, K_ALIGNED=k % w.blocksize == 0,
                PAIRED=_paired(w, k))


def _paired(w: WeightArgs, k: int) -> bool:
    """Whether the 4-bit rows start on a byte (K even): their codes are then read as byte tiles."""
    return configs.is_four_bit(w.fmt) and k % 2 == 0


def _stride_wn(w: WeightArgs, k: int) -> int:
    """The row stride of W's storage as `load_weight` takes it: K/2 bytes for 4-bit rows that
    start on a byte, else the format's own (0 for 4-bit: a flat index)."""
    return k // 2 if _paired(w, k) else w.stride_n


def _dot_args(x_dtype: torch.dtype, adapter_dtypes: tuple) -> dict:
    """Operand dtypes of the products. x·Wᵀ runs in x's dtype. The LoRA products run on the
    tensor cores in x's dtype when x is 16-bit and the adapters are that dtype or fp32 (fp32
    adapters are rounded to it: an error below the 16-bit output's own rounding); otherwise in
    the LoRA dtype. fp32 products are IEEE fp32, never TF32. Accumulation is always fp32."""
    compute = lora_dtype(x_dtype, *adapter_dtypes)
    lora = x_dtype if products_in_x_dtype(x_dtype, adapter_dtypes) else compute
    return dict(X_DOT=_TL_DTYPES[x_dtype], X_PRECISION="ieee" if x_dtype == torch.float32 else "tf32",
                LORA_DOT=_TL_DTYPES[lora], LORA_PRECISION="ieee" if lora == torch.float32 else "tf32")


def _dropout_args(dropout_p: float, seed: int) -> dict:
    return dict(seed=seed, threshold=drop_threshold(dropout_p), keep_scale=1.0 / (1.0 - dropout_p))


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """Every buffer a kernel must fill entirely is allocated here (tests poison it)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _on(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _capability() -> tuple[int, int]:
    """The compute capability the launches target: the recorded GPU's, the current CUDA device's,
    or under the interpreter Hopper's (its configs are the interpreter's own anyway)."""
    record = _RECORDING.get()
    if record:
        return record.capability
    return (9, 0) if INTERPRETING else torch.cuda.get_device_capability()


def _sm_count(device: torch.device) -> int:
    record = _RECORDING.get()
    if record:
        return record.sm_count
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _reduce_with_atomics() -> bool:
    """Reductions over M with fp32 atomics (faster, not bitwise reproducible) unless torch asks for determinism."""
    if torch.are_deterministic_algorithms_enabled():
        return False
    return configs.INTERPRETER["atomics"] if INTERPRETING else True


@dataclass(frozen=True)
class Launch:
    """One recorded kernel launch: `kernel[grid](*args, **kwargs)`; kwargs hold the constexprs and
    num_warps / num_stages; `candidate` numbers the autotuning candidate (None: not autotuned)."""

    kernel: object
    grid: tuple
    args: tuple
    kwargs: dict
    candidate: Optional[int] = None


@dataclass(frozen=True)
class LibraryGemm:
    """One recorded cuBLAS GEMM of the workspace regime: (m, k)·(k, n) in 16 bits, reading and
    writing `bytes_moved` (an accumulated or bias output counts as read too)."""

    m: int
    n: int
    k: int
    bytes_moved: int


@dataclass
class Recording:
    capability: tuple[int, int]
    sm_count: int
    launches: list = field(default_factory=list)


_RECORDING: contextvars.ContextVar[Optional[Recording]] = contextvars.ContextVar("fusedlora_recording", default=None)


@contextlib.contextmanager
def recording(capability: tuple[int, int], sm_count: int):
    """Record the launches of the calls inside (on meta tensors) as a GPU of `capability` with
    `sm_count` SMs would run them: its autotuning candidates, its heuristic configs."""
    if INTERPRETING:
        raise RuntimeError("unset TRITON_INTERPRET to record launches: interpreted kernels cannot be compiled")
    record = Recording(capability, sm_count)
    token = _RECORDING.set(record)
    try:
        yield record
    finally:
        _RECORDING.reset(token)


def _matmul(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias=None, accumulate: bool = False) -> None:
    """out (m, n) = a (m, k)·b (k, n) [+ bias (n,)] [+ out when `accumulate`], on cuBLAS through torch."""
    record = _RECORDING.get()
    if record is not None:
        operands = [a, b, out] + ([out] if accumulate else []) + ([bias] if bias is not None else [])
        record.launches.append(LibraryGemm(a.shape[0], b.shape[1], a.shape[1],
                                           sum(t.numel() * t.element_size() for t in operands)))
        return
    with torch.autocast(out.device.type, enabled=False):
        if accumulate:
            out.addmm_(a, b)
        elif bias is not None:
            torch.addmm(bias.to(out.dtype), a, b, out=out)
        else:
            torch.mm(a, b, out=out)


def _run(kernel, grid, *args, **kwargs) -> None:
    record = _RECORDING.get()
    if record is None:
        kernel[grid](*args, **kwargs)
    else:
        record.launches.append(Launch(kernel, tuple(grid), args, kwargs))


@functools.lru_cache(maxsize=None)
def _autotuned(kernel, capability: tuple[int, int], four_bit: bool):
    return triton.autotune(configs=configs.gemm_candidates(capability, four_bit), key=configs.AUTOTUNE_KEY)(kernel)


def _launch_gemm(kernel, tiles_of, device, *args, **kwargs):
    """Launch a GEMM-shaped kernel: autotuned on a GPU, the interpreter's config on the CPU."""
    record = _RECORDING.get()
    if INTERPRETING:
        meta = configs.INTERPRETER["gemm"]
        kernel[(tiles_of(meta),)](*args, **kwargs, **meta)
    elif record:
        candidates = configs.gemm_candidates(record.capability, configs.is_four_bit(kwargs["FMT"]))
        for index, config in enumerate(candidates):
            options = dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
            record.launches.append(Launch(kernel, (tiles_of(config.kwargs),), args, {**kwargs, **options}, index))
    else:
        tuned = _autotuned(kernel, torch.cuda.get_device_capability(device), configs.is_four_bit(kwargs["FMT"]))
        tuned[lambda meta: (tiles_of(meta),)](*args, **kwargs)


def _skinny(name: str, config: configs.SkinnyConfig) -> tuple[dict, dict]:
    """(meta, launch options) of a heuristic config, or the interpreter's."""
    chosen = configs.INTERPRETER[name] if INTERPRETING else config
    return chosen.meta, ({} if INTERPRETING else dict(num_warps=chosen.num_warps, num_stages=chosen.num_stages))


def forward(x, weight: FrozenWeight, lora_A, lora_B, scaling, bias, dropout_p, seed):
    """x (M, K), lora_A (r, K), lora_B (N, r), bias (N,) or None → y (M, N), u (M, r)."""
    with _LAUNCH_LOCK, _on(x.device):
        return _forward(x, weight, lora_A, lora_B, scaling, bias, dropout_p, seed)


def _forward(x, weight, lora_A, lora_B, scaling, bias, dropout_p, seed):
    x, lora_A, lora_B = _rows_contiguous(x), _rows_contiguous(lora_A), _rows_contiguous(lora_B)
    (m, k), n, r = x.shape, weight.shape[0], lora_A.shape[0]
    compute = lora_dtype(x.dtype, lora_A.dtype, lora_B.dtype)
    y = new_output((m, n), x.dtype, x.device)
    u = new_output((m, r), compute, x.device)
    if m == 0:
        return y, u
    has_lora = scaling != 0.0
    w = weight.kernel_args()
    block_r = configs.padded_rank(r)
    constexprs = dict(**_weight_constexprs(w, k), HAS_LORA=has_lora, BLOCK_R=block_r,
                      **_dot_args(x.dtype, (lora_A.dtype, lora_B.dtype)))
    if m <= SMALL_M:
        return _forward_small_m(x, w, lora_A, lora_B, bias, y, u, scaling, dropout_p, seed, constexprs)
    if _regime(m, w.fmt, constexprs) == "workspace":
        return _forward_workspace(x, w, lora_A, lora_B, bias, y, u, scaling, dropout_p, seed, constexprs)

    if has_lora:
        _shrink(x, lora_A, u, None, dropout_p, seed, constexprs)
    else:
        u.zero_()
    _launch_gemm(lora_forward_kernel,
                 lambda meta: triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), x.device,
                 x, *w.pointers, u, lora_B, bias, y, m, n, k, r, float(scaling),
                 x.stride(0), x.stride(1), _stride_wn(w, k), u.stride(0), lora_B.stride(0), y.stride(0),
                 configs.m_bucket(m), **constexprs)
    return y, u


def _regime(m: int, fmt_id: int, dots: dict) -> str:
    """The large-M regime of a call of M rows (`regimes.large_m_regime`). The workspace regime
    multiplies in x's dtype on cuBLAS: fp32 x stays fused (cuBLAS may take fp32 as TF32, the
    kernels never do), and so do LoRA products outside x's dtype, which cannot share its GEMM."""
    possible = dots["X_DOT"] != tl.float32 and dots["LORA_DOT"] == dots["X_DOT"]
    fmt = next(name for name, number in FORMAT_IDS.items() if number == fmt_id)
    return large_m_regime(m, fmt, _capability(), possible)


def _shrink(x, lora_A, u, x_copy, dropout_p, seed, dots) -> None:
    """u = drop(x)·Aᵀ; x also copied into x_copy[:, :K] unless x_copy is None."""
    (m, k), r = x.shape, u.shape[1]
    shrink_r = min(configs.padded_rank(r), 128)
    meta, options = _skinny("shrink", configs.shrink_config(m, shrink_r))
    grid = (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(r, shrink_r))
    _run(lora_shrink_kernel, grid, x, lora_A, u, x_copy, m, k, r, x.stride(0), x.stride(1), lora_A.stride(0),
         u.stride(0), 0 if x_copy is None else x_copy.stride(0), **_dropout_args(dropout_p, seed),
         HAS_DROPOUT=dropout_p > 0.0, LORA_DOT=dots["LORA_DOT"], LORA_PRECISION=dots["LORA_PRECISION"],
         BLOCK_R=shrink_r, **meta, **options)


def _cublas_operand(rows: int, columns: int, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised (rows, columns) matrix whose rows start 16 bytes apart, as cuBLAS's fast
    paths want: a column slice of a buffer padded to a multiple of 8 columns. On the CPU (the
    interpreter's tensors) the padding is zeroed: torch's oneDNN matmul may read a view's padding
    there (seen on AMX machines: a NaN in it, multiplied by zero, poisons the row)."""
    buffer = new_output((rows, triton.cdiv(columns, 8) * 8), dtype, device)
    if buffer.device.type == "cpu":
        buffer[:, columns:].zero_()
    return buffer[:, :columns]


def _weight_matrix(w: WeightArgs, n: int, k: int, dtype: torch.dtype, extra_columns: int, device) -> torch.Tensor:
    """deq(W) (N, K) as a `dtype` matrix with `extra_columns` more columns after K, left for the
    caller: the stored weight itself when it is dense in `dtype` and no columns are asked for,
    else a workspace (`_cublas_operand`) that `dequantize_kernel` fills."""
    if w.fmt == FORMAT_IDS["dense"] and w.data.dtype == dtype and not extra_columns:
        return w.data
    workspace = _cublas_operand(n, k + extra_columns, dtype, device)
    meta, options = _skinny("dequantize", configs.dequantize_config(w.fmt, w.blocksize))
    grid = (triton.cdiv(n, meta["BLOCK_N"]), triton.cdiv(k, meta["BLOCK_K"]))
    _run(dequantize_kernel, grid, *w.pointers, workspace, n, k, _stride_wn(w, k), workspace.stride(0),
         **_weight_constexprs(w, k), **meta, **options)
    return workspace


def _forward_workspace(x, w: WeightArgs, lora_A, lora_B, bias, y, u, scaling, dropout_p, seed, constexprs):
    """The workspace regime: y = [x | u]·[deq(W) | s·B]ᵀ + bias, one cuBLAS GEMM over K + r. The
    shrink writes x into [x | u] from the read that forms u."""
    (m, k), n, r = x.shape, y.shape[1], u.shape[1]
    if not constexprs["HAS_LORA"]:
        u.zero_()
        _matmul(y, x, _weight_matrix(w, n, k, x.dtype, 0, x.device).t(), bias)
        return y, u
    weight_ext = _weight_matrix(w, n, k, x.dtype, r, x.device)
    x_ext = _cublas_operand(m, k + r, x.dtype, x.device)
    _shrink(x, lora_A, u, x_ext, dropout_p, seed, constexprs)
    x_ext[:, k:].copy_(u)
    weight_ext[:, k:].copy_(lora_B * scaling)
    _matmul(y, x_ext, weight_ext.t(), bias)
    return y, u


def _forward_small_m(x, w: WeightArgs, lora_A, lora_B, bias, y, u, scaling, dropout_p, seed, constexprs):
    """One launch: `lora_gemv_kernel` for one row of a quantized W, else `lora_small_m_kernel`;
    either reduces its K slices itself (deterministically, in slice order), in a scratch that
    `_split_k_scratch` keeps across calls."""
    (m, k), n, r = x.shape, y.shape[1], u.shape[1]
    gemv = m == 1 and w.fmt != FORMAT_IDS["dense"]  # a dense row is read at bandwidth by the MMA kernel already
    if gemv:
        heuristic, split_k = configs.gemv_config(n, k, _sm_count(x.device), w.fmt, w.blocksize, constexprs["BLOCK_R"])
    else:
        heuristic, split_k = configs.small_m_config(n, k, _sm_count(x.device), w.fmt, w.blocksize,
                                                    constexprs["BLOCK_R"], x.dtype != torch.float32)
    meta, options = _skinny("gemv" if gemv else "small_m", heuristic)
    if INTERPRETING:
        split_k = configs.INTERPRETER["small_m_split_k"]
    columns = triton.cdiv(n, meta["BLOCK_N"])
    partial, u_partial, counter = _split_k_scratch(x.device, split_k * m * n, columns * split_k * m * r, columns) \
        if split_k > 1 else (None, None, None)
    tensors = (x, *w.pointers, lora_A, lora_B, bias, y, u, partial, u_partial, counter)
    common = dict(**_dropout_args(seed=seed, dropout_p=dropout_p), stride_wn=_stride_wn(w, k),
                  stride_ar=lora_A.stride(0), stride_bn=lora_B.stride(0), HAS_DROPOUT=dropout_p > 0.0,
                  SPLIT_K=split_k, **meta, **options,
                  WORD_ALIGNED=configs.is_four_bit(w.fmt) and w.data.data_ptr() % 4 == 0)
    if gemv:
        _run(lora_gemv_kernel, (columns, split_k), *tensors, n, k, r, float(scaling), stride_xk=x.stride(1),
             EVEN_K=k % meta["BLOCK_K"] == 0, **_gemv_constexprs(constexprs), **common)
    else:
        _run(lora_small_m_kernel, (columns, split_k), *tensors, m, n, k, r, float(scaling),
             stride_xm=x.stride(0), stride_xk=x.stride(1), stride_ym=y.stride(0), stride_um=u.stride(0),
             BLOCK_M=SMALL_M, **constexprs, **common)
    return y, u


def _gemv_constexprs(constexprs: dict) -> dict:
    """The FMA kernel's constexprs: the weight's and the LoRA switch (its products are fp32 FMAs)."""
    return {name: value for name, value in constexprs.items()
            if name in ("FMT", "NESTED", "BLOCKSIZE", "K_ALIGNED", "PAIRED", "HAS_LORA", "BLOCK_R")}


_SCRATCH: dict = {}  # (device, stream) -> (fp32 scratch, int32 counters), grown on demand, never shrunk
_CAPTURED_SCRATCH: list = []  # scratch that captured CUDA graphs hold: alive as long as the process


def _split_k_scratch(device: torch.device, partial_elements: int, u_partial_elements: int, counters: int):
    """(partial, u_partial, counter) views for a split-K small-M launch: fp32 scratch that needs no
    initialisation, and int32 counters that are zero and that the kernel leaves zero. Eager calls
    share one scratch per device and stream (launches on one stream run in order), so a warm call
    allocates only its outputs. A call captured into a CUDA graph gets scratch of its own, zeroed
    by the graph itself and never freed, so that no later growth of the shared one, and no eager
    call, can touch what the graph's replays use. Under `recording`, fresh meta tensors."""
    u_begin = triton.cdiv(partial_elements, 4) * 4  # u_partial 16-byte aligned, as partial is
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    shared = not capturing and _RECORDING.get() is None
    key = (device, torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0)
    scratch, counter = _SCRATCH.get(key, (None, None)) if shared else (None, None)
    if scratch is None or scratch.numel() < u_begin + u_partial_elements:
        scratch = torch.empty(u_begin + u_partial_elements, dtype=torch.float32, device=device)
    if counter is None or counter.numel() < counters:
        counter = torch.zeros(counters, dtype=torch.int32, device=device)
    if shared:
        _SCRATCH[key] = (scratch, counter)
    elif capturing:
        _CAPTURED_SCRATCH.append((scratch, counter))
    return scratch[:partial_elements], scratch[u_begin:u_begin + u_partial_elements], counter[:counters]


def backward(grad_y, x, u, weight: FrozenWeight, lora_A, lora_B, scaling, dropout_p, seed, need_dx):
    """grad_y (M, N), x (M, K), u (M, r) → (dx (M, K) or None, dA (r, K), dB (N, r))."""
    with _LAUNCH_LOCK, _on(x.device):
        return _backward(grad_y, x, u, weight, lora_A, lora_B, scaling, dropout_p, seed, need_dx)


def _backward(grad_y, x, u, weight, lora_A, lora_B, scaling, dropout_p, seed, need_dx):
    grad_y, x, u = _rows_contiguous(grad_y), _rows_contiguous(x), _rows_contiguous(u)
    lora_A, lora_B = _rows_contiguous(lora_A), _rows_contiguous(lora_B)
    (m, k), n, r = x.shape, weight.shape[0], lora_A.shape[0]
    has_lora = scaling != 0.0 and m > 0
    block_r = configs.padded_rank(r)
    dots = _dot_args(x.dtype, (lora_A.dtype, lora_B.dtype))
    mask_args = _dropout_args(dropout_p, seed)
    grad_A = torch.zeros_like(lora_A, memory_format=torch.contiguous_format)
    grad_B = torch.zeros_like(lora_B, memory_format=torch.contiguous_format)
    du = new_output((m, r), torch.float32, x.device) if has_lora else None
    if has_lora:
        grad_B.copy_(_grad_u(grad_y, u, lora_B, du, scaling, block_r, dots))
        grad_A.copy_(_grad_a(du, x, block_r, dots, mask_args, dropout_p > 0.0))
    if not need_dx:
        return None, grad_A, grad_B
    grad_x = new_output((m, k), x.dtype, x.device)
    if m == 0:
        return grad_x, grad_A, grad_B
    w = weight.kernel_args()
    if _regime(m, w.fmt, dots) == "workspace":
        _grad_x_workspace(grad_y, w, du, lora_A, grad_x, mask_args, dropout_p > 0.0, block_r, dots)
        return grad_x, grad_A, grad_B
    _launch_gemm(lora_grad_x_kernel,
                 lambda meta: triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_K"]), x.device,
                 grad_y, *w.pointers, du, lora_A, grad_x, m, n, k, r, *mask_args.values(),
                 grad_y.stride(0), _stride_wn(w, k), du.stride(0) if has_lora else 0, lora_A.stride(0),
                 grad_x.stride(0),
                 configs.m_bucket(m), **_weight_constexprs(w, k), HAS_LORA=has_lora, HAS_DROPOUT=dropout_p > 0.0,
                 BLOCK_R=block_r, **dots)
    return grad_x, grad_A, grad_B


def _grad_u(grad_y, u, lora_B, du, scaling, block_r, dots) -> torch.Tensor:
    """Fill du (fp32) and return dB (N, r) in fp32."""
    (m, n), r = grad_y.shape, u.shape[1]
    meta, options = _skinny("grad_u", configs.grad_u_config(m))
    programs = triton.cdiv(m, meta["BLOCK_M"])
    atomic = _reduce_with_atomics()
    partials = torch.zeros((1, n, r), dtype=torch.float32, device=u.device) if atomic \
        else new_output((programs, n, r), torch.float32, u.device)
    _run(lora_grad_u_kernel, (programs,), grad_y, u, lora_B, du, partials, m, n, r, float(scaling),
         grad_y.stride(0), u.stride(0), lora_B.stride(0), du.stride(0),
         partials.stride(0), partials.stride(1), ATOMIC_DB=atomic,
         LORA_DOT=dots["LORA_DOT"], LORA_PRECISION=dots["LORA_PRECISION"],
         BLOCK_R=block_r, **meta, **options)
    return partials.sum(dim=0)


def _grad_a(du, x, block_r, dots, mask_args, has_dropout) -> torch.Tensor:
    """dA (r, K) in fp32 from du (fp32) and the regenerated drop(x)."""
    (m, k), r = x.shape, du.shape[1]
    heuristic, split_m = configs.grad_a_config(m, k, _sm_count(x.device))
    meta, options = _skinny("grad_a", heuristic)
    if INTERPRETING:
        split_m = configs.INTERPRETER["grad_a_split_m"]
    partials = new_output((split_m, r, k), torch.float32, x.device)
    grid = (triton.cdiv(k, meta["BLOCK_K"]), split_m)
    _run(lora_grad_a_kernel, grid, du, x, partials, m, k, r, *mask_args.values(), du.stride(0), x.stride(0),
         x.stride(1), partials.stride(0), partials.stride(1), HAS_DROPOUT=has_dropout,
         LORA_DOT=dots["LORA_DOT"], LORA_PRECISION=dots["LORA_PRECISION"], SPLIT_M=split_m,
         BLOCK_R=block_r, **meta, **options)
    return partials.sum(dim=0)


def _grad_x_workspace(grad_y, w: WeightArgs, du, lora_A, grad_x, mask_args, has_dropout, block_r, dots) -> None:
    """The workspace regime's dx: drop'(du·A) written first (`lora_dx_kernel`), then g·deq(W)
    accumulated onto it by cuBLAS. du is None when the LoRA branch is off."""
    (m, n), k = grad_y.shape, grad_x.shape[1]
    weight = _weight_matrix(w, n, k, grad_y.dtype, 0, grad_y.device)
    if du is None:
        _matmul(grad_x, grad_y, weight)
        return
    meta, options = _skinny("dx", configs.dx_config())
    grid = (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(k, meta["BLOCK_K"]))
    _run(lora_dx_kernel, grid, du, lora_A, grad_x, m, k, lora_A.shape[0], *mask_args.values(), du.stride(0),
         lora_A.stride(0), grad_x.stride(0), HAS_DROPOUT=has_dropout, LORA_DOT=dots["LORA_DOT"],
         LORA_PRECISION=dots["LORA_PRECISION"], BLOCK_R=block_r, **meta, **options)
    _matmul(grad_x, grad_y, weight, accumulate=True)
