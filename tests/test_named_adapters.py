"""Named adapters over one frozen base, against the real PEFT: add, switch (no copy of the base,
no re-quantization), disable for a block, delete, and PEFT's multi-adapter folders both ways."""

import pytest
import torch
import torch.nn as nn

import fusedlora
from helpers import assert_close

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


def _llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    return transformers.LlamaForCausalLM(config).eval()


def _ids():
    return torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(5))


def _logits(model):
    with torch.no_grad():
        return model(input_ids=_ids()).logits


def _two_adapters(quant=None):
    model = fusedlora.apply_lora(_llama(), "all-linear", r=4, alpha=8, quant=quant)
    fusedlora.add_adapter(model, "email", r=8, alpha=4)
    torch.manual_seed(2)
    for name in ("email", "default"):
        fusedlora.set_adapter(model, name)
        for layer in fusedlora.lora_layers(model).values():
            nn.init.normal_(layer.lora_B.weight, std=0.1)
    return model


def test_switching_adapters_changes_the_output_and_never_the_base():
    model = _two_adapters(quant="nf4")
    layer = model.model.layers[0].self_attn.q_proj
    storage = [(name, parameter, parameter.data_ptr()) for name, parameter in layer.named_parameters()
               if name.startswith("frozen_")]
    default = _logits(model)
    fusedlora.set_adapter(model, "email")
    assert fusedlora.active_adapter(model) == "email" and fusedlora.adapter_names(model) == ["email", "default"]
    assert layer.r == 8 and layer.scaling == 0.5
    email = _logits(model)
    assert not torch.allclose(email, default)
    assert all(getattr(layer, name) is parameter and parameter.data_ptr() == pointer for name, parameter, pointer in storage)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert not any("inactive_adapters" in name for name in trainable)
    fusedlora.set_adapter(model, "default")
    assert torch.equal(_logits(model), default)


def test_disable_adapter_gives_the_base_and_delete_removes_an_inactive_adapter():
    base = _logits(_llama())
    model = _two_adapters()
    with fusedlora.disable_adapter(model):
        assert_close(_logits(model), base, torch.float32, "adapters disabled")
    assert not torch.allclose(_logits(model), base)
    with pytest.raises(ValueError, match="active one"):
        fusedlora.delete_adapter(model, "default")
    fusedlora.delete_adapter(model, "email")
    assert fusedlora.adapter_names(model) == ["default"]
    with pytest.raises(KeyError, match="no adapter 'email'"):
        fusedlora.set_adapter(model, "email")


def test_training_one_adapter_leaves_the_other_as_it_was():
    model = _two_adapters()
    fusedlora.set_adapter(model, "email")
    default_before = {name: p.clone() for name, p in model.named_parameters() if "inactive_adapters.default" in name}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = _ids()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert default_before and all(torch.equal(p, default_before[name]) for name, p in model.named_parameters()
                                  if name in default_before)


def test_peft_loads_a_multi_adapter_folder_fusedlora_saves_and_the_other_way(tmp_path):
    ours = _two_adapters()
    expected = {}
    for name in ("default", "email"):
        fusedlora.set_adapter(ours, name)
        expected[name] = _logits(ours)
    fusedlora.save_adapter(ours, tmp_path / "ours")
    assert (tmp_path / "ours" / "adapter_config.json").is_file()
    assert (tmp_path / "ours" / "email" / "adapter_model.safetensors").is_file()
    theirs = peft.PeftModel.from_pretrained(_llama(), tmp_path / "ours").eval()
    theirs.load_adapter(tmp_path / "ours" / "email", adapter_name="email")
    for name in ("default", "email"):
        theirs.set_adapter(name)
        assert_close(_logits(theirs), expected[name], torch.float32, f"PEFT with {name}")
    theirs.save_pretrained(tmp_path / "peft")
    back = fusedlora.load_adapter(_llama(), tmp_path / "peft")
    fusedlora.load_adapter(back, tmp_path / "peft" / "email", adapter_name="email")
    assert fusedlora.active_adapter(back) == "default"
    for name in ("default", "email"):
        fusedlora.set_adapter(back, name)
        assert_close(_logits(back), expected[name], torch.float32, f"loaded back, {name}")


def test_an_adapter_for_other_layers_is_refused_and_leaves_no_trace(tmp_path):
    model = fusedlora.apply_lora(_llama(), ["q_proj"], r=4, quant=None)
    other = fusedlora.apply_lora(_llama(), ["v_proj"], r=4, quant=None)
    fusedlora.save_adapter(other, tmp_path / "v")
    with pytest.raises(fusedlora.AdapterFileError, match="does not fit"):
        fusedlora.load_adapter(model, tmp_path / "v", adapter_name="vproj")
    assert fusedlora.adapter_names(model) == ["default"]
    with pytest.raises(ValueError, match="adapter name must be"):
        fusedlora.add_adapter(model, "values")


def test_a_new_adapter_is_frozen_until_set():
    model = fusedlora.apply_lora(_llama(), "all-linear", r=4, quant=None)
    fusedlora.add_adapter(model, "email")
    assert not any(p.requires_grad for name, p in model.named_parameters() if "inactive_adapters" in name)


def test_a_switch_that_cannot_happen_everywhere_happens_nowhere():
    model = _two_adapters()
    model.model.layers[1].mlp.down_proj.merge()
    with pytest.raises(RuntimeError, match="down_proj is merged"):
        fusedlora.set_adapter(model, "email")
    assert {layer.active_adapter for layer in fusedlora.lora_layers(model).values()} == {"default"}
    with pytest.raises(ValueError, match="named adapters"):
        fusedlora.apply_lora(model, ["lm_head"], r=4)


def test_saving_one_adapter_keeps_the_others_and_a_training_state_knows_its_adapter(tmp_path):
    model = _two_adapters()
    fusedlora.save_adapter(model, tmp_path / "a", adapter_name="default")
    (tmp_path / "a" / "notes.txt").write_text("mine")
    fusedlora.save_adapter(model, tmp_path / "a", adapter_name="email")
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file() and (tmp_path / "a" / "notes.txt").is_file()
    assert (tmp_path / "a" / "email" / "adapter_model.safetensors").is_file()
    fusedlora.set_adapter(model, "email")
    fusedlora.save_training_state(tmp_path / "state.safetensors", model)
    fusedlora.set_adapter(model, "default")
    with pytest.raises(fusedlora.AdapterFileError, match="holds adapter 'email'.*set_adapter"):
        fusedlora.load_training_state(tmp_path / "state.safetensors", model)


def test_named_adapters_are_refused_where_they_would_share_a_head():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64, num_labels=2)
    model = fusedlora.apply_lora(transformers.BertForSequenceClassification(config), "all-linear", r=4)
    with pytest.raises(ValueError, match="every named adapter would share"):
        fusedlora.add_adapter(model, "other")
