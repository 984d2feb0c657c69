"""The op `fused_lora_linear`: math against float64, gradients, custom-op registration, dtypes,
dropout, autocast, dispatch, and clear errors for bad input."""

import dataclasses
import threading

import pytest
import torch
import torch.nn.functional as F

import fusedlora.backends as backends
import fusedlora.backends.registry as registry
from fusedlora import fused_lora_linear, quantize
from fusedlora.dropout import keep_mask
from fusedlora.ops import lora_linear_bwd, lora_linear_fwd
from helpers import assert_close, float64_lora, float64_oracle, on_backend, random_weight

FORMATS = ["nf4", "fp4", "int8", "fp8", "dense"]
OPCHECKS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def _problem(m=33, k=96, n=80, r=8, dtype=torch.float32, adapter_dtype=None, fmt="nf4", bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = quantize(random_weight(n, k, generator=g), fmt)
    x = torch.randn(m, k, generator=g).to(dtype)
    adapter_dtype = adapter_dtype or dtype
    lora_A = (torch.randn(r, k, generator=g) / k**0.5).to(adapter_dtype)
    lora_B = torch.randn(n, r, generator=g).to(adapter_dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, weight, lora_A, lora_B, b


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_gradcheck_float64(fmt, bias, dropout):
    x, weight, lora_A, lora_B, b = _problem(m=5, k=64, n=24, r=3, dtype=torch.float64, fmt=fmt, bias=bias)
    inputs = [x.requires_grad_(), lora_A.requires_grad_(), lora_B.requires_grad_()]
    if bias:
        inputs.append(b.requires_grad_())

    def op(x, lora_A, lora_B, *maybe_bias):
        return fused_lora_linear(x, weight, lora_A, lora_B, 0.7, maybe_bias[0] if maybe_bias else None, dropout, seed=11)

    assert torch.autograd.gradcheck(op, inputs)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_opcheck(fmt, dropout):
    x, weight, lora_A, lora_B, b = _problem(m=7, k=64, n=40, r=4, fmt=fmt)
    x.requires_grad_()
    lora_A.requires_grad_()
    lora_B.requires_grad_()
    seed = torch.tensor(5, dtype=torch.int64)
    args = (x, weight.tensors(), weight.fmt, list(weight.shape), weight.blocksize, lora_A, lora_B, 0.5, b, dropout, seed)
    if fmt == "fp8":
        # opcheck's schema test compares inputs with torch.allclose, which CPU float8 lacks;
        # check here instead that the op leaves its inputs as they were.
        before = [t.clone() for t in weight.tensors()]
        lora_linear_fwd(*args)
        assert all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(before, weight.tensors()))
        test_utils = OPCHECKS[1:]
    else:
        test_utils = OPCHECKS
    torch.library.opcheck(lora_linear_fwd, args, test_utils=test_utils)
    grad_y = torch.randn(7, 40)
    plain = [t.detach() for t in (x, lora_A, lora_B)]
    bwd_args = (grad_y, plain[0], torch.randn(7, 4), *args[1:5], plain[1], plain[2], 0.5, dropout, seed)
    reference = torch.tensor(backends.backend_id("reference"))
    torch.library.opcheck(lora_linear_bwd, (*bwd_args, True, reference), test_utils=test_utils)
    torch.library.opcheck(lora_linear_bwd, (*bwd_args, False, reference), test_utils=test_utils)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 64, 80), (7, 96, 136), (33, 192, 80)], ids=lambda s: "x".join(map(str, s)))
def test_forward_and_gradients_match_float64(fmt, dtype, shape):
    m, k, n = shape
    x, weight, lora_A, lora_B, b = _problem(m, k, n, r=12, dtype=dtype, fmt=fmt)
    p, seed, scaling = 0.1, 1234, 1.5
    keep = keep_mask((m, k), p, seed)
    leaves = [t.clone().requires_grad_() for t in (x, lora_A, lora_B, b)]
    y = fused_lora_linear(leaves[0], weight, leaves[1], leaves[2], scaling, leaves[3], p, seed)
    grad_y = torch.randn(m, n, generator=torch.Generator().manual_seed(9)).to(dtype)
    y.backward(grad_y)
    y_ref, grads = float64_oracle(x, weight.dequantize(torch.float64), lora_A, lora_B, scaling, b, keep, p, grad_y)
    assert y.dtype == dtype
    assert_close(y, y_ref, dtype, "y")
    for name, leaf, expected in zip(("dx", "dA", "dB", "dbias"), leaves, grads):
        assert leaf.grad.dtype == leaf.dtype, name
        assert_close(leaf.grad, expected, dtype, name)


