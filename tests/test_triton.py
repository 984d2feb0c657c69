"""The Triton backend under Triton's interpreter (on the CPU), through the public op: every format
and dtype, both forward paths, all gradients against a float64 oracle with the shared tolerance
table; outputs poisoned before every call; the dropout mask bit for bit; opcheck; dispatch."""

import contextlib
import os
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

import fusedlora.backends.regimes as regimes
import fusedlora.formats as formats
from fusedlora import fused_lora_linear, quantize
from fusedlora.backends import backend_id
from fusedlora.dropout import keep_mask
from fusedlora.ops import lora_linear_bwd, lora_linear_fwd
from helpers import (assert_close, float64_oracle, interpreter_bf16_dot, poisoned_triton_outputs, random_weight,
                     unpack_codes)

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="interpreter suite: conftest sets TRITON_INTERPRET=1 where there is no GPU")
launch = pytest.importorskip("fusedlora.backends.triton_launch")
configs = pytest.importorskip("fusedlora.kernels.configs")
dequant = pytest.importorskip("fusedlora.kernels.dequant")
triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

FORMATS = ["nf4", "fp4", "int8", "fp8", "dense"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SHAPES = [(1, 64, 80), (7, 96, 136), (5, 128, 72), (33, 192, 80)]  # (M, K, N): every forward path, ragged tiles
RANKS = [1, 8, 12, 16]


@pytest.fixture(autouse=True)
def triton_forced(monkeypatch):
    monkeypatch.setenv("FUSEDLORA_BACKEND", "triton")


@pytest.fixture(autouse=True)
def interpreter_checks():
    with poisoned_triton_outputs(), interpreter_bf16_dot():
        yield


def _check(m, k, n, r, fmt, dtype, *, adapter_dtype=None, bias=True, p=0.0, blocksize=64, double_quant=True,
           scaling=1.5, seed=0, x_view=None):
    """Run the op on the Triton backend and compare y and every gradient with float64."""
    g = torch.Generator().manual_seed(seed + 1000 * m + k + n + r)
    weight = quantize(random_weight(n, k, generator=g), fmt, blocksize, double_quant)
    x = torch.randn(m, k, generator=g).to(dtype)
    adapter_dtype = adapter_dtype or dtype
    lora_A = (torch.randn(r, k, generator=g) / k**0.5).to(adapter_dtype)
    lora_B = torch.randn(n, r, generator=g).to(adapter_dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    grad_y = torch.randn(m, n, generator=g).to(dtype)
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, lora_A, lora_B, b)]
    x_in = leaves[0] if x_view is None else x_view(leaves[0])
    y = fused_lora_linear(x_in, weight, leaves[1], leaves[2], scaling, leaves[3], p, seed=77)
    y.reshape(m, n).backward(grad_y)
    keep = keep_mask((m, k), p, 77) if p > 0 else None
    y_ref, grads = float64_oracle(x, weight.dequantize(torch.float64), lora_A, lora_B, scaling, b, keep, p, grad_y)
    assert y.dtype == dtype and torch.isfinite(y).all()
    assert_close(y.reshape(m, n), y_ref, dtype, "y")
    for name, leaf, expected in zip(("dx", "dA", "dB", "dbias"), leaves, grads):
        if leaf is not None:
            assert leaf.grad.dtype == leaf.dtype and torch.isfinite(leaf.grad).all(), name
            assert_close(leaf.grad, expected, dtype, name)


MATRIX = [(fmt, dtype, shape) for fmt in FORMATS for dtype in DTYPES for shape in SHAPES]


@pytest.mark.parametrize("case", range(len(MATRIX)),
                         ids=[f"{f}-{str(d)[6:]}-{'x'.join(map(str, s))}" for f, d, s in MATRIX])
