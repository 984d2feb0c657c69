"""`fusedlora plan`: per-GPU memory of a LoRA run under FSDP2. Its sharded byte counts are checked
against what FSDP2 ranks hold in tests/test_distributed.py; here against a whole model in one
process, and the command line."""

import subprocess
import sys

import pytest
import torch

import fusedlora
from fusedlora.plan import PRESETS, DecoderShape, plan_memory, sharded_weight_bytes


def test_frozen_base_of_one_gpu_is_what_apply_lora_stores():
    transformers = pytest.importorskip("transformers")
    shape = DecoderShape(hidden=64, intermediate=96, layers=2, vocab=50, heads=4, kv_heads=2)
    config = transformers.LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, num_hidden_layers=shape.layers,
                                      intermediate_size=shape.intermediate, num_attention_heads=shape.heads,
                                      num_key_value_heads=shape.kv_heads)
    for fmt, nested in (("nf4", True), ("fp4", False), ("int8", True)):
        model = fusedlora.apply_lora(transformers.LlamaForCausalLM(config), "all-linear", r=4, quant=fmt,
                                     double_quant=nested)
        stored = sum(layer.weight.nbytes for layer in fusedlora.lora_layers(model).values())
        planned = plan_memory(shape, fmt, r=4, world=1, double_quant=nested)
        assert planned.frozen_base == stored, fmt
        adapters = sum(layer.lora_A.weight.nbytes + layer.lora_B.weight.nbytes
                       for layer in fusedlora.lora_layers(model).values())
        assert planned.adapters == adapters and planned.optimizer == 2 * adapters


def test_shards_shrink_with_the_world_and_checkpointing_saves_activations():
    one, eight = (plan_memory(PRESETS["llama-3-70b"], "nf4", world=world) for world in (1, 8))
    assert eight.frozen_base == pytest.approx(one.frozen_base / 8, rel=1e-3)
    assert eight.gathered_for_compute == one.gathered_for_compute  # gathered weights are whole
    without = plan_memory(PRESETS["llama-3-70b"], "nf4", world=8, checkpointing=False)
    assert without.activations > 5 * eight.activations
    # nf4 holds about 4.13 bits per weight with nested absmax: 70B's seven projections, ~65e9 weights
    weights = 80 * sum(n * k for n, k in PRESETS["llama-3-70b"].projections().values())
    assert one.frozen_base == pytest.approx(weights * (0.5 + 1 / 64 + 4 / (64 * 256)), rel=1e-3)
    assert sharded_weight_bytes(4096, 4096, "dense", world=1) == 4096 * 4096 * 2


def _plan(*args):
    return subprocess.run([sys.executable, "-m", "fusedlora", "plan", *args], capture_output=True, text=True,
                          timeout=300)


def test_plan_prints_the_70b_table():
    result = _plan("--model", "llama-3-70b", "--world", "2")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("llama-3-70b: nf4 base, r=16, 2 GPU(s)")
    base = next(line for line in lines if line.strip().startswith("frozen base (shards)"))
    expected = plan_memory(PRESETS["llama-3-70b"], "nf4", world=2).frozen_base / 2**30
    assert float(base.split()[-1]) == pytest.approx(expected, abs=0.01)
    assert any(line.startswith("fits with activation checkpointing:") for line in lines)


@pytest.mark.parametrize("args, named", [(("--world", "0"), "--world"), (("--quant", "nf5"), "quant"),
                                         (("--heads", "5"), "--heads"), (("--blocksize", "100"), "blocksize")])
def test_plan_names_a_bad_argument(args, named):
    result = _plan(*args)
    assert result.returncode != 0 and named in result.stderr, result.stderr
