"""Parity with PEFT: with the same A and B, LoRALinear computes what PEFT's LoRA computes, on a
dense nn.Linear and on a bitsandbytes Linear4bit (both on the CPU). The Linear4bit's own forward
is replaced by what its bytes mean (`helpers.bnb_linear4bit_decoded_by_hand`): bitsandbytes' CPU
kernels depend on the processor, so they are no oracle; PEFT's LoRA wrapper around it is."""

import pytest
import torch
import torch.nn as nn

from fusedlora import LoRALinear
from helpers import assert_close, bnb_linear4bit_decoded_by_hand

peft = pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")


def _peft_model(base: nn.Module, r: int, alpha: int, rslora: bool = False):
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], lora_dropout=0.0, use_rslora=rslora)
    return peft.get_peft_model(base, config)


class _Wrapper(nn.Module):
    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def _compare(peft_layer, ours: LoRALinear, x: torch.Tensor, dtype: torch.dtype):
    """y and every gradient of ours against PEFT's, normwise with the tolerance table's `dtype`
    entry (the two sum in different orders, and a CPU's BLAS may block fp32 sums as it likes)."""
    with torch.no_grad():
        nn.init.normal_(peft_layer.lora_B["default"].weight, std=0.1)
        ours.lora_A.weight.copy_(peft_layer.lora_A["default"].weight)
        ours.lora_B.weight.copy_(peft_layer.lora_B["default"].weight)
    assert ours.scaling == peft_layer.scaling["default"]
    x_peft, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_peft, y_ours = peft_layer(x_peft), ours(x_ours)
    grad = torch.randn_like(y_peft)
    y_peft.backward(grad)
    y_ours.backward(grad)
    assert y_ours.dtype == y_peft.dtype and x_ours.grad.dtype == x_peft.grad.dtype
    assert_close(y_ours, y_peft, dtype, "y")
    assert_close(x_ours.grad, x_peft.grad, dtype, "dx")
    assert_close(ours.lora_A.weight.grad, peft_layer.lora_A["default"].weight.grad, dtype, "dA")
    assert_close(ours.lora_B.weight.grad, peft_layer.lora_B["default"].weight.grad, dtype, "dB")


@pytest.mark.parametrize("rslora", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_dense_linear_matches_peft(rslora, bias):
    torch.manual_seed(0)
    linear = nn.Linear(96, 80, bias=bias)
    ours = LoRALinear.from_linear(linear, r=8, alpha=16, quant="dense", rslora=rslora)
    model = _peft_model(_Wrapper(linear), r=8, alpha=16, rslora=rslora)
    _compare(model.base_model.model.proj, ours, torch.randn(3, 7, 96), torch.float32)


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_linear4bit_matches_peft_on_bitsandbytes(double_quant):
    torch.manual_seed(0)
    linear = nn.Linear(128, 80)
    layer = bnb.nn.Linear4bit(128, 80, quant_type="nf4", compress_statistics=double_quant, compute_dtype=torch.float32)
    layer.load_state_dict(linear.state_dict())
    layer = layer.to("cpu")
    ours = LoRALinear.from_linear(layer, r=8, alpha=16)
    model = _peft_model(_Wrapper(layer), r=8, alpha=16)
    with bnb_linear4bit_decoded_by_hand(bnb):
        _compare(model.base_model.model.proj, ours, torch.randn(5, 128), torch.float32)


def test_qlora_setting_bf16_activations_fp32_adapters_matches_peft():
    torch.manual_seed(0)
    linear = nn.Linear(128, 80, dtype=torch.bfloat16)
    layer = bnb.nn.Linear4bit(128, 80, quant_type="nf4", compute_dtype=torch.bfloat16)
    layer.load_state_dict(linear.state_dict())
    layer = layer.to("cpu")
    ours = LoRALinear.from_linear(layer, r=8, alpha=16)
    model = _peft_model(_Wrapper(layer), r=8, alpha=16)
    peft_layer = model.base_model.model.proj
    assert peft_layer.lora_A["default"].weight.dtype == torch.float32 == ours.lora_A.weight.dtype
    with bnb_linear4bit_decoded_by_hand(bnb):
        _compare(peft_layer, ours, torch.randn(5, 128, dtype=torch.bfloat16), torch.bfloat16)
