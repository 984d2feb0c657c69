"""fusedlora in the training code that exists: Hugging Face models with gradient checkpointing,
autocast, dtype casts and Trainer; checkpoints that bitsandbytes quantized, loaded without it;
bitsandbytes layers converted in place; merged export that plain transformers loads; torchtune."""

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fusedlora import LoRALinear, apply_lora, from_torchtune, lora_layers, merge_and_unload, to_torchtune
from helpers import bnb_linear4bit_decoded_by_hand

transformers = pytest.importorskip("transformers")


def _llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config)


def _adapted_llama(dropout=0.0, quant="nf4"):
    model = apply_lora(_llama(), "all-linear", r=4, alpha=8, dropout=dropout, quant=quant)
    torch.manual_seed(1)
    for layer in lora_layers(model).values():
        nn.init.normal_(layer.lora_B.weight, std=0.05)
    return model


def _adapter_grads(model, ids, checkpointing):
    if checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x renamed it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    torch.manual_seed(5)  # the same dropout seeds in both runs
    model(input_ids=ids, labels=ids).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def test_gradient_checkpointing_gives_the_same_gradients_with_dropout():
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    plain = _adapter_grads(_adapted_llama(dropout=0.1), ids, checkpointing=False)
    recomputed = _adapter_grads(_adapted_llama(dropout=0.1), ids, checkpointing=True)
    assert plain.keys() == recomputed.keys() and len(plain) == 2 * 14
    for name, grad in plain.items():
        torch.testing.assert_close(recomputed[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_autocast_and_dtype_casts_keep_packed_weights():
    model = _adapted_llama()
    packed = {name: [t.clone() for t in layer.weight.tensors()] for name, layer in lora_layers(model).items()}
    model.to(torch.bfloat16)
    model.half()
    model.float()
    for name, layer in lora_layers(model).items():
        assert all(torch.equal(a, b) for a, b in zip(packed[name], layer.weight.tensors())), name
    ids = torch.randint(0, 96, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def test_a_transformers_trainer_trains_only_the_adapters(tmp_path):
    model = _adapted_llama()
    before = {name: p.clone() for name, p in model.named_parameters()}
    ids = torch.randint(0, 96, (8, 12), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    arguments = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                                               learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no",
                                               logging_steps=1, disable_tqdm=True)
    result = transformers.Trainer(model=model, args=arguments, train_dataset=data).train()
    assert result.global_step == 3
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != ("lora_" in name), name


def _bnb_llama(bnb):
    """A Llama whose linears (but the head) are bitsandbytes Linear4bit, quantized on the CPU."""
    model = _llama()
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name != "lm_head":
            quantized = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                          quant_type="nf4", compress_statistics=True, compute_dtype=torch.float32)
            quantized.load_state_dict(module.state_dict())
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, quantized.to("cpu"))
    return model


def test_a_bitsandbytes_checkpoint_loads_without_bitsandbytes(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    from safetensors.torch import save_file

    source = _bnb_llama(bnb).eval()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "model.safetensors")
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), bnb_linear4bit_decoded_by_hand(bnb):  # its bytes' meaning, not its CPU kernels
        torch.save(source(input_ids=ids).logits, tmp_path / "logits.pt")
    torch.save(ids, tmp_path / "ids.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["bitsandbytes"] = None  # bitsandbytes cannot be imported here
        sys.path.insert(0, {str(tmp_path.parent)!r})
        import torch, transformers
        from safetensors.torch import load_file
        import fusedlora
        torch.manual_seed(9)
        config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model = fusedlora.apply_lora(transformers.LlamaForCausalLM(config), "all-linear", r=4, quant="nf4")
        state = load_file({str(tmp_path / "model.safetensors")!r})
        result = model.load_state_dict(state, strict=False)
        assert not result.unexpected_keys and all("lora_" in k for k in result.missing_keys), result
        layer = model.model.layers[1].mlp.down_proj
        assert torch.equal(layer.weight.packed, state["model.layers.1.mlp.down_proj.weight"].view(-1))
        with torch.no_grad():
            logits = model.eval()(input_ids=torch.load({str(tmp_path / "ids.pt")!r})).logits
        expected = torch.load({str(tmp_path / "logits.pt")!r})
        assert (logits - expected).abs().max() <= 1e-4 * expected.abs().max(), (logits - expected).abs().max()
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_apply_lora_converts_bitsandbytes_layers_in_place():
    bnb = pytest.importorskip("bitsandbytes")
    model = _bnb_llama(bnb)
    pointers = {name: m.weight.data_ptr() for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    apply_lora(model, "all-linear", r=4, quant="int8")  # a bitsandbytes layer keeps its own format
    layers = lora_layers(model)
    assert set(layers) == set(pointers)
    for name, layer in layers.items():
        assert layer.weight.fmt == "nf4" and layer.weight.packed.data_ptr() == pointers[name], name


def test_merged_export_loads_in_plain_transformers(tmp_path):
    model = _adapted_llama(quant="dense").eval()
    ids = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    merge_and_unload(model)
    model.save_pretrained(tmp_path / "merged")
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any(isinstance(m, LoRALinear) for m in reloaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)


class TorchtuneStyleLoRALinear(nn.Module):
    """torchtune's LoRALinear as its docs define it: base + (alpha / rank) · lora_b(lora_a(dropout(x)))."""

    def __init__(self, in_dim, out_dim, rank, alpha):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim) / in_dim**0.5)
        self.lora_a = nn.Linear(in_dim, rank, bias=False)
        self.lora_b = nn.Linear(rank, out_dim, bias=False)
        nn.init.normal_(self.lora_b.weight)
        self.scaling = alpha / rank

    def forward(self, x):
        return F.linear(x, self.weight) + self.scaling * self.lora_b(self.lora_a(x))


def test_torchtune_state_dicts_convert_both_ways():
    torch.manual_seed(0)
    theirs = nn.Sequential(TorchtuneStyleLoRALinear(32, 48, 8, 16))
    ours = nn.Sequential(LoRALinear.from_linear(nn.Linear(32, 48, bias=False), r=8, alpha=16, quant="dense"))
    converted = from_torchtune(theirs.state_dict())
    assert set(converted) == {"0.weight", "0.lora_A.weight", "0.lora_B.weight"}
    ours.load_state_dict(converted)
    x = torch.randn(4, 32)
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-5, rtol=1e-5)
    back = to_torchtune(ours.state_dict())
    assert set(back) == {"0.weight", "0.lora_a.weight", "0.lora_b.weight"}
    assert all(torch.equal(back[k], v) for k, v in theirs.state_dict().items())

