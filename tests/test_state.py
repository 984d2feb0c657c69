"""The frozen packed weights are never changed by what training code does to a model: dtype
casts, PEFT's `prepare_model_for_kbit_training`, state-dict round trips (torch's and
torch.distributed.checkpoint's, which FSDP2 and Accelerate use). FSDP2 sharding and gathering is
checked in tests/test_distributed.py."""

import pytest
import torch
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from fusedlora import apply_lora, lora_layers

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

FORMATS = ["nf4", "fp4", "int8", "fp8"]


def _plain_llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config)


def _llama(quant, seed=0):
    return apply_lora(_plain_llama(seed), "all-linear", r=4, alpha=8, quant=quant)


def _packed(model) -> dict:
    return {f"{name}.{i}": t.clone() for name, layer in lora_layers(model).items()
            for i, t in enumerate(layer.weight.tensors())}


def _assert_same_packed(before: dict, model) -> None:
    after = _packed(model)
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key


@pytest.mark.parametrize("quant", FORMATS)
def test_dtype_casts_keep_packed_weights(quant):
    model = _llama(quant)
    before = _packed(model)
    model.to(torch.bfloat16)
    model.half()
    model.to(dtype=torch.float32)
    model.double().float()
    _assert_same_packed(before, model)


@pytest.mark.parametrize("quant", FORMATS)
def test_prepare_model_for_kbit_training_keeps_packed_weights(quant):
    """Called on an adapted model it keeps the packed weights (it freezes every parameter, the
    adapters too: as with PEFT, call it before `apply_lora`, which the second half does)."""
    model = _llama(quant)
    before = _packed(model)
    peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    _assert_same_packed(before, model)

    prepared = peft.prepare_model_for_kbit_training(_plain_llama(),
                                                    use_gradient_checkpointing=True,
                                                    gradient_checkpointing_kwargs={"use_reentrant": False})
    apply_lora(prepared, "all-linear", r=4, alpha=8, quant=quant)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    prepared.train()
    prepared(input_ids=ids, labels=ids).loss.backward()
    trained = [name for name, p in prepared.named_parameters() if p.grad is not None]
    assert trained and all("lora_" in name for name in trained)


@pytest.mark.parametrize("quant", FORMATS)
def test_state_dict_round_trips_keep_packed_weights(quant):
    """torch's state_dict / load_state_dict and torch.distributed.checkpoint's get/set_model_state_dict
    into a model quantized from other random weights: the packed bytes arrive bit for bit."""
    source = _llama(quant, seed=0)
    before = _packed(source)
    for save, load in ((lambda m: m.state_dict(), lambda m, s: m.load_state_dict(s)),
                       (get_model_state_dict, set_model_state_dict)):
        target = _llama(quant, seed=1)
        assert not all(torch.equal(a, b) for a, b in zip(before.values(), _packed(target).values()))
        load(target, {key: value.clone() for key, value in save(source).items()})
        _assert_same_packed(before, target)