def test_fp32_adapters_with_bf16_activations():
    x, weight, lora_A, lora_B, b = _problem(dtype=torch.bfloat16, adapter_dtype=torch.float32)
    lora_A.requires_grad_()
    lora_B.requires_grad_()
    y = fused_lora_linear(x, weight, lora_A, lora_B, 2.0, b)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and lora_A.grad.dtype == torch.float32 and lora_B.grad.dtype == torch.float32
    assert_close(y, float64_lora(x, weight.dequantize(torch.float64), lora_A, lora_B, 2.0, b), torch.bfloat16)


def test_nd_and_non_contiguous_inputs():
    x, weight, lora_A, lora_B, b = _problem(m=30, k=64, n=48)
    x3 = x.view(5, 6, 64)
    y3 = fused_lora_linear(x3, weight, lora_A, lora_B, 0.5, b)
    assert y3.shape == (5, 6, 48)
    transposed = x3.transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous storage
    assert not transposed.is_contiguous()
    torch.testing.assert_close(fused_lora_linear(transposed, weight, lora_A, lora_B, 0.5, b), y3, rtol=1e-6, atol=1e-6)
    sliced = torch.randn(30, 128)[:, ::2]
    torch.testing.assert_close(
        fused_lora_linear(sliced, weight, lora_A, lora_B, 0.5, b),
        fused_lora_linear(sliced.contiguous(), weight, lora_A, lora_B, 0.5, b),
    )


def test_dropout_is_deterministic_per_seed_and_only_on_the_lora_branch():
    x, weight, lora_A, lora_B, b = _problem()
    y1 = fused_lora_linear(x, weight, lora_A, lora_B, 1.0, b, 0.5, seed=3)
    assert torch.equal(y1, fused_lora_linear(x, weight, lora_A, lora_B, 1.0, b, 0.5, seed=3))
    assert not torch.equal(y1, fused_lora_linear(x, weight, lora_A, lora_B, 1.0, b, 0.5, seed=4))
    zero_B = torch.zeros_like(lora_B)
    base = F.linear(x, weight.dequantize(), b)
    assert torch.equal(fused_lora_linear(x, weight, lora_A, zero_B, 1.0, b, 0.5, seed=3), base)


def test_unseeded_dropout_follows_torch_manual_seed():
    x, weight, lora_A, lora_B, b = _problem()
    torch.manual_seed(42)
    y1 = fused_lora_linear(x, weight, lora_A, lora_B, 1.0, b, 0.3)
    y2 = fused_lora_linear(x, weight, lora_A, lora_B, 1.0, b, 0.3)
    torch.manual_seed(42)
    assert torch.equal(fused_lora_linear(x, weight, lora_A, lora_B, 1.0, b, 0.3), y1)
    assert not torch.equal(y1, y2)


@pytest.mark.parametrize("fmt", FORMATS)
def test_zero_scaling_and_zero_B_give_the_base_output_bit_for_bit(fmt):
    x, weight, lora_A, lora_B, b = _problem(dtype=torch.bfloat16, fmt=fmt)
    base = F.linear(x, weight.dequantize(torch.bfloat16), b)
    assert torch.equal(fused_lora_linear(x, weight, lora_A, lora_B, 0.0, b), base)
    assert torch.equal(fused_lora_linear(x, weight, lora_A, torch.zeros_like(lora_B), 3.0, b), base)


