"""apply_lora on plain PyTorch and Hugging Face models, merge_and_unload, summaries, compile."""

import warnings

import pytest
import torch
import torch.nn as nn

from fusedlora import LoRALinear, apply_lora, lora_state_dict, merge_and_unload, trainable_summary

transformers = pytest.importorskip("transformers")


def _tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def _tiny_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=64)
    return transformers.BertForSequenceClassification(config).eval()


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))


def test_llama_all_linear_one_step_changes_only_adapters():
    model = _tiny_llama()
    ids = torch.randint(0, 128, (2, 16))
    apply_lora(model, "all-linear", r=4, alpha=8)
    layers = {name for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert len(layers) == 2 * 7 and "lm_head" not in layers and isinstance(model.lm_head, nn.Linear)
    assert "model.layers.0.self_attn.q_proj" in layers and "model.layers.1.mlp.down_proj" in layers
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{layer}.lora_{ab}.weight" for layer in layers for ab in "AB"}

    frozen_before = {name: p.clone() for name, p in model.named_parameters() if not p.requires_grad}
    packed_before = {name: [t.clone() for t in m.weight.tensors()] for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    adapters_before = {name: p.clone() for name, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    assert all(torch.equal(p, frozen_before[name]) for name, p in model.named_parameters() if not p.requires_grad)
    assert all(all(torch.equal(a, b) for a, b in zip(packed_before[name], m.weight.tensors()))
               for name, m in model.named_modules() if isinstance(m, LoRALinear))
    changed = {name for name, p in model.named_parameters() if p.requires_grad and not torch.equal(p, adapters_before[name])}
    assert {name for name in changed if name.endswith("lora_B.weight")} == {f"{layer}.lora_B.weight" for layer in layers}


def test_bert_classifier_with_suffix_targets_and_exclusions():
    model = _tiny_bert()
    apply_lora(model, ["query", "value", "dense"], exclude_modules=r".*attention\.output\.dense", quant="int8", r=4)
    layers = {name for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert "bert.encoder.layer.0.attention.self.query" in layers
    assert "bert.encoder.layer.1.output.dense" in layers and "bert.pooler.dense" in layers
    assert not any(name.endswith("attention.output.dense") or name.endswith(".key") for name in layers)
    out = model(input_ids=torch.randint(0, 128, (2, 12)), labels=torch.tensor([0, 1]))
    out.loss.backward()
    assert all(m.lora_B.weight.grad is not None for m in model.modules() if isinstance(m, LoRALinear))


def test_regex_targets_and_idempotence():
    model = _mlp()
    apply_lora(model, r"[02]", r=2, quant="dense")
    assert isinstance(model[0], LoRALinear) and isinstance(model[2], LoRALinear) and type(model[4]) is nn.Linear
    apply_lora(model, ["0", "2"], r=2)  # already adapted: left as they are
    assert model[0].weight.fmt == "dense"


def test_all_linear_on_plain_model_and_summary():
    model = apply_lora(_mlp(), "all-linear", r=4, quant="nf4")
    assert all(isinstance(model[i], LoRALinear) for i in (0, 2, 4))
    summary = trainable_summary(model)
    adapters = 4 * (32 + 64) + 4 * (64 + 64) + 4 * (64 + 8)
    assert summary.trainable_params == adapters and summary.trainable_bytes == 4 * adapters
    assert summary.total_params == adapters + (32 * 64 + 64 * 64 + 64 * 8) + (64 + 64 + 8)
    assert summary.total_bytes == 4 * adapters + 4 * (64 + 64 + 8) + sum(model[i].weight.nbytes for i in (0, 2, 4))
    assert "trainable params: 1,184" in str(summary)
    assert set(lora_state_dict(model)) == {f"{i}.lora_{ab}.weight" for i in (0, 2, 4) for ab in "AB"}


def test_target_errors():
    with pytest.raises(ValueError, match="matched no linear layer"):
        apply_lora(_mlp(), ["q_proj"])
    with pytest.raises(ValueError, match="is a ReLU"):
        apply_lora(_mlp(), ["1"])
    with pytest.raises(ValueError, match="not a valid regular expression"):
        apply_lora(_mlp(), "(")
    with pytest.raises(TypeError, match="target_modules must be"):
        apply_lora(_mlp(), 3)


def test_applying_again_says_what_it_did_not_do():
    """A target naming nothing is an error that lists the LoRA layers too; a string target's
    error says it is a whole-name regex; layers that already have adapters keep their ranks, and
    a different r says so."""
    model = apply_lora(_mlp(), ["0", "2"], r=4, quant="dense")
    with pytest.raises(ValueError, match=r"matched no linear layer; .* and its LoRA layers \['0', '2'\]"):
        apply_lora(model, ["vproj"])
    with pytest.raises(ValueError, match="a string is a regular expression matched against whole module names"):
        apply_lora(_mlp(), "proj")
    with pytest.warns(UserWarning, match=r"\['0'\] already have adapters, which keep their ranks \(\[4\], not r=8\)"):
        apply_lora(model, ["0", "4"], r=8, quant="dense")
    assert (model[0].r, model[2].r, model[4].r) == (4, 4, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_lora(model, ["0"], r=4, quant="dense")  # the rank asked for: nothing to say
    assert model[0].r == 4


@pytest.mark.parametrize("quant", ["nf4", "dense"])
def test_merge_and_unload_gives_plain_linears_with_the_same_outputs(quant):
    model = apply_lora(_mlp(), "all-linear", r=4, quant=quant)
    for layer in model.modules():
        if isinstance(layer, LoRALinear):
            nn.init.normal_(layer.lora_B.weight, std=0.1)
    x = torch.randn(5, 32)
    expected = model(x)
    merge_and_unload(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(type(model[i]) is nn.Linear for i in (0, 2, 4))
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


def test_torch_compile_fullgraph_forward_and_backward():
    model = _tiny_llama().model.layers[0]
    apply_lora(model, "all-linear", r=4, dropout=0.1, quant="nf4")
    for layer in model.modules():
        if isinstance(layer, LoRALinear):
            nn.init.normal_(layer.lora_B.weight, std=0.1)
    model.eval()  # dropout off: eager and compiled must agree exactly in value
    hidden = torch.randn(2, 8, 64)
    position = torch.arange(8).unsqueeze(0)
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(model.self_attn.config)
    embeddings = rotary(hidden, position)

    def run(block):
        out = block(hidden, position_embeddings=embeddings, attention_mask=None)
        out = out[0] if isinstance(out, tuple) else out
        out.square().mean().backward()
        grads = [m.lora_B.weight.grad.clone() for m in model.modules() if isinstance(m, LoRALinear)]
        model.zero_grad(set_to_none=True)
        return out.detach(), grads

    eager_out, eager_grads = run(model)
    compiled = torch.compile(model, fullgraph=True)
    compiled_out, compiled_grads = run(compiled)
    torch.testing.assert_close(compiled_out, eager_out, atol=1e-5, rtol=1e-5)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    model.train()  # dropout on: a fresh seed per call, still one graph
    first, _ = run(compiled)
    second, _ = run(compiled)
    assert not torch.equal(first, second)


def test_apply_lora_is_all_or_nothing():
    model = _mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")  # the second target cannot be quantized
    with pytest.raises(ValueError, match="NaN"):
        apply_lora(model, "all-linear", r=4, quant="nf4")
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_merge_and_unload_of_a_single_layer_returns_a_linear():
    layer = LoRALinear.from_linear(nn.Linear(32, 16), r=4, quant="dense")
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 32)
    merged = merge_and_unload(layer)
    assert type(merged) is nn.Linear
    torch.testing.assert_close(merged(x), layer(x))


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_merge_and_unload_of_a_bf16_model_with_row_scaled_weights(fmt):
    model = _mlp().to(torch.bfloat16)
    apply_lora(model, "all-linear", r=4, quant=fmt)
    merge_and_unload(model)
    assert model(torch.randn(2, 32, dtype=torch.bfloat16)).dtype == torch.bfloat16
