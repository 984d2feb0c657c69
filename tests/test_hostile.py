"""Hostile numbers on every backend: NaN and Inf propagate as nn.Linear propagates them, fp16
overflow saturates like nn.Linear in fp16, zero / denormal / huge weights stay finite, scaling 0
and B = 0 give the base output, and r above min(K, N) works the same everywhere. Each test runs on
the CPU backends (Triton under the interpreter) and, with `-m gpu`, on the GPU backends; the GPU
part also checks 64-bit indexing with tensors past 2^31 elements."""

import pytest
import torch
import torch.nn.functional as F

from fusedlora import fused_lora_linear, quantize
from helpers import assert_close, float64_lora, on_backend, random_weight

# The interpreter's numpy warns about the NaN and Inf these tests feed it on purpose.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning:triton.runtime.interpreter")
_GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
BACKENDS = [
    pytest.param("reference", "cpu", id="reference"),
    pytest.param("triton", "cpu", id="triton-interpreter"),
    pytest.param("triton", "cuda", id="triton-gpu", marks=_GPU),
    pytest.param("cuda", "cuda", id="cuda-gpu", marks=_GPU),
]
ROWS = [5, 40]  # both forward paths of the kernels: small-M (M <= 16) and shrink + GEMM


def _float64(x, weight, lora_A, lora_B, scaling, bias=None):
    """The float64 result on the CPU, whatever device the inputs are on."""
    return float64_lora(x.cpu(), weight.dequantize(torch.float64).cpu(), lora_A.cpu(), lora_B.cpu(), scaling,
                        None if bias is None else bias.cpu())


