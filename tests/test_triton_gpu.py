"""The Triton backend on a GPU at real sizes (`pytest -m gpu`): Llama-3-8B projections in bf16,
every format, both forward paths and all gradients, against an fp32 oracle on the same GPU; and
the autotuner choosing a config. Deselected by default; bench/gpu_check.sh runs it."""

import pytest
import torch

from fusedlora import fused_lora_linear, quantize
from fusedlora.dropout import keep_mask
from helpers import assert_close

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

LLAMA = [(4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096)]  # (K, N) of the q/k-v/up/down projections
CASES = [(fmt, m, k, n) for fmt in ("nf4", "int8", "fp8", "dense") for k, n in LLAMA for m in (1, 16, 2048)]
CASES += [(fmt, 8192, 4096, 4096) for fmt in ("nf4", "dense")]


def _fp32_oracle(x, w, lora_A, lora_B, scaling, keep, p, grad_y):
    leaves = [t.detach().float().requires_grad_() for t in (x, lora_A, lora_B)]
    dropped = torch.where(keep, leaves[0] / (1 - p), 0.0)
    y = leaves[0] @ w.t() + scaling * (dropped @ leaves[1].t()) @ leaves[2].t()
    y.backward(grad_y.float())
    return y.detach(), [t.grad for t in leaves]


@pytest.fixture(autouse=True)
def ieee_fp32(monkeypatch):
    monkeypatch.setenv("FUSEDLORA_BACKEND", "triton")
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # the oracle must be real fp32
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-M{c[1]}-{c[2]}x{c[3]}")
def test_bf16_parity_at_llama_sizes(case):
    fmt, m, k, n = case
    r = 16 if (m + n) % 3 else 64
    g = torch.Generator(device="cuda").manual_seed(m + k + n)
    weight = quantize(torch.randn(n, k, device="cuda", generator=g) * 0.02, fmt)
    x = torch.randn(m, k, device="cuda", generator=g).bfloat16().requires_grad_()
    lora_A = (torch.randn(r, k, device="cuda", generator=g) / k**0.5).requires_grad_()
    lora_B = (torch.randn(n, r, device="cuda", generator=g) * 0.02).requires_grad_()
    grad_y = torch.randn(m, n, device="cuda", generator=g).bfloat16()
    p, seed = 0.1, 4242
    y = fused_lora_linear(x, weight, lora_A, lora_B, 2.0, None, p, seed)
    y.backward(grad_y)
    keep = keep_mask((m, k), p, seed, "cuda")
    y_ref, (dx, dA, dB) = _fp32_oracle(x, weight.dequantize(torch.float32), lora_A, lora_B, 2.0, keep, p, grad_y)
    assert_close(y, y_ref, torch.bfloat16, "y")
    assert_close(x.grad, dx, torch.bfloat16, "dx")
    assert_close(lora_A.grad, dA, torch.bfloat16, "dA")
    assert_close(lora_B.grad, dB, torch.bfloat16, "dB")


def test_autotuner_picks_a_config():
    from fusedlora.kernels import launch
    from fusedlora.kernels.backward import lora_grad_x_kernel
    from fusedlora.kernels.forward import lora_forward_kernel

    weight = quantize(torch.randn(1024, 4096, device="cuda"), "nf4")
    x = torch.randn(512, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    lora_A = torch.randn(16, 4096, device="cuda", requires_grad=True)
    lora_B = torch.randn(1024, 16, device="cuda", requires_grad=True)
    fused_lora_linear(x, weight, lora_A, lora_B, 1.0).sum().backward()
    capability = torch.cuda.get_device_capability()
    for kernel in (lora_forward_kernel, lora_grad_x_kernel):
        assert launch._autotuned(kernel, capability).best_config is not None