@pytest.mark.parametrize("fmt", ["nf4", "dense"])
def test_nan_and_inf_propagate_like_nn_linear(fmt):
    """Rows with NaN/Inf input come out non-finite, as from nn.Linear (an Inf may become NaN
    through the adapter, as in PEFT: Inf·0); every other row is untouched."""
    x, weight, lora_A, lora_B, b = _problem(fmt=fmt)
    x[3, 5] = float("nan")
    x[7, 0] = float("inf")
    x[8, 1] = float("-inf")
    y = fused_lora_linear(x, weight, lora_A, lora_B, 1.0, b)
    expected = F.linear(x, weight.dequantize(), b)
    assert torch.equal(torch.isfinite(y), torch.isfinite(expected))
    assert not torch.isfinite(y[[3, 7, 8]]).any()
    clean = [i for i in range(x.shape[0]) if i not in (3, 7, 8)]
    torch.testing.assert_close(y[clean], fused_lora_linear(x[clean], weight, lora_A, lora_B, 1.0, b))


def test_autocast_computes_in_the_autocast_dtype_like_nn_linear():
    x, weight, lora_A, lora_B, b = _problem(fmt="dense")
    lora_A.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fused_lora_linear(x, weight, lora_A, lora_B, 1.0, b)
        linear = F.linear(x, weight.dequantize(), b)
    assert y.dtype == torch.bfloat16 == linear.dtype
    y.float().sum().backward()
    assert lora_A.grad.dtype == torch.float32
    bf16 = [t.to(torch.bfloat16) for t in (x, lora_A.detach(), lora_B, b)]
    assert_close(y, float64_lora(bf16[0], weight.dequantize(torch.bfloat16), bf16[1], bf16[2], 1.0, bf16[3]), torch.bfloat16)


def test_autocast_leaves_float64_alone_like_nn_linear():
    x, weight, lora_A, lora_B, b = _problem(dtype=torch.float64, fmt="dense")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused_lora_linear(x, weight, lora_A, lora_B, 1.0, b).dtype == torch.float64


def test_zero_scaling_switches_the_branch_off_even_with_nan_adapters():
    x, weight, lora_A, lora_B, b = _problem()
    lora_B[0, 0] = float("nan")
    lora_A[1, 1] = float("inf")
    x.requires_grad_()
    lora_A.requires_grad_()
    lora_B.requires_grad_()
    y = fused_lora_linear(x, weight, lora_A, lora_B, 0.0, b)
    assert torch.equal(y, F.linear(x, weight.dequantize(), b))
    y.sum().backward()
    assert torch.equal(lora_A.grad, torch.zeros_like(lora_A)) and torch.equal(lora_B.grad, torch.zeros_like(lora_B))
    torch.testing.assert_close(x.grad, torch.ones(33, 80) @ weight.dequantize())


def test_non_contiguous_adapters_in_opcheck_and_compiled_backward():
    x, weight, lora_A, lora_B, b = _problem(m=8, k=64, n=32, r=4, fmt="dense")
    a_t, b_t = lora_A.t().contiguous().requires_grad_(), lora_B.t().contiguous().requires_grad_()
    seed = torch.tensor(0, dtype=torch.int64)
    args = (torch.randn(8, 32), x, torch.randn(8, 4), weight.tensors(), "dense", [32, 64], 0,
            a_t.detach().t(), b_t.detach().t(), 0.5, 0.0, seed, True, torch.tensor(backends.backend_id("reference")))
    torch.library.opcheck(lora_linear_bwd, args)

    def f(x, a_t, b_t):
        return fused_lora_linear(x, weight, a_t.t(), b_t.t(), 0.5)

    f(x, a_t, b_t).square().sum().backward()
    eager = a_t.grad.clone(), b_t.grad.clone()
    a_t.grad = b_t.grad = None
    torch.compile(f, fullgraph=True)(x, a_t, b_t).square().sum().backward()
    torch.testing.assert_close((a_t.grad, b_t.grad), eager)


def test_no_dx_when_x_needs_no_grad():
    x, weight, lora_A, lora_B, b = _problem()
    lora_B.requires_grad_()
    fused_lora_linear(x, weight, lora_A, lora_B, 1.0, b).sum().backward()
    assert x.grad is None and lora_A.grad is None and lora_B.grad is not None