def _adapters(n, k, r, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    lora_A = (torch.randn(r, k, generator=g) / k**0.5).to(device, dtype)
    lora_B = torch.randn(n, r, generator=g).to(device, dtype)
    return lora_A, lora_B


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("fmt", ["nf4", "int8", "dense"])
@pytest.mark.parametrize("m", ROWS)
def test_nan_and_inf_in_x_propagate_like_nn_linear(backend, device, fmt, m):
    """The rows that hold a NaN or an Inf come out non-finite, as from nn.Linear; the other rows
    are untouched (they match float64)."""
    k, n = 64, 48
    weight = quantize(random_weight(n, k).to(device), fmt)
    x = torch.randn(m, k, device=device)
    x[1, 5], x[2, 0], x[3, 1] = float("nan"), float("inf"), float("-inf")
    lora_A, lora_B = _adapters(n, k, 4, device)
    bias = torch.randn(n, device=device)
    with on_backend(backend, device):
        y = fused_lora_linear(x, weight, lora_A, lora_B, 1.0, bias)
    expected = F.linear(x, weight.dequantize(), bias)
    assert torch.equal(torch.isfinite(y), torch.isfinite(expected))
    assert not torch.isfinite(y[1:4]).any()
    clean = [i for i in range(m) if i not in (1, 2, 3)]
    assert_close(y[clean].cpu(), _float64(x[clean], weight, lora_A, lora_B, 1.0, bias), torch.float32)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("m", ROWS)
def test_nan_and_inf_in_the_weight_propagate_like_nn_linear(backend, device, m):
    """A dense W with NaN / Inf entries: the same non-finite pattern as F.linear (every row of y
    is touched in the columns those weights feed). The quantized formats refuse such a weight at
    quantize time, naming the format, since their scales would turn whole blocks into NaN."""
    k, n = 64, 48
    w = random_weight(n, k).to(device)
    w[3, 7], w[10, 0], w[11, 63] = float("nan"), float("inf"), float("-inf")
    x = torch.randn(m, k, device=device)
    lora_A, lora_B = _adapters(n, k, 4, device)
    weight = quantize(w, "dense")
    with on_backend(backend, device):
        y = fused_lora_linear(x, weight, lora_A, lora_B, 1.0)
    assert torch.equal(torch.isfinite(y), torch.isfinite(F.linear(x, w)))
    assert not torch.isfinite(y[:, [3, 10, 11]]).any()
    for fmt in ("nf4", "fp4", "int8", "fp8"):
        with pytest.raises(ValueError, match=f"weight holds NaN or Inf values, which the '{fmt}' format cannot"):
            quantize(w, fmt)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("m", ROWS)
def test_fp16_overflow_saturates_like_nn_linear(backend, device, m):
    """Outputs past fp16's range become ±Inf exactly where F.linear in fp16 overflows (both
    accumulate in fp32 and round once), and nowhere else."""
    k, n = 64, 48
    g = torch.Generator().manual_seed(3)
    w = torch.randn(n, k, generator=g)
    w[:8] *= 4096.0  # with |x| ~ 16: eight output columns of about 2^12·16·sqrt(64) ≈ 5e5, mostly past 65504
    weight = quantize(w.to(device, torch.float16), "dense")
    x = (torch.randn(m, k, generator=g) * 16).to(device, torch.float16)
    lora_A, lora_B = _adapters(n, k, 4, device, torch.float16)
    with on_backend(backend, device):
        y = fused_lora_linear(x, weight, lora_A, torch.zeros_like(lora_B), 1.0)
    expected = F.linear(x.float(), weight.weight.float()).half()
    assert y.dtype == torch.float16
    assert torch.equal(torch.isinf(y), torch.isinf(expected)) and torch.isinf(y).any()
    assert torch.equal(torch.sign(y[torch.isinf(y)]), torch.sign(expected[torch.isinf(expected)]))
    assert torch.isfinite(y[:, 8:]).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int8", "fp8"])
def test_zero_denormal_and_tiny_blocks_run_finite(backend, device, fmt):
    """Whole 4-bit blocks of zeros (absmax 0), denormal and tiny rows go through the kernels'
    dequantization without NaN and match the float64 result on the dequantized weight."""
    k, n, m = 128, 24, 40
    w = random_weight(n, k)
    w[0] = 0.0
    w[1] = 1e-40  # denormal in fp32
    w[2] = torch.randn(k) * 1e-30
    w[5, :64] = 0.0  # one zero block of 64 in an otherwise ordinary row
    weight = quantize(w.to(device), fmt, blocksize=64)
    x = torch.randn(m, k, device=device)
    lora_A, lora_B = _adapters(n, k, 4, device)
    with on_backend(backend, device):
        y = fused_lora_linear(x, weight, lora_A, lora_B, 1.0)
    assert torch.isfinite(y).all()
    assert_close(y.cpu(), _float64(x, weight, lora_A, lora_B, 1.0), torch.float32)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("fmt", ["nf4", "int8", "dense"])
@pytest.mark.parametrize("m", ROWS)
def test_zero_scaling_and_zero_b_give_the_base_output_bit_for_bit(backend, device, fmt, m):
    """scaling = 0 switches the branch off; B = 0 adds an exact zero: the two outputs are equal
    bit for bit, and equal the base x·Wᵀ + bias."""
    k, n = 96, 40
    weight = quantize(random_weight(n, k).to(device), fmt)
    x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    lora_A, lora_B = _adapters(n, k, 8, device, torch.bfloat16)
    bias = torch.randn(n, device=device, dtype=torch.bfloat16)
    with on_backend(backend, device):
        off = fused_lora_linear(x, weight, lora_A, lora_B, 0.0, bias)
        zero_b = fused_lora_linear(x, weight, lora_A, torch.zeros_like(lora_B), 3.0, bias, 0.2, seed=1)
    assert torch.equal(off, zero_b)
    assert_close(off.cpu(), _float64(x, weight, lora_A, torch.zeros_like(lora_B), 0.0, bias), torch.bfloat16)
    if backend == "reference":
        assert torch.equal(off, F.linear(x, weight.dequantize(torch.bfloat16), bias))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("m", ROWS)
def test_rank_above_min_of_k_and_n_is_allowed(backend, device, m):
    """r > min(K, N) is a valid (if wasteful) adapter: every backend runs it, forward and backward."""
    k, n, r = 6, 5, 24
    weight = quantize(random_weight(n, k).to(device), "int8")
    x = torch.randn(m, k, device=device, requires_grad=True)
    lora_A, lora_B = (t.requires_grad_() for t in _adapters(n, k, r, device))
    with on_backend(backend, device):
        y = fused_lora_linear(x, weight, lora_A, lora_B, 0.5)
        y.sum().backward()
    assert_close(y.cpu(), _float64(x, weight, lora_A, lora_B, 0.5), torch.float32)
    assert lora_A.grad.shape == (r, k) and torch.isfinite(lora_A.grad).all() and torch.isfinite(x.grad).all()


def _tail_rows_match(y, x, weight, lora_A, lora_B, rows=64):
    """The last `rows` rows of y (those whose offsets passed 2^31) against an fp32 computation."""
    x_tail = x[-rows:].float()
    expected = x_tail @ weight.dequantize(torch.float32).t() + (x_tail @ lora_A.float().t()) @ lora_B.float().t()
    assert_close(y[-rows:].float(), expected, torch.bfloat16, "tail rows")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_activations_past_two_to_the_31_elements(backend):
    """x and dx of 2^31 + 2^18 elements (bf16, 4.3 GB each): offsets need 64-bit arithmetic."""
    k, n, r = 4096, 64, 16
    m = 2**31 // k + 64
    weight = quantize(torch.randn(n, k, device="cuda") * 0.05, "nf4")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    lora_A, lora_B = (t.requires_grad_() for t in _adapters(n, k, r, "cuda", torch.bfloat16))
    with on_backend(backend, "cuda"):
        y = fused_lora_linear(x, weight, lora_A, lora_B, 1.0)
        _tail_rows_match(y, x.detach(), weight, lora_A.detach(), lora_B.detach())
        grad_y = torch.randn_like(y)
        y.backward(grad_y)
    dx_tail = grad_y[-64:].float() @ weight.dequantize(torch.float32) \
        + (grad_y[-64:].float() @ lora_B.detach().float()) @ lora_A.detach().float()
    assert_close(x.grad[-64:].float(), dx_tail, torch.bfloat16, "dx tail rows")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("m", [16, 80])
def test_a_4bit_weight_past_two_to_the_31_elements(backend, m):
    """W of 2^31 + 2^20 nf4 elements (1 GB packed): the nibble index, its byte and its absmax block
    need 64-bit arithmetic, in the small-M kernel and the GEMM."""
    k, r = 8192, 16
    n = 2**31 // k + 128
    weight = quantize(torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.05, "nf4")
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    lora_A, lora_B = _adapters(n, k, r, "cuda", torch.bfloat16)
    with on_backend(backend, "cuda"):
        y = fused_lora_linear(x, weight, lora_A, lora_B, 1.0)
    tail = slice(n - 256, n)
    w_tail = weight.dequantize(torch.float32)[tail]
    expected = x.float() @ w_tail.t() + (x.float() @ lora_A.float().t()) @ lora_B[tail].float().t()
    assert_close(y[:, tail].float(), expected, torch.bfloat16, "last output columns")
