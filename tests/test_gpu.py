"""The GPU backends on a GPU (`pytest -m gpu`; bench/gpu_check.sh builds the CUDA extension first):
Triton and CUDA C++ against an fp32 oracle on the same GPU, every format, both forward paths and
all gradients, at Llama-3-8B sizes in bf16 (each large-M regime forced, too) and at ragged small
sizes in every dtype; the two backends against each other; the autotuner choosing a config.
Deselected without a GPU."""

import pytest
import torch

from fusedlora import fused_lora_linear, quantize
from fusedlora.backends import REGIMES, force_regime
from fusedlora.dropout import keep_mask
from helpers import assert_close

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

BACKENDS = ["triton", "cuda"]
LLAMA = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]  # (K, N) of the q/k-v/up/down projections
LARGE = [(fmt, m, k, n) for fmt in ("nf4", "int8", "fp8", "dense") for k, n in LLAMA for m in (1, 16, 2048)]
LARGE += [(fmt, 8192, 4096, 4096) for fmt in ("nf4", "dense")]
RAGGED = [(1, 64, 80), (3, 65, 48), (7, 96, 136), (33, 192, 80), (130, 200, 72)]  # (M, K, N)
SMALL = [(fmt, dtype, shape) for fmt in ("nf4", "fp4", "int8", "fp8", "dense")
         for dtype in (torch.float32, torch.float16, torch.bfloat16) for shape in RAGGED]


@pytest.fixture(autouse=True)
def ieee_fp32():
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the oracle must be real fp32
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


def _run(backend, monkeypatch, m, k, n, r, fmt, dtype, p=0.1, bias=False, seed=0, blocksize=64):
    """Backend results and fp32-oracle results for one problem: (y, dx, dA, dB) each."""
    monkeypatch.setenv("FUSEDLORA_BACKEND", backend)
    g = torch.Generator(device="cuda").manual_seed(seed + m + k + n + r)
    weight = quantize(torch.randn(n, k, device="cuda", generator=g) * 0.05, fmt, blocksize=blocksize)
    x = torch.randn(m, k, device="cuda", generator=g).to(dtype).requires_grad_()
    lora_A = (torch.randn(r, k, device="cuda", generator=g) / k**0.5).requires_grad_()
    lora_B = (torch.randn(n, r, device="cuda", generator=g) * 0.05).requires_grad_()
    b = torch.randn(n, device="cuda", generator=g).to(dtype) if bias else None
    grad_y = torch.randn(m, n, device="cuda", generator=g).to(dtype)
    y = fused_lora_linear(x, weight, lora_A, lora_B, 2.0, b, p, 4242)
    y.backward(grad_y)
    got = (y.detach(), x.grad, lora_A.grad, lora_B.grad)
    keep = keep_mask((m, k), p, 4242, "cuda")
    leaves = [t.detach().float().requires_grad_() for t in (x, lora_A, lora_B)]
    dropped = torch.where(keep, leaves[0] / (1 - p), 0.0)
    expected = leaves[0] @ weight.dequantize(torch.float32).t() + 2.0 * (dropped @ leaves[1].t()) @ leaves[2].t()
    if b is not None:
        expected = expected + b.float()
    expected.backward(grad_y.float())
    return got, (expected.detach(), *(t.grad for t in leaves))