def test_empty_batch():
    _, weight, lora_A, lora_B, b = _problem()
    x = torch.randn(0, 96, requires_grad=True)
    lora_A.requires_grad_()
    lora_B.requires_grad_()
    y = fused_lora_linear(x, weight, lora_A, lora_B, 1.0, b, 0.1)
    assert y.shape == (0, 80) and y.dtype == x.dtype
    y.sum().backward()
    assert x.grad.shape == (0, 96)
    assert torch.equal(lora_A.grad, torch.zeros_like(lora_A)) and torch.equal(lora_B.grad, torch.zeros_like(lora_B))


def test_forced_backend(monkeypatch):
    x, weight, lora_A, lora_B, b = _problem()
    monkeypatch.setenv("FUSEDLORA_BACKEND", "reference")
    expected = float64_lora(x, weight.dequantize(torch.float64), lora_A, lora_B, 1.0, b)
    assert_close(fused_lora_linear(x, weight, lora_A, lora_B, 1.0, b), expected, torch.float32)
    monkeypatch.setenv("FUSEDLORA_BACKEND", "nonexistent")
    with pytest.raises(ValueError, match="names no backend"):
        fused_lora_linear(x, weight, lora_A, lora_B, 1.0, b)


def _spy_on_backends(monkeypatch) -> list:
    """Record (pass, backend) for every forward and backward that a backend runs."""
    calls = []

    def spy(name, fn, what):
        def called(*args):
            calls.append((what, name))
            return fn(*args)
        return called

    for name, backend in list(registry._BACKENDS.items()):
        monkeypatch.setitem(registry._BACKENDS, name, dataclasses.replace(
            backend, forward=spy(name, backend.forward, "fwd"), backward=spy(name, backend.backward, "bwd")))
    return calls


def test_the_backward_runs_on_the_backend_that_ran_the_forward(monkeypatch):
    pytest.importorskip("triton")
    calls = _spy_on_backends(monkeypatch)
    x, weight, lora_A, lora_B, b = _problem()
    x.requires_grad_()
    lora_B.requires_grad_()
    with on_backend("triton"):  # on the CPU, Triton runs only where it is forced
        y = fused_lora_linear(x, weight, lora_A, lora_B, 1.0, b, 0.1)
    y.sum().backward()
    assert calls == [("fwd", "triton"), ("bwd", "triton")]
    calls.clear()
    y = fused_lora_linear(x, weight, lora_A, lora_B, 1.0, b, 0.1)
    with on_backend("triton"):
        y.sum().backward()
    assert calls == [("fwd", "reference"), ("bwd", "reference")]


def test_compiled_code_runs_each_backward_where_its_forward_ran(monkeypatch):
    """The backend travels as a value of each call, not as a constant of the traced graph."""
    pytest.importorskip("triton")
    calls = _spy_on_backends(monkeypatch)
    x, weight, lora_A, lora_B, b = _problem(m=8, k=64, n=32, r=4, fmt="dense")
    lora_B.requires_grad_()
    compiled = torch.compile(lambda x: fused_lora_linear(x, weight, lora_A, lora_B, 0.5, b), fullgraph=True)
    compiled(x).sum().backward()
    assert calls == [("fwd", "reference"), ("bwd", "reference")]
    calls.clear()
    with on_backend("triton"):
        y = compiled(x)
    y.sum().backward()
    assert calls == [("fwd", "triton"), ("bwd", "triton")]


def test_forcing_is_scoped_nested_and_per_thread(monkeypatch):
    monkeypatch.delenv("FUSEDLORA_BACKEND", raising=False)
    assert backends.forced_backend() == ""
    seen_in_thread = []
    with backends.force_backend("reference"):
        with backends.force_backend("triton"):
            assert backends.forced_backend() == "triton"
            thread = threading.Thread(target=lambda: seen_in_thread.append(backends.forced_backend()))
            thread.start()
            thread.join()
        assert backends.forced_backend() == "reference"
    assert backends.forced_backend() == "" and seen_in_thread == [""]
    monkeypatch.setenv("FUSEDLORA_BACKEND", "reference")
    assert backends.forced_backend() == "reference"  # the variable is the default outside any block
    with pytest.raises(ValueError, match="backend 'trition' is not known"):
        with backends.force_backend("trition"):
            pass


