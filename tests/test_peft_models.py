"""Whole Hugging Face models against the real PEFT. GPT-2, whose projections are transformers'
`Conv1D` (weight stored (in, out)): "all-linear" wraps what PEFT wraps, the outputs and
gradients are PEFT's with the same adapters, PEFT loads what fusedlora saves and the other way
round, and merging gives Conv1D layers back that plain transformers saves and loads. BERT for
sequence classification: the head is trained whole, not adapted, as PEFT's SEQ_CLS task does
(modules_to_save), and travels in the adapter file both ways."""

import json

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


def _bert_cls():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, num_labels=3)
    return transformers.BertForSequenceClassification(config).eval()


def _peft_bert_cls():
    model = peft.get_peft_model(_bert_cls(), peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                              target_modules="all-linear"))
    torch.manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(getattr(module, "lora_B", None), nn.ModuleDict):
                nn.init.normal_(module.lora_B["default"].weight, std=0.1)
        head = model.base_model.model.classifier.modules_to_save["default"]
        head.weight.add_(torch.randn_like(head.weight))  # a trained head differs from the base's
    return model


def test_bert_classifier_is_trained_whole_as_peft_seq_cls_does():
    theirs = _peft_bert_cls()
    ours = fusedlora.apply_lora(_bert_cls(), "all-linear", r=4, alpha=8, quant=None)
    assert sorted(fusedlora.lora_layers(ours)) == sorted(_peft_layers(theirs))
    assert "classifier" not in fusedlora.lora_layers(ours)
    assert all(p.requires_grad for p in ours.classifier.parameters())
    trainable = sorted(name for name, p in ours.named_parameters() if p.requires_grad and "lora_" not in name)
    assert trainable == ["classifier.bias", "classifier.weight"]


def test_peft_loads_what_fusedlora_saves_for_bert_seq_cls_and_the_other_way(tmp_path):
    theirs = _peft_bert_cls()
    theirs.save_pretrained(tmp_path / "peft")
    ours = fusedlora.load_adapter(_bert_cls(), tmp_path / "peft")
    assert ours.classifier.weight.requires_grad and "classifier" not in fusedlora.lora_layers(ours)
    with torch.no_grad():
        expected = theirs(input_ids=_ids()).logits
        assert_close(ours(input_ids=_ids()).logits, expected, torch.float32, "loaded from PEFT")
    fusedlora.save_adapter(ours, tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(_bert_cls(), tmp_path / "ours").eval()
    assert again.peft_config["default"].task_type == "SEQ_CLS"
    with torch.no_grad():
        assert_close(again(input_ids=_ids()).logits, expected, torch.float32, "PEFT loading ours")


def test_an_explicit_modules_to_save_that_matches_nothing_is_refused():
    with pytest.raises(ValueError, match=r"modules_to_save=\['head'\]: \['head'\] match no module"):
        fusedlora.apply_lora(_bert_cls(), "all-linear", modules_to_save=["head"])
    plain = fusedlora.apply_lora(_bert_cls(), "all-linear", quant=None, modules_to_save=None)
    assert "classifier" in fusedlora.lora_layers(plain)


def test_a_training_state_holds_the_head_trained_whole(tmp_path):
    model = fusedlora.apply_lora(_bert_cls(), "all-linear", r=4)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    fusedlora.save_training_state(tmp_path / "state.safetensors", model, step=3)
    resumed = fusedlora.apply_lora(_bert_cls(), "all-linear", r=4)
    assert not torch.equal(resumed.classifier.weight, model.classifier.weight)
    assert fusedlora.load_training_state(tmp_path / "state.safetensors", resumed)["step"] == 3
    assert torch.equal(resumed.classifier.weight, model.classifier.weight)


def test_a_dense_gpt2_state_dict_is_gpt2s_own_and_reloads_square_layers_as_they_were():
    ours = fusedlora.apply_lora(_gpt2(), "all-linear", r=4, quant=None)
    state = ours.state_dict()
    original = _gpt2().state_dict()
    for key in ("transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_proj.weight"):  # c_proj is square
        assert torch.equal(state[key], original[key]), key
    again = fusedlora.apply_lora(_gpt2(), "all-linear", r=4, quant=None)
    with torch.no_grad():
        for layer in fusedlora.lora_layers(ours).values():
            nn.init.normal_(layer.lora_B.weight)
    again.load_state_dict(ours.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=_ids()).logits, ours(input_ids=_ids()).logits)


def test_modules_to_save_are_recorded_by_full_name_and_task_type_only_with_the_head(tmp_path):
    adapted_head = fusedlora.apply_lora(_bert_cls(), "all-linear", r=4, quant=None, modules_to_save=None)
    fusedlora.save_adapter(adapted_head, tmp_path / "adapted")
    config = json.loads((tmp_path / "adapted" / "adapter_config.json").read_text())
    assert config["task_type"] is None and config["modules_to_save"] is None
    peft.PeftModel.from_pretrained(_bert_cls(), tmp_path / "adapted")
    deep = fusedlora.apply_lora(_bert_cls(), "all-linear", r=4, quant=None,
                                modules_to_save=["layer.1.output.dense"])
    fusedlora.save_adapter(deep, tmp_path / "deep")
    config = json.loads((tmp_path / "deep" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["bert.encoder.layer.1.output.dense"] and config["task_type"] is None
    loaded = fusedlora.load_adapter(_bert_cls(), tmp_path / "deep")
    assert loaded.bert.encoder.layer[1].output.dense.weight.requires_grad


def test_a_tied_module_is_not_trained_whole():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    with pytest.raises(ValueError, match="lm_head.*shares parameters with.*embed_tokens"):
        fusedlora.apply_lora(transformers.LlamaForCausalLM(config), "all-linear", modules_to_save=["lm_head"])
