"""Checkpoints for low-memory loading, in one process: `quantize_checkpoint` turns a Hugging Face
folder into a quantized one, `meta_parameters` + `load_checkpoint_shards` rebuild the model from
it exactly; mismatched or damaged checkpoints are refused by name. (Sharded loading on 2 ranks:
tests/test_distributed.py.)"""

import json

import pytest
import torch

import fusedlora
from fusedlora.loading import quantize_checkpoint

transformers = pytest.importorskip("transformers")


def _config():
    return transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A bf16 Llama saved by transformers in several files with an index, and its nf4 copy."""
    folder = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(_config()).to(torch.bfloat16)
    model.save_pretrained(folder / "bf16", max_shard_size="100KB")
    count = quantize_checkpoint(folder / "bf16", folder / "nf4", quant="nf4")
    return folder, count


def _from_meta(config, quant="nf4", **options):
    with fusedlora.meta_parameters():
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    assert all(p.is_meta for p in model.parameters()) and not any(b.is_meta for b in model.buffers())
    return fusedlora.apply_lora(model, "all-linear", r=4, quant=quant, **options)


def test_quantized_checkpoint_rebuilds_the_model_from_the_meta_device(saved):
    folder, count = saved
    assert count == 2 * 7
    assert len(list((folder / "nf4").glob("*.safetensors"))) > 1
    index = json.loads((folder / "nf4" / "model.safetensors.index.json").read_text())
    assert "model.layers.0.self_attn.q_proj.weight.absmax" in index["weight_map"]
    expected = fusedlora.apply_lora(transformers.LlamaForCausalLM.from_pretrained(folder / "bf16"), "all-linear", r=4)
    model = _from_meta(transformers.AutoConfig.from_pretrained(folder / "nf4"))
    missing = fusedlora.load_checkpoint_shards(model, folder / "nf4")
    assert missing and all(".lora_" in key for key in missing)
    assert not any(p.is_meta for p in model.parameters())
    for key, value in expected.state_dict().items():
        if ".lora_" not in key:
            assert torch.equal(model.state_dict()[key], value.to(model.state_dict()[key].dtype)), key
    for layer in fusedlora.lora_layers(model).values():
        assert torch.count_nonzero(layer.lora_B.weight) == 0 and torch.isfinite(layer.lora_A.weight).all()
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected.to(torch.bfloat16)(input_ids=ids).logits)


def test_a_checkpoint_of_another_layout_is_refused_by_key(saved):
    folder, _ = saved
    with pytest.raises(ValueError, match=r"weight\.quant_state\.bitsandbytes__nf4. describes .*nf4\(blocksize=128"):
        fusedlora.load_checkpoint_shards(_from_meta(_config(), blocksize=128), folder / "nf4")
    with pytest.raises(ValueError, match=r"checkpoint key '.*_proj\.weight' is U8 .*; the model holds torch.int8"):
        fusedlora.load_checkpoint_shards(_from_meta(_config(), quant="int8"), folder / "nf4")


def test_a_truncated_or_missing_checkpoint_is_refused(saved, tmp_path):
    folder, _ = saved
    with pytest.raises(FileNotFoundError, match="path must be"):
        fusedlora.load_checkpoint_shards(_from_meta(_config()), tmp_path / "nowhere")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for file in (folder / "nf4").glob("*.safetensors"):
        data = file.read_bytes()
        (damaged / file.name).write_bytes(data[: len(data) - 64])
    with pytest.raises(ValueError, match="truncated"):
        fusedlora.load_checkpoint_shards(_from_meta(_config()), damaged)
    with pytest.raises(FileExistsError, match="destination"):
        quantize_checkpoint(folder / "bf16", folder / "nf4")


def test_floats_stored_in_another_dtype_are_cast_and_tied_embeddings_found(tmp_path):
    """A checkpoint's fp16 embeddings and norms load into a bf16 model as fp16 -> bf16 casts (not
    as reinterpreted bits), and a tied head is found under the embeddings' name (Hugging Face
    saves it once)."""
    from safetensors.torch import save_file

    config = _config()
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    source = fusedlora.apply_lora(transformers.LlamaForCausalLM(config), "all-linear", r=4)
    state = {key: value.half() if value.is_floating_point() and value.dim() and "weight." not in key else value
             for key, value in source.state_dict().items() if ".lora_" not in key and key != "lm_head.weight"}
    save_file({key: value.contiguous() for key, value in state.items()}, str(tmp_path / "model.safetensors"))
    model = _from_meta(config)
    fusedlora.load_checkpoint_shards(model, tmp_path / "model.safetensors")
    embedding = model.model.embed_tokens.weight
    assert embedding.dtype == torch.bfloat16 and torch.equal(embedding, state["model.embed_tokens.weight"].bfloat16())
    assert model.lm_head.weight is embedding


def test_an_adapter_factor_alone_in_a_checkpoint_is_missing_not_overwritten(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    folder, _ = saved
    tensors = {}
    for file in (folder / "nf4").glob("*.safetensors"):
        tensors.update(load_file(str(file)))
    factor = torch.randn(4, 64)
    tensors["model.layers.0.self_attn.q_proj.lora_A.weight"] = factor
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyError, match=r"lacks 1 of the model's keys: \['model\.layers\.0\.self_attn\.q_proj\.lora_B"):
        fusedlora.load_checkpoint_shards(_from_meta(_config()), tmp_path / "model.safetensors")
    model = _from_meta(_config())
    fusedlora.load_checkpoint_shards(model, tmp_path / "model.safetensors", strict=False)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.lora_A.weight, factor)