def test_forced_backend_that_cannot_take_the_call_fails_loudly(monkeypatch):
    x, weight, lora_A, lora_B, b = _problem()
    picky = backends.Backend("picky", lambda problem: f"rank {problem.rank} is not 64", None, None, priority=-1)
    monkeypatch.setitem(registry._BACKENDS, "picky", picky)
    monkeypatch.setenv("FUSEDLORA_BACKEND", "picky")
    with pytest.raises(RuntimeError, match="picky cannot run this call: rank 8 is not 64"):
        fused_lora_linear(x, weight, lora_A, lora_B, 1.0, b)


def test_dispatch_takes_the_first_backend_that_can(monkeypatch):
    calls = []

    def forward(*args):
        calls.append("preferred")
        return registry._BACKENDS["reference"].forward(*args)

    preferred = backends.Backend("preferred", lambda p: None if p.fmt == "int8" else "int8 only", forward, None, priority=5)
    monkeypatch.setitem(registry._BACKENDS, "preferred", preferred)
    x, weight, lora_A, lora_B, b = _problem(fmt="nf4")
    fused_lora_linear(x, weight, lora_A, lora_B, 1.0, b)
    assert calls == []
    x, weight, lora_A, lora_B, b = _problem(fmt="int8")
    fused_lora_linear(x, weight, lora_A, lora_B, 1.0, b)
    assert calls == ["preferred"]


def _bad(**overrides):
    x, weight, lora_A, lora_B, b = _problem(m=4, k=64, n=32, r=4)
    args = dict(x=x, weight=weight, lora_A=lora_A, lora_B=lora_B, scaling=1.0, bias=b, dropout_p=0.0, seed=None)
    args.update(overrides)
    return args


@pytest.mark.parametrize(
    "overrides,error,fragment",
    [
        (dict(x=torch.ones(4, 64, dtype=torch.int64)), TypeError, "x must have a floating dtype"),
        (dict(x=torch.randn(4, 63)), ValueError, r"x must have shape \(\.\.\., in_features=64\)"),
        (dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
        (dict(lora_A=torch.randn(4, 65)), ValueError, "lora_A must have shape"),
        (dict(lora_A=torch.randn(0, 64), lora_B=torch.randn(32, 0)), ValueError, "rank r >= 1"),
        (dict(lora_B=torch.randn(32, 5)), ValueError, r"lora_B must have shape \(out_features=32, r=4\)"),
        (dict(lora_B=torch.ones(32, 4, dtype=torch.int32)), TypeError, "lora_B must have a floating dtype"),
        (dict(bias=torch.randn(31)), ValueError, r"bias must have shape \(32,\)"),
        (dict(bias=torch.randn(32, device="meta")), ValueError, "bias is on meta but x is on cpu"),
        (dict(scaling=float("nan")), ValueError, "scaling must be finite"),
        (dict(scaling="2"), TypeError, "scaling must be a real number"),
        (dict(scaling=torch.tensor(2.0)), TypeError, "scaling must be a real number"),
        (dict(dropout_p=None), TypeError, "dropout_p must be a real number"),
        (dict(dropout_p=1.0), ValueError, r"dropout_p must be a number in \[0, 1\)"),
        (dict(dropout_p=-0.1), ValueError, "dropout_p"),
        (dict(seed=-1), ValueError, "seed must be None or an int"),
        (dict(seed=2**32), ValueError, "seed must be None or an int"),
        (dict(weight=torch.randn(32)), ValueError, "weight must be 2-D"),
        (dict(weight="nf4"), TypeError, "weight must be a FrozenWeight"),
    ],
)
def test_bad_input_names_the_argument(overrides, error, fragment):
    with pytest.raises(error, match=fragment):
        fused_lora_linear(**_bad(**overrides))
