"""Whole Hugging Face models against the real PEFT: GPT-2, whose projections are transformers'
`Conv1D` (weight stored (in, out)). "all-linear" wraps what PEFT wraps, the outputs and
gradients are PEFT's with the same adapters, PEFT loads what fusedlora saves and the other way
round, and merging gives Conv1D layers back that plain transformers saves and loads."""

import pytest
import torch
import torch.nn as nn

import fusedlora
from helpers import assert_close

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    return transformers.GPT2LMHeadModel(config).eval()


def _ids():
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))


def _peft_gpt2():
    model = peft.get_peft_model(_gpt2(), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                          fan_in_fan_out=True))
    torch.manual_seed(1)
    for module in model.modules():
        if isinstance(getattr(module, "lora_B", None), nn.ModuleDict):
            nn.init.normal_(module.lora_B["default"].weight, std=0.1)
    return model


def _peft_layers(model) -> dict:
    return {name.removeprefix("base_model.model."): module for name, module in model.named_modules()
            if isinstance(getattr(module, "lora_A", None), nn.ModuleDict)}


def _logits_and_grads(model, params: dict):
    ids = _ids()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {name: p.grad for name, p in params.items()}


def test_gpt2_all_linear_wraps_what_peft_wraps_and_computes_the_same():
    theirs = _peft_gpt2()
    ours = fusedlora.apply_lora(_gpt2(), "all-linear", r=4, alpha=8, quant=None)
    layers = fusedlora.lora_layers(ours)
    assert sorted(layers) == sorted(_peft_layers(theirs)) and len(layers) == 8
    assert all(layer.fan_in_fan_out for layer in layers.values())
    with torch.no_grad():
        for name, module in _peft_layers(theirs).items():
            layers[name].lora_A.weight.copy_(module.lora_A["default"].weight)
            layers[name].lora_B.weight.copy_(module.lora_B["default"].weight)
    their_params = {name: module.lora_A["default"].weight for name, module in _peft_layers(theirs).items()}
    our_params = {name: layer.lora_A.weight for name, layer in layers.items()}
    their_logits, their_grads = _logits_and_grads(theirs, their_params)
    our_logits, our_grads = _logits_and_grads(ours, our_params)
    assert_close(our_logits, their_logits, torch.float32, "logits")
    for name in their_grads:
        assert_close(our_grads[name], their_grads[name], torch.float32, f"{name} dA")


def test_peft_loads_what_fusedlora_saves_for_gpt2_and_the_other_way(tmp_path):
    theirs = _peft_gpt2()
    theirs.save_pretrained(tmp_path / "peft")
    ours = fusedlora.load_adapter(_gpt2(), tmp_path / "peft")
    with torch.no_grad():
        expected = theirs(input_ids=_ids()).logits
        assert_close(ours(input_ids=_ids()).logits, expected, torch.float32, "loaded from PEFT")
    fusedlora.save_adapter(ours, tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(_gpt2(), tmp_path / "ours").eval()
    assert again.peft_config["default"].fan_in_fan_out
    with torch.no_grad():
        assert_close(again(input_ids=_ids()).logits, expected, torch.float32, "PEFT loading ours")


def test_a_merged_gpt2_is_plain_conv1d_that_transformers_reloads(tmp_path):
    from transformers.pytorch_utils import Conv1D

    theirs = _peft_gpt2()
    theirs.save_pretrained(tmp_path / "peft")
    ours = fusedlora.load_adapter(_gpt2(), tmp_path / "peft")
    with torch.no_grad():
        expected = ours(input_ids=_ids()).logits
    merged = fusedlora.merge_and_unload(ours)
    assert isinstance(merged.transformer.h[0].attn.c_attn, Conv1D) and not fusedlora.lora_layers(merged)
    merged.save_pretrained(tmp_path / "merged")
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert_close(reloaded(input_ids=_ids()).logits, expected, torch.float32, "merged and reloaded")


def test_a_quantized_conv1d_holds_the_transposed_weight_and_loads_the_conv1d_layout():
    model = fusedlora.apply_lora(_gpt2(), "all-linear", r=4, quant="nf4")
    layer = model.transformer.h[0].attn.c_attn
    conv = _gpt2().transformer.h[0].attn.c_attn
    expected = fusedlora.quantize(conv.weight.detach().t().contiguous(), "nf4")
    assert layer.weight.shape == (conv.nf, conv.weight.shape[0])
    assert all(torch.equal(a, b) for a, b in zip(layer.weight.tensors(), expected.tensors()))
    dense = fusedlora.apply_lora(_gpt2(), "all-linear", r=4, quant=None)
    dense.load_state_dict(_gpt2().state_dict(), strict=False)  # GPT-2's own (in, out) Conv1D weights
    assert torch.equal(dense.transformer.h[0].attn.c_attn.weight.weight, conv.weight.detach().t())