def test_parity_every_format_dtype_and_path(case):
    fmt, dtype, (m, k, n) = MATRIX[case]
    variant = case // len(SHAPES)  # so that every shape meets every rank with and without bias and dropout
    _check(m, k, n, RANKS[variant % 4], fmt, dtype, bias=(variant // 4) % 2 == 0, p=0.1 if (variant // 8) % 2 else 0.0)


@pytest.mark.parametrize("r", RANKS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("m", [7, 33])
def test_every_rank_bias_and_dropout(r, bias, p, m):
    _check(m, 96, 80, r, "nf4", torch.bfloat16, bias=bias, p=p)


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize,k", [(32, 65), (128, 96), (256, 130)])
def test_4bit_layouts_odd_rows_and_blocks_across_rows(fmt, double_quant, blocksize, k):
    _check(33, k, 48, 8, fmt, torch.float32, blocksize=blocksize, double_quant=double_quant, p=0.1)
    _check(5, k, 48, 8, fmt, torch.float32, blocksize=blocksize, double_quant=double_quant)
    _check(1, k, 48, 8, fmt, torch.bfloat16, blocksize=blocksize, double_quant=double_quant, p=0.1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [3, 40])
def test_fp32_adapters_with_half_activations(dtype, m):
    _check(m, 96, 80, 16, "nf4", dtype, adapter_dtype=torch.float32, p=0.1)


@pytest.mark.parametrize("m", [3, 40])
def test_rank_above_128(m):
    _check(m, 64, 48, 200, "int8", torch.float32, p=0.1)


def test_split_reductions(monkeypatch):
    """The paths a GPU takes for small grids: split-K one-row and small-M kernels, atomic dB, split-M dA."""
    monkeypatch.setitem(configs.INTERPRETER, "atomics", True)
    monkeypatch.setitem(configs.INTERPRETER, "small_m_split_k", 3)
    monkeypatch.setitem(configs.INTERPRETER, "grad_a_split_m", 2)
    for m in (1, 7, 33):
        _check(m, 192, 80, 8, "nf4", torch.float32, p=0.1)
        _check(m, 192, 80, 8, "int8", torch.bfloat16)


@pytest.mark.parametrize("m,kernel", [(1, "lora_gemv_kernel"), (7, "lora_small_m_kernel")])
def test_small_m_is_one_launch_that_allocates_only_its_outputs(monkeypatch, m, kernel):
    """Split-K small M: one kernel per call, whose last program per column sums the slices; the
    scratch is kept from the first call (so the second allocates only y and u) and the counters
    are zero again after every call; the slices' sum matches the one-slice kernel's."""
    weight = quantize(random_weight(80, 192), "nf4")
    g = torch.Generator().manual_seed(5)
    x, lora_A, lora_B, bias = torch.randn(m, 192, generator=g), torch.randn(8, 192, generator=g) / 14, \
        torch.randn(80, 8, generator=g), torch.randn(80, generator=g)
    args = (x, weight, lora_A, lora_B, 1.5, bias, 0.1, 3)
    y_one, u_one = launch.forward(*args)
    monkeypatch.setitem(configs.INTERPRETER, "small_m_split_k", 3)
    kernels, outputs = [], []
    run, new_output = launch._run, launch.new_output
    monkeypatch.setattr(launch, "_run", lambda kernel, *a, **kw: (kernels.append(kernel), run(kernel, *a, **kw)))
    monkeypatch.setattr(launch, "new_output", lambda *a: outputs.append(a) or new_output(*a))
    launch.forward(*args)
    scratch = dict(launch._SCRATCH)
    kernels.clear(), outputs.clear()
    y, u = launch.forward(*args)
    assert kernels == [getattr(launch, kernel)] and len(outputs) == 2
    assert all(a is b for key in scratch for a, b in zip(scratch[key], launch._SCRATCH[key]))
    assert all(not counter.any() for _, counter in launch._SCRATCH.values())
    torch.testing.assert_close(y, y_one, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(u, u_one, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m,dtype,double_quant", [(1, torch.float32, True), (1, torch.bfloat16, False),
                                                  (5, torch.float16, True), (5, torch.bfloat16, True),
                                                  (5, torch.float32, False)])
def test_small_m_4bit_reads_words_only_from_word_aligned_storage(monkeypatch, m, dtype, double_quant):
    """The one-row and small-M kernels read a 4-bit W as 32-bit words only where its storage starts
    on 4 bytes; packed codes at an odd byte offset (a view into a larger buffer) take the byte
    path, and both give y and u within the tolerances of a float64 oracle."""
    weight = quantize(random_weight(80, 192, generator=torch.Generator().manual_seed(3)), "nf4",
                      double_quant=double_quant)
    buffer = torch.empty(weight.packed.numel() + 1, dtype=torch.uint8)
    nested = (weight.nested_absmax, weight.nested_code, weight.nested_offset) if double_quant else ()
    shifted = formats.FourBitWeight("nf4", buffer[1:].view_as(weight.packed), weight.absmax, weight.shape,
                                    weight.dtype, weight.blocksize, *nested)
    shifted.packed.copy_(weight.packed)
    g = torch.Generator().manual_seed(4)
    x, lora_A, lora_B = torch.randn(m, 192, generator=g).to(dtype), (torch.randn(8, 192, generator=g) / 14).to(dtype), \
        torch.randn(80, 8, generator=g).to(dtype)
    word_aligned, run = [], launch._run
    monkeypatch.setattr(launch, "_run", lambda kernel, *a, **kw: (word_aligned.append(kw["WORD_ALIGNED"]),
                                                                  run(kernel, *a, **kw)))
    outputs = [launch.forward(x, w, lora_A, lora_B, 1.5, None, 0.0, 3) for w in (weight, shifted)]
    assert word_aligned == [True, False]
    u_ref = x.double() @ lora_A.double().t()
    y_ref = x.double() @ weight.dequantize(torch.float64).t() + 1.5 * u_ref.to(dtype).double() @ lora_B.double().t()
    for y, u in outputs:
        assert_close(y, y_ref, dtype, "y")
        assert_close(u, u_ref, dtype, "u")


@triton.jit
def _codes_of_one_step(w_ptr, scale_ptr, code_ptr, codes_ptr, absmax_ptr, N, K, stride_wn, K0: tl.constexpr,
                       BLOCKSIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    codes, absmax = dequant.four_bit_codes(w_ptr, scale_ptr, code_ptr, None, None, None, offs_n, K0, N, K, stride_wn,
                                           False, BLOCKSIZE, BLOCK_K, DOT)
    tl.store(codes_ptr + offs_n[:, None] * BLOCK_K + tl.arange(0, BLOCK_K)[None, :], codes.to(tl.float32))
    tl.store(absmax_ptr + offs_n[:, None], absmax)


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_a_word_step_puts_every_code_in_its_place(fmt, dtype):
    """`four_bit_codes` (the small-M kernel's 4-bit step from 32-bit words) gives code[W[n, k]] in
    the MMA's dtype at (n, k - k0), bit for bit, and each row's absmax."""
    from fusedlora.formats.codebooks import code_table

    n, k, blocksize, k0, block_k = 16, 256, 64, 128, 64
    weight = quantize(random_weight(n, k, generator=torch.Generator().manual_seed(9)), fmt, blocksize,
                      double_quant=False)
    args = weight.kernel_args()
    codes, absmax = torch.full((n, block_k), float("nan")), torch.full((n, 1), float("nan"))
    dot = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[dtype]
    _codes_of_one_step[(1,)](args.data, args.scale, args.code, codes, absmax, n, k, k // 2, k0, blocksize, n, block_k,
                             dot)
    index = unpack_codes(weight.packed, n * k).view(n, k)[:, k0:k0 + block_k]
    assert torch.equal(codes, code_table(fmt)[index].to(dtype).float())
    assert torch.equal(absmax[:, 0], weight.absmax.view(n, -1)[:, k0 // blocksize])


def test_nd_and_non_contiguous_inputs():
    _check(12, 64, 40, 4, "nf4", torch.float32, x_view=lambda x: x.view(3, 4, 64))
    _check(33, 64, 40, 4, "fp8", torch.float32, x_view=lambda x: x.t().contiguous().t())


def test_dropout_mask_equals_the_reference_mask():
    """With x = 1 and A = I, u = drop(x) = keep / (1 - p): the kernels' mask, read back."""
    k, p, seed = 64, 0.3, 12345
    weight = quantize(torch.randn(32, k), "nf4")
    for m in (1, 5, 37):  # the one-row kernel, the small-M kernel and the shrink kernel
        x = torch.ones(m, k)
        args = (x, weight.tensors(), "nf4", [32, k], 64, torch.eye(k), torch.randn(32, k), 1.0, None, p,
                torch.tensor(seed))
        _, u, _ = lora_linear_fwd(*args)
        assert torch.equal(u != 0, keep_mask((m, k), p, seed))
        torch.testing.assert_close(u[u != 0], torch.full_like(u[u != 0], 1 / (1 - p)))


def test_the_fused_path_never_materialises_the_weight_or_the_dropout(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a dense W or drop(x) was materialised")

    for weight_class in (formats.FourBitWeight, formats.Int8Weight, formats.Fp8Weight, formats.DenseWeight):
        monkeypatch.setattr(weight_class, "dequantize", refuse)
    monkeypatch.setattr("fusedlora.backends.reference.apply_dropout", refuse)
    weight = quantize(torch.randn(40, 64), "nf4")
    for m in (3, 33):
        x = torch.randn(m, 64, requires_grad=True)
        lora_A = torch.randn(4, 64, requires_grad=True)
        lora_B = torch.randn(40, 4, requires_grad=True)
        fused_lora_linear(x, weight, lora_A, lora_B, 1.0, None, 0.2).sum().backward()
        assert x.grad is not None and lora_A.grad is not None


def test_zero_scaling_gives_the_base_and_zero_adapter_gradients():
    weight = quantize(torch.randn(40, 64), "int8")
    x = torch.randn(33, 64, requires_grad=True)
    lora_A = torch.full((4, 64), float("nan"), requires_grad=True)
    lora_B = torch.randn(40, 4, requires_grad=True)
    y = fused_lora_linear(x, weight, lora_A, lora_B, 0.0)
    assert_close(y, x.double() @ weight.dequantize(torch.float64).t(), torch.float32)
    y.sum().backward()
    assert torch.equal(lora_A.grad, torch.zeros_like(lora_A)) and torch.equal(lora_B.grad, torch.zeros_like(lora_B))


def test_repeated_calls_are_bitwise_identical():
    weight = quantize(torch.randn(40, 64), "nf4")
    x, lora_A, lora_B = torch.randn(33, 64), torch.randn(4, 64), torch.randn(40, 4)
    first = fused_lora_linear(x, weight, lora_A, lora_B, 1.0, None, 0.2, seed=3)
    assert torch.equal(first, fused_lora_linear(x, weight, lora_A, lora_B, 1.0, None, 0.2, seed=3))


@pytest.mark.parametrize("m", [5, 33])
def test_opcheck_with_triton_forced(m):
    weight = quantize(torch.randn(24, 64), "nf4")
    x = torch.randn(m, 64, requires_grad=True)
    lora_A = torch.randn(4, 64, requires_grad=True)
    lora_B = torch.randn(24, 4, requires_grad=True)
    seed = torch.tensor(9)
    args = (x, weight.tensors(), "nf4", [24, 64], 64, lora_A, lora_B, 0.5, torch.randn(24), 0.1, seed)
    torch.library.opcheck(lora_linear_fwd, args)
    plain = (torch.randn(m, 24), x.detach(), torch.randn(m, 4), *args[1:5], lora_A.detach(), lora_B.detach(),
             0.5, 0.1, seed, True, torch.tensor(backend_id("triton")))
    torch.library.opcheck(lora_linear_bwd, plain)


def test_forced_triton_refuses_what_it_cannot_run():
    weight = quantize(torch.randn(24, 64), "nf4")
    with pytest.raises(RuntimeError, match="triton cannot run this call: x has dtype torch.float64"):
        fused_lora_linear(torch.randn(3, 64, dtype=torch.float64), weight, torch.randn(4, 64, dtype=torch.float64),
                          torch.randn(24, 4, dtype=torch.float64), 1.0)
    with pytest.raises(RuntimeError, match="rank 300 is above"):
        fused_lora_linear(torch.randn(3, 64), weight, torch.randn(300, 64), torch.randn(24, 300), 1.0)


def test_cpu_dispatch_prefers_the_reference_unless_forced(monkeypatch):
    monkeypatch.delenv("FUSEDLORA_BACKEND")
    calls = []
    monkeypatch.setattr(launch, "forward", lambda *args: calls.append(1))
    weight = quantize(torch.randn(24, 64), "nf4")
    y = fused_lora_linear(torch.randn(3, 64), weight, torch.randn(4, 64), torch.randn(24, 4), 1.0)
    assert calls == [] and y.shape == (3, 24)


def test_base_only_matches_nn_linear_shape_semantics():
    weight = quantize(torch.randn(24, 64), "dense")
    x = torch.randn(2, 5, 64)
    y = fused_lora_linear(x, weight, torch.randn(4, 64), torch.zeros(24, 4), 1.0)
    assert_close(y, F.linear(x.double(), weight.weight.double()), torch.float32)


WORKSPACE_MATRIX = [(fmt, dtype, shape) for fmt in FORMATS for dtype in (torch.float16, torch.bfloat16)
                    for shape in ((33, 192, 80), (40, 65, 72))]  # odd K: 4-bit rows start mid-byte


@pytest.mark.parametrize("case", range(len(WORKSPACE_MATRIX)),
                         ids=[f"{f}-{str(d)[6:]}-{'x'.join(map(str, s))}" for f, d, s in WORKSPACE_MATRIX])
def test_workspace_regime_every_format_and_16_bit_dtype(case):
    """W dequantized into a workspace, then torch's matmul (cuBLAS on a GPU) with the LoRA term folded in."""
    fmt, dtype, (m, k, n) = WORKSPACE_MATRIX[case]
    with regimes.force_regime("workspace"), _counting_matmuls() as matmuls:
        _check(m, k, n, RANKS[case % 4], fmt, dtype, bias=case % 2 == 0, p=0.1 if (case // 2) % 2 else 0.0)
    assert len(matmuls) == 2  # forward and dx: the regime ran


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize,k", [(32, 65), (128, 96), (256, 130)])
def test_workspace_regime_4bit_layouts(fmt, double_quant, blocksize, k):
    with regimes.force_regime("workspace"):
        _check(20, k, 24, 4, fmt, torch.bfloat16, blocksize=blocksize, double_quant=double_quant, p=0.1)


def test_workspace_regime_fp32_adapters_rank_above_128_zero_scaling_and_split_dA(monkeypatch):
    monkeypatch.setitem(configs.INTERPRETER, "grad_a_split_m", 2)
    with regimes.force_regime("workspace"), _counting_matmuls() as matmuls:
        _check(40, 96, 50, 5, "nf4", torch.float16, adapter_dtype=torch.float32, p=0.1)
        _check(40, 96, 50, 200, "int8", torch.bfloat16, p=0.1)
        _check(40, 96, 50, 5, "nf4", torch.float16, scaling=0.0)
        _check(40, 96, 50, 5, "dense", torch.bfloat16, scaling=0.0)
    assert len(matmuls) == 8


def test_workspace_regime_leaves_fp32_and_mixed_lora_dtypes_fused():
    """cuBLAS may run fp32 as TF32, and LoRA products outside x's dtype cannot share its GEMM."""
    with regimes.force_regime("workspace"), _counting_matmuls() as matmuls:
        _check(33, 64, 40, 4, "nf4", torch.float32)
        _check(33, 64, 40, 4, "nf4", torch.bfloat16, adapter_dtype=torch.float16)
    assert matmuls == []


def test_the_workspace_is_released_after_each_call(monkeypatch):
    """No dequantized W outlives the call that made it (the caching allocator reuses its memory)."""
    import weakref

    made = []
    original = launch.new_output

    def tracked(shape, dtype, device):
        out = original(shape, dtype, device)
        made.append((tuple(shape), weakref.ref(out)))
        return out

    monkeypatch.setattr(launch, "new_output", tracked)
    weight = quantize(torch.randn(40, 64), "nf4")
    x = torch.randn(33, 64, dtype=torch.bfloat16, requires_grad=True)
    lora_A = torch.randn(4, 64, dtype=torch.bfloat16, requires_grad=True)
    lora_B = torch.randn(40, 4, dtype=torch.bfloat16, requires_grad=True)
    with regimes.force_regime("workspace"):
        fused_lora_linear(x, weight, lora_A, lora_B, 1.0).sum().backward()
    workspaces = [ref for shape, ref in made if shape[0] == 40 and shape[1] >= 64]  # (N, K [+ r]) padded
    assert len(workspaces) == 2 and all(ref() is None for ref in workspaces)


def test_a_forced_regime_holds_for_a_backward_run_on_another_thread():
    """On CUDA, autograd runs the backward on a device thread, where context variables are unset."""
    import threading

    weight = quantize(torch.randn(40, 64), "nf4")
    x = torch.randn(33, 64, dtype=torch.bfloat16, requires_grad=True)
    lora_A = torch.randn(4, 64, dtype=torch.bfloat16, requires_grad=True)
    lora_B = torch.randn(40, 4, dtype=torch.bfloat16, requires_grad=True)
    with _counting_matmuls() as matmuls:
        with regimes.force_regime("workspace"):  # 33 rows: fused unless forced
            y = fused_lora_linear(x, weight, lora_A, lora_B, 1.0)
        backward = threading.Thread(target=lambda: y.float().sum().backward())
        backward.start()
        backward.join()
    assert len(matmuls) == 2 and x.grad is not None and torch.isfinite(x.grad).all()


def test_regime_choice_by_rows_and_format_and_its_overrides(monkeypatch):
    ids = {name: launch.FORMAT_IDS[name] for name in FORMATS}
    hopper, ampere = (9, 0), (8, 0)
    rows = regimes.WORKSPACE_MIN_M["hopper"]["nf4"]
    assert regimes.large_m_regime(rows - 1, "nf4", hopper, True) == "fused"
    assert regimes.large_m_regime(rows, "nf4", hopper, True) == "workspace"
    assert regimes.large_m_regime(8192, "nf4", ampere, True) == "fused"  # mma.sync overlaps the dequantization
    assert regimes.large_m_regime(8192, "int8", ampere, True) == "workspace"
    assert regimes.large_m_regime(8192, "dense", hopper, True) == "fused"  # no dequantization to save
    assert regimes.large_m_regime(8192, "nf4", hopper, False) == "fused"  # a call the workspace cannot take
    # The CUDA backend's fused GEMM is mma.sync: on Hopper cuBLAS wins for a dense weight too.
    assert regimes.large_m_regime(8192, "dense", hopper, True, regimes.CUDA_WORKSPACE_MIN_M) == "workspace"
    assert regimes.large_m_regime(8192, "dense", ampere, True, regimes.CUDA_WORKSPACE_MIN_M) == "fused"
    assert not regimes.products_in_x_dtype(torch.float32, (torch.float32, torch.float32))
    assert regimes.products_in_x_dtype(torch.bfloat16, (torch.float32, torch.bfloat16))
    assert not regimes.products_in_x_dtype(torch.bfloat16, (torch.float16, torch.bfloat16))
    with regimes.force_regime("fused"):
        assert regimes.large_m_regime(8192, "int8", hopper, True) == "fused"
    # The CUDA backend's choice, passed to its ops (its table, its dtype rule), on a Hopper
    from fusedlora.backends import cuda as cuda_backend

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: hopper)
    nf4, dense = quantize(torch.randn(64, 64), "nf4"), quantize(torch.randn(64, 64).bfloat16(), "dense")
    x, a, b = torch.empty(rows, 64, dtype=torch.bfloat16), torch.empty(8, 64), torch.empty(64, 8)
    assert cuda_backend._regime(x, nf4, a, b) == cuda_backend._regime(x, dense, a, b) == "workspace"
    assert cuda_backend._regime(x[:rows - 1], nf4, a, b) == "fused"
    assert cuda_backend._regime(x.float(), nf4, a, b) == cuda_backend._regime(x, nf4, a.half(), b) == "fused"
    dots = launch._dot_args(torch.bfloat16, (torch.bfloat16, torch.bfloat16))
    assert launch._regime(8192, ids["nf4"], dots) == "workspace"
    assert launch._regime(8192, ids["nf4"], launch._dot_args(torch.float32, (torch.float32,) * 2)) == "fused"
    with _deterministic():  # the kernels are deterministic by themselves; cuBLAS may need a setting
        assert launch._regime(8192, ids["nf4"], dots) == "fused"
        with regimes.force_regime("workspace"):
            assert launch._regime(8192, ids["nf4"], dots) == "workspace"
    monkeypatch.setenv("FUSEDLORA_TRITON_REGIME", "workspace")
    assert regimes.forced_regime() == "workspace"
    with regimes.force_regime("fused"):
        assert regimes.forced_regime() == "fused"
    monkeypatch.setenv("FUSEDLORA_TRITON_REGIME", "cublas")
    with pytest.raises(ValueError, match="FUSEDLORA_TRITON_REGIME is 'cublas'; expected one of"):
        regimes.forced_regime()
    with pytest.raises(ValueError, match="force_regime's name is 'tiled'"):
        regimes.force_regime("tiled").__enter__()


@contextlib.contextmanager
def _counting_matmuls():
    calls = []
    original = launch._matmul

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    with mock.patch.object(launch, "_matmul", counted):
        yield calls


@contextlib.contextmanager
def _deterministic():
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)