def _assert_matches(got, expected, dtype):
    for name, a, e in zip(("y", "dx", "dA", "dB"), got, expected):
        assert a.dtype in (dtype, torch.float32) and torch.isfinite(a).all(), name
        assert_close(a, e, dtype, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", LARGE, ids=lambda c: f"{c[0]}-M{c[1]}-{c[2]}x{c[3]}")
def test_bf16_at_llama_sizes(backend, case, monkeypatch):
    fmt, m, k, n = case
    _assert_matches(*_run(backend, monkeypatch, m, k, n, 16 if (m + n) % 3 else 64, fmt, torch.bfloat16),
                    torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("index", range(len(SMALL)))
def test_ragged_shapes_every_dtype(backend, index, monkeypatch):
    fmt, dtype, (m, k, n) = SMALL[index]
    r = (1, 8, 12, 16, 200)[index % 5]
    _assert_matches(*_run(backend, monkeypatch, m, k, n, r, fmt, dtype, p=0.1 if index % 2 else 0.0,
                          bias=index % 3 == 0, blocksize=32 if index % 4 == 0 else 64), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("regime", REGIMES)
def test_each_large_m_regime_at_a_llama_size(backend, regime, monkeypatch):
    """Both regimes of both backends, forced (the choice by M takes one of them), on the nf4
    k/v projection at 2048 rows (a shape LARGE compiles and tunes already)."""
    with force_regime(regime):
        _assert_matches(*_run(backend, monkeypatch, 2048, 4096, 1024, 16, "nf4", torch.bfloat16, p=0.1, bias=True),
                        torch.bfloat16)


@pytest.mark.parametrize("case", [("nf4", 7, 4096, 4096), ("int8", 2048, 4096, 1024), ("dense", 1, 14336, 4096)])
def test_cuda_and_triton_agree(case, monkeypatch):
    fmt, m, k, n = case
    triton_results, _ = _run("triton", monkeypatch, m, k, n, 16, fmt, torch.bfloat16)
    cuda_results, _ = _run("cuda", monkeypatch, m, k, n, 16, fmt, torch.bfloat16)
    for a, b in zip(cuda_results, triton_results):
        assert_close(a, b.double(), torch.bfloat16)


def test_the_same_dropout_mask_on_both_backends(monkeypatch):
    k, p = 128, 0.3
    weight = quantize(torch.randn(32, k, device="cuda"), "nf4")
    from fusedlora.ops import lora_linear_fwd

    for backend in BACKENDS:
        monkeypatch.setenv("FUSEDLORA_BACKEND", backend)
        for m in (3, 100):
            x = torch.ones(m, k, device="cuda")
            _, u, _ = lora_linear_fwd(x, weight.tensors(), "nf4", [32, k], 64, torch.eye(k, device="cuda"),
                                   torch.randn(32, k, device="cuda"), 1.0, None, p, torch.tensor(99))
            assert torch.equal((u != 0).cpu(), keep_mask((m, k), p, 99)), (backend, m)


def test_autotuner_picks_a_config(monkeypatch):
    from fusedlora.backends import triton_launch as launch
    from fusedlora.kernels.backward import lora_grad_x_kernel
    from fusedlora.kernels.forward import lora_forward_kernel

    _run("triton", monkeypatch, 512, 4096, 1024, 16, "nf4", torch.bfloat16)
    capability = torch.cuda.get_device_capability()
    for kernel in (lora_forward_kernel, lora_grad_x_kernel):
        assert launch._autotuned(kernel, capability, True).best_config is not None


@pytest.mark.parametrize("backend,rows", [("triton", (1, 16)), ("cuda", (1, 16))])
def test_small_m_forwards_are_one_launch_that_cuda_graphs_replay(monkeypatch, backend, rows):
    """The small-M forwards, split over K (Triton: the one-row kernel and the MMA kernel; CUDA C++:
    its tensor-core kernel for 8 rows and for 16): each call can be captured; two graphs captured one after
    the other, then eager calls that grow the shared scratch, leave both graphs' replays on new
    inputs equal to eager calls bit for bit (the split-K sums run in slice order; a counter left
    non-zero would leave y unwritten), and every Triton counter zero."""
    from fusedlora.backends import triton_launch as launch

    monkeypatch.setenv("FUSEDLORA_BACKEND", backend)
    k, n = 4096, 4096
    g = torch.Generator(device="cuda").manual_seed(k + n)
    weight = quantize(torch.randn(n, k, device="cuda", generator=g) * 0.05, "nf4")
    lora_A = torch.randn(16, k, device="cuda", generator=g, dtype=torch.bfloat16) / k**0.5
    lora_B = torch.randn(n, 16, device="cuda", generator=g, dtype=torch.bfloat16) * 0.05
    xs = {m: torch.randn(m, k, device="cuda", generator=g, dtype=torch.bfloat16) for m in rows}
    graphs, outputs = {}, {}
    with torch.no_grad():
        for m, x in xs.items():
            fused_lora_linear(x, weight, lora_A, lora_B, 2.0, None, 0.0)  # compile outside the capture
            graphs[m] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graphs[m]):
                outputs[m] = fused_lora_linear(x, weight, lora_A, lora_B, 2.0, None, 0.0)
        fused_lora_linear(torch.randn(rows[-1], 2 * k, device="cuda", dtype=torch.bfloat16),
                          quantize(torch.randn(2 * n, 2 * k, device="cuda") * 0.05, "nf4"),
                          torch.randn(16, 2 * k, device="cuda", dtype=torch.bfloat16),
                          torch.randn(2 * n, 16, device="cuda", dtype=torch.bfloat16), 2.0, None, 0.0)
        for _ in range(2):
            for m, x in xs.items():
                x.copy_(torch.randn(m, k, device="cuda", generator=g, dtype=torch.bfloat16))
                graphs[m].replay()
                expected = fused_lora_linear(x, weight, lora_A, lora_B, 2.0, None, 0.0)
                torch.cuda.synchronize()
                assert torch.equal(outputs[m], expected), m
    counters = [c for _, c in launch._SCRATCH.values()] + [c for _, c in launch._CAPTURED_SCRATCH]
    assert all(not c.any() for c in counters) and (counters or backend == "cuda")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("m", [1, 5])
def test_4bit_codes_at_an_odd_byte_offset(backend, m, monkeypatch):
    """Packed codes that start at an odd byte (a view into a larger buffer) are read without a
    misaligned access (the Triton small-M kernels read aligned codes as 32-bit words) and give
    what the aligned copy gives."""
    from fusedlora.formats import FourBitWeight

    monkeypatch.setenv("FUSEDLORA_BACKEND", backend)
    g = torch.Generator(device="cuda").manual_seed(m)
    weight = quantize(torch.randn(4096, 4096, device="cuda", generator=g) * 0.05, "nf4")
    buffer = torch.empty(weight.packed.numel() + 1, dtype=torch.uint8, device="cuda")
    shifted = FourBitWeight("nf4", buffer[1:].view_as(weight.packed), weight.absmax, weight.shape, weight.dtype,
                            weight.blocksize, weight.nested_absmax, weight.nested_code, weight.nested_offset)
    shifted.packed.copy_(weight.packed)
    x = torch.randn(m, 4096, device="cuda", generator=g).to(torch.bfloat16)
    lora_A = (torch.randn(16, 4096, device="cuda", generator=g) / 64).to(torch.bfloat16)
    lora_B = (torch.randn(4096, 16, device="cuda", generator=g) * 0.05).to(torch.bfloat16)
    with torch.no_grad():
        y, y_shifted = (fused_lora_linear(x, w, lora_A, lora_B, 2.0) for w in (weight, shifted))
        expected = x.float() @ weight.dequantize(torch.float32).t() + 2.0 * (x.float() @ lora_A.float().t()) @ \
            lora_B.float().t()
    torch.cuda.synchronize()
    assert_close(y_shifted, expected, torch.bfloat16, "y")
    torch.testing.assert_close(y_shifted, y, rtol=1e-2, atol=1e-2)
