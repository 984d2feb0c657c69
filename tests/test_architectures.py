"""Fourteen Hugging Face architectures against the real PEFT (the README's compatibility table):
for each, "all-linear" wraps the layers PEFT wraps; with PEFT's adapters the logits are PEFT's;
PEFT loads the adapter fusedlora saves to the same logits; merging gives them too; and an nf4
base trains (finite loss, gradients on every adapter)."""

import pytest
import torch
import torch.nn as nn

import fusedlora
from helpers import assert_close

peft = pytest.importorskip("peft")
T = pytest.importorskip("transformers")

_SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)
_BERT = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
ARCHITECTURES = {
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(**_SMALL)),
    "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**_SMALL)),
    "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**_SMALL)),
    "gemma": lambda: T.GemmaForCausalLM(T.GemmaConfig(**_SMALL, head_dim=8)),
    "gemma2": lambda: T.Gemma2ForCausalLM(T.Gemma2Config(**_SMALL, head_dim=8)),
    "phi3": lambda: T.Phi3ForCausalLM(T.Phi3Config(**_SMALL, pad_token_id=0)),
    "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4)),
    "opt": lambda: T.OPTForCausalLM(T.OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                                 num_attention_heads=4, word_embed_proj_dim=32)),
    "gpt_neox": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                             num_hidden_layers=2, num_attention_heads=4)),
    "falcon": lambda: T.FalconForCausalLM(T.FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                                         num_attention_heads=4)),
    "bloom": lambda: T.BloomForCausalLM(T.BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4)),
    "bert_seq_cls": lambda: T.BertForSequenceClassification(T.BertConfig(**_BERT, num_labels=3)),
    "bert_mlm": lambda: T.BertForMaskedLM(T.BertConfig(**_BERT)),
    "t5": lambda: T.T5ForConditionalGeneration(T.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                          num_heads=4)),
}


def _build(name):
    torch.manual_seed(0)
    return ARCHITECTURES[name]().eval()


def _inputs(model) -> dict:
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(5))
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {"input_ids": ids, **({"decoder_input_ids": ids} if inner.config.is_encoder_decoder else {})}


def _logits(model):
    with torch.no_grad():
        return model(**_inputs(model)).logits


def _peft(name):
    task = "SEQ_CLS" if name == "bert_seq_cls" else None
    model = peft.get_peft_model(_build(name), peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                               task_type=task))
    torch.manual_seed(1)
    for module in model.modules():
        if isinstance(getattr(module, "lora_B", None), nn.ModuleDict):
            nn.init.normal_(module.lora_B["default"].weight, std=0.1)
    return model.eval()


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_architecture_matches_peft_in_targets_outputs_files_and_merge(name, tmp_path):
    theirs = _peft(name)
    their_layers = {key.removeprefix("base_model.model."): module for key, module in theirs.named_modules()
                    if isinstance(getattr(module, "lora_A", None), nn.ModuleDict)}
    ours = fusedlora.apply_lora(_build(name), "all-linear", r=4, alpha=8, quant=None)
    layers = fusedlora.lora_layers(ours)
    assert sorted(layers) == sorted(their_layers)
    with torch.no_grad():
        for key, module in their_layers.items():
            layers[key].lora_A.weight.copy_(module.lora_A["default"].weight)
            layers[key].lora_B.weight.copy_(module.lora_B["default"].weight)
        for key, module in ours.named_modules():
            if getattr(module, fusedlora.model.TRAINED_FULLY, False):
                module.load_state_dict(theirs.get_submodule(f"base_model.model.{key}").modules_to_save["default"]
                                       .state_dict())
    expected = _logits(theirs)
    assert_close(_logits(ours), expected, torch.float32, "logits with PEFT's adapters")
    fusedlora.save_adapter(ours, tmp_path / "adapter")
    assert_close(_logits(peft.PeftModel.from_pretrained(_build(name), tmp_path / "adapter").eval()), expected,
                 torch.float32, "PEFT loading ours")
    assert_close(_logits(fusedlora.merge_and_unload(ours)), expected, torch.float32, "merged")


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_architecture_trains_on_an_nf4_base(name):
    model = fusedlora.apply_lora(_build(name), "all-linear", r=4, quant="nf4").train()
    inputs = _inputs(model)
    labels = torch.tensor([0, 2]) if name == "bert_seq_cls" else inputs["input_ids"]
    loss = model(**inputs, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    for key, layer in fusedlora.lora_layers(model).items():
        assert layer.lora_B.weight.grad is not None and torch.isfinite(layer.lora_B.weight.grad).all(), key
