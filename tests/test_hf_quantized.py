"""The standard QLoRA start with transformers: a model loaded with `BitsAndBytesConfig`, given
fusedlora adapters, trains in `Trainer`, checkpoints and resumes: the resumed run's losses are
the uninterrupted run's, and the checkpoint's frozen weights are bitsandbytes' bytes."""

import pytest
import torch

import fusedlora

transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


_NF4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


def _qlora(folder, targets="all-linear"):
    quantization = transformers.BitsAndBytesConfig(**_NF4)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization)
    packed = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    torch.manual_seed(1)  # the adapters' initial values (Trainer seeds only what follows)
    return fusedlora.apply_lora(model, targets, r=4), packed


def _trainer(model, steps, out):
    generator = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (16, 16), generator=generator)]
    args = transformers.TrainingArguments(str(out), per_device_train_batch_size=2, max_steps=steps, save_steps=2,
                                          logging_steps=1, lr_scheduler_type="constant", learning_rate=1e-2,
                                          report_to=[], use_cpu=True, seed=0)
    return transformers.Trainer(model=model, args=args, train_dataset=data)


def _losses(trainer):
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "v_proj"]], ids=["all-linear", "some"])
def test_trainer_trains_a_bitsandbytes_model_with_adapters_checkpoints_and_resumes(saved, tmp_path, targets):
    """With every layer adapted or only some (the others stay bitsandbytes layers, frozen)."""
    model, packed = _qlora(saved, targets)
    assert not model.is_quantized  # transformers' "purely quantized" check: adapters are attached
    assert model.config.quantization_config.load_in_4bit
    straight = _trainer(model, 4, tmp_path / "straight")
    straight.train()
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight.packed.view(-1), packed.view(-1))
    assert len(_losses(straight)) == 4
    _trainer(_qlora(saved, targets)[0], 2, tmp_path / "resumed").train()
    resumed = _trainer(_qlora(saved, targets)[0], 4, tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=True)
    torch.testing.assert_close(torch.tensor(_losses(resumed)[-2:]), torch.tensor(_losses(straight)[-2:]),
                               rtol=1e-5, atol=1e-6)
    for key, value in fusedlora.lora_state_dict(model).items():
        torch.testing.assert_close(fusedlora.lora_state_dict(resumed.model)[key], value, rtol=1e-5, atol=1e-6)


def test_a_bitsandbytes_gpt2_merges_back_into_conv1d_that_transformers_reloads(tmp_path):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=4)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    model = transformers.GPT2LMHeadModel.from_pretrained(
        tmp_path / "gpt2", quantization_config=transformers.BitsAndBytesConfig(**_NF4))
    model = fusedlora.apply_lora(model, "all-linear", r=4)
    assert all(layer.fan_in_fan_out for layer in fusedlora.lora_layers(model).values())
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    merged = fusedlora.merge_and_unload(model)
    assert isinstance(merged.transformer.h[0].attn.c_proj, Conv1D)
    del merged.config.quantization_config  # the merged weights are dense
    merged.save_pretrained(tmp_path / "merged")
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
