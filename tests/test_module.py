"""LoRALinear: construction, init, forward, merge/unmerge, disable_adapter, casts, state dicts."""

import contextlib
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fusedlora import LoRALinear, quantize
from helpers import assert_close, float64_lora

FORMATS = ["nf4", "fp4", "int8", "fp8", "dense"]


def _layer(fmt="nf4", k=96, n=80, r=8, dtype=torch.float32, bias=True, seed=0, **kwargs):
    torch.manual_seed(seed)
    linear = nn.Linear(k, n, bias=bias, dtype=dtype)
    layer = LoRALinear.from_linear(linear, r=r, alpha=16, quant=fmt, **kwargs)
    with torch.no_grad():
        layer.lora_B.weight.normal_()  # a trained-looking adapter: B = 0 would hide it
    return linear, layer


def test_shapes_init_and_scaling():
    linear = nn.Linear(96, 80)
    layer = LoRALinear.from_linear(linear, r=8, alpha=32)
    assert layer.lora_A.weight.shape == (8, 96) and layer.lora_B.weight.shape == (80, 8)
    assert layer.in_features == 96 and layer.out_features == 80
    assert torch.equal(layer.lora_B.weight, torch.zeros(80, 8))
    bound = 1 / math.sqrt(96)  # kaiming_uniform(a=√5) on a (r, K) matrix: U(-1/√K, 1/√K)
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.std() > bound / 3
    assert layer.scaling == 4.0
    assert LoRALinear.from_linear(linear, r=16, alpha=32, rslora=True).scaling == 8.0
    gaussian = LoRALinear.from_linear(nn.Linear(512, 512), r=4, init="gaussian")
    assert gaussian.lora_A.weight.std().item() == pytest.approx(0.25, rel=0.05)
    assert not layer.bias.requires_grad and layer.lora_A.weight.requires_grad


def test_adapter_dtype_follows_the_base():
    bf16 = nn.Linear(64, 32, dtype=torch.bfloat16)
    assert LoRALinear.from_linear(bf16, quant="dense").lora_A.weight.dtype == torch.bfloat16
    assert LoRALinear.from_linear(bf16, quant="nf4").lora_A.weight.dtype == torch.float32
    assert LoRALinear.from_linear(bf16, quant="nf4").weight.dtype == torch.bfloat16


@pytest.mark.parametrize("fmt", FORMATS)
def test_forward_matches_float64(fmt):
    _, layer = _layer(fmt)
    x = torch.randn(4, 9, 96)
    expected = float64_lora(x, layer.weight.dequantize(torch.float64), layer.lora_A.weight, layer.lora_B.weight,
                            layer.scaling, layer.bias)
    assert_close(layer(x), expected, torch.float32)


def test_zero_B_gives_the_base_output_exactly():
    linear, _ = _layer("dense")
    layer = LoRALinear.from_linear(linear, r=8, quant="dense")
    x = torch.randn(5, 96)
    assert torch.equal(layer(x), linear(x))


@pytest.mark.parametrize("fmt", ["nf4", "dense"])
def test_disable_adapter_gives_the_base_output(fmt):
    _, layer = _layer(fmt)
    x = torch.randn(6, 96)
    with layer.disable_adapter():
        y = layer(x)
    assert torch.equal(y, F.linear(x, layer.weight.dequantize(), layer.bias))
    assert not torch.allclose(layer(x), y)


def test_dropout_only_in_training():
    _, layer = _layer(dropout=0.5)
    x = torch.randn(6, 96)
    layer.eval()
    eval_a, eval_b = layer(x), layer(x)
    layer.train()
    assert torch.equal(eval_a, eval_b) and not torch.equal(layer(x), eval_a)


@pytest.mark.parametrize("fmt", FORMATS)
def test_merge_then_unmerge_restores_exactly(fmt):
    _, layer = _layer(fmt)
    with torch.no_grad():
        layer.lora_B.weight.mul_(0.01)
    layer.eval()
    x = torch.randn(6, 96)
    before = layer(x)
    original = [t.clone() for t in layer.weight.tensors()]
    if fmt == "dense":
        layer.merge()
    else:
        with pytest.warns(UserWarning, match="re-quantizes"):
            layer.merge()
    assert layer.merged
    merged = layer(x)
    expected = F.linear(x.double(), layer._premerge_weight.dequantize(torch.float64) + layer.delta_weight().double(),
                        layer.bias.double())
    step = {"nf4": 0.1, "fp4": 0.2, "int8": 0.01, "fp8": 0.07, "dense": 1e-5}[fmt]  # the format's rounding
    assert (merged.double() - expected).abs().max() <= step * expected.abs().max()
    layer.unmerge()
    assert not layer.merged
    assert all(torch.equal(a, b) for a, b in zip(original, layer.weight.tensors()))
    assert torch.equal(layer(x), before)


def test_merge_twice_and_unmerge_unmerged_warn():
    _, layer = _layer("dense")
    with pytest.warns(UserWarning, match="not merged"):
        layer.unmerge()
    layer.merge()
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()


def test_merged_layer_gives_no_adapter_gradients():
    _, layer = _layer("dense")
    layer.merge()
    x = torch.randn(3, 96, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.lora_A.weight.grad is None and layer.lora_B.weight.grad is None


@pytest.mark.parametrize("fmt", FORMATS)
def test_to_linear_holds_the_merged_weight(fmt):
    _, layer = _layer(fmt)
    linear = layer.to_linear()
    assert type(linear) is nn.Linear and not linear.weight.requires_grad
    x = torch.randn(4, 96)
    torch.testing.assert_close(linear(x), layer(x), atol=1e-4, rtol=1e-4)


def test_non_contiguous_and_3d_inputs():
    _, layer = _layer()
    x = torch.randn(96, 4, 7).permute(1, 2, 0)
    assert not x.is_contiguous()
    torch.testing.assert_close(layer(x), layer(x.contiguous()))
    assert layer(x).shape == (4, 7, 80)


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int8", "fp8"])
def test_dtype_casts_leave_packed_weights_bit_identical(fmt):
    _, layer = _layer(fmt)
    before = [t.clone() for t in layer.weight.tensors()]
    layer.half()
    layer.to(torch.bfloat16)
    layer.type(torch.float16)  # casts every tensor, integer ones included, but not these
    layer.float()
    assert all(a.dtype == b.dtype and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
               for a, b in zip(before, layer.weight.tensors()))
    assert layer.lora_A.weight.dtype == torch.float32


def test_a_weight_whose_storage_was_swapped_out_is_not_replaced():
    """FSDP puts its own parameters (sharded or gathered) in place of the storage; replacing or
    merging the weight then would be undone by its next all-gather, so both are refused."""
    _, layer = _layer("nf4")
    layer.frozen_packed = torch.nn.Parameter(layer.frozen_packed.detach().clone(), requires_grad=False)
    with pytest.raises(RuntimeError, match="managed by FSDP"):
        layer.merge()
    with pytest.raises(RuntimeError, match="managed by FSDP"):
        layer.weight = quantize(torch.randn(80, 96), "nf4")


def test_dense_base_follows_dtype_casts_like_nn_linear():
    _, layer = _layer("dense")
    layer.to(torch.bfloat16)
    assert layer.weight.weight.dtype == torch.bfloat16 and layer.weight.dtype == torch.bfloat16
    assert layer(torch.randn(2, 96, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("fmt", FORMATS)
def test_state_dict_round_trip(fmt):
    _, layer = _layer(fmt, seed=1)
    state = layer.state_dict()
    assert {"weight", "bias", "lora_A.weight", "lora_B.weight"} <= set(state)
    _, fresh = _layer(fmt, seed=2)
    fresh.load_state_dict(state)
    x = torch.randn(3, 96)
    loaded = fresh(x)
    assert torch.equal(loaded, layer(x))
    state["weight"].view(torch.uint8).reshape(-1)[:4] ^= 0x55  # the load copied: the model does not alias the dict
    assert torch.equal(fresh(x), loaded)


def test_state_dict_keys_match_bitsandbytes_layers():
    assert set(_layer("nf4")[1].state_dict()) == {
        "weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
        "weight.quant_state.bitsandbytes__nf4", "bias", "lora_A.weight", "lora_B.weight"}
    assert set(_layer("int8")[1].state_dict()) == {"weight", "SCB", "weight_format", "bias", "lora_A.weight", "lora_B.weight"}


def test_load_state_dict_errors():
    _, layer = _layer("nf4")
    _, other = _layer("nf4", n=64)
    with pytest.raises(RuntimeError, match=r"weight: shape \(64, 96\) in the checkpoint, \(80, 96\) in the model"):
        layer.load_state_dict(other.state_dict())
    missing = {k: v for k, v in layer.state_dict().items() if not k.startswith("weight")}
    with pytest.raises(RuntimeError, match="Missing key.*weight"):
        layer.load_state_dict(missing)
    broken = {**layer.state_dict(), "weight.absmax": torch.zeros(3, dtype=torch.uint8)}
    with pytest.raises(RuntimeError, match="weight.absmax"):
        layer.load_state_dict(broken)


def test_extra_repr_is_readable():
    text = repr(_layer("nf4")[1])
    assert "in_features=96, out_features=80, r=8, alpha=16, scaling=2" in text and "nf4(blocksize=64, nested)" in text


@pytest.mark.parametrize(
    "kwargs,error,fragment",
    [
        (dict(r=0), ValueError, "r must be an int >= 1"),
        (dict(r=2.5), ValueError, "r must be an int"),
        (dict(dropout=1.0), ValueError, "dropout must be a number in"),
        (dict(init="xavier"), ValueError, "init must be one of"),
        (dict(alpha=float("inf")), ValueError, "alpha must be a finite"),
        (dict(quant="int4"), ValueError, "quant must be one of .* got .int4."),
        (dict(blocksize=100), ValueError, "blocksize"),
    ],
)
def test_bad_arguments(kwargs, error, fragment):
    with pytest.raises(error, match=fragment):
        LoRALinear.from_linear(nn.Linear(64, 32), **kwargs)


def test_from_linear_refuses_other_modules():
    with pytest.raises(TypeError, match="linear must be an nn.Linear"):
        LoRALinear.from_linear(nn.Conv1d(4, 4, 1))
    with pytest.raises(TypeError, match="weight must be a FrozenWeight"):
        LoRALinear(torch.randn(4, 4))
    with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
        LoRALinear(quantize(torch.randn(4, 64), "nf4"), bias=torch.randn(5))


@pytest.mark.parametrize("fmt", ["nf4", "dense"])
def test_disable_adapter_on_a_merged_layer_gives_the_base_output(fmt):
    _, layer = _layer(fmt)
    x = torch.randn(4, 96)
    base = F.linear(x, layer.weight.dequantize(), layer.bias)
    with pytest.warns(UserWarning) if fmt != "dense" else contextlib.nullcontext():
        layer.merge()
    with layer.disable_adapter():
        assert torch.equal(layer(x), base)


def test_disable_adapter_is_immune_to_a_broken_adapter():
    _, layer = _layer()
    with torch.no_grad():
        layer.lora_B.weight[0, 0] = float("nan")
        layer.lora_A.weight[1, 1] = float("inf")
    x = torch.randn(4, 96)
    with layer.disable_adapter():
        assert torch.equal(layer(x), F.linear(x, layer.weight.dequantize(), layer.bias))


@pytest.mark.parametrize("fmt", ["nf4", "dense"])
def test_a_merged_layer_saves_its_base_so_loading_never_applies_the_adapter_twice(fmt):
    _, layer = _layer(fmt)
    with torch.no_grad():
        layer.lora_B.weight.mul_(0.1)
    x = torch.randn(4, 96)
    unmerged = layer(x)
    base_state = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.warns(UserWarning) if fmt != "dense" else contextlib.nullcontext():
        layer.merge()
    merged_state = layer.state_dict()
    assert all(torch.equal(merged_state[k], base_state[k]) for k in base_state)
    _, fresh = _layer(fmt, seed=5)
    fresh.load_state_dict(merged_state)
    assert not fresh.merged and torch.equal(fresh(x), unmerged)
    layer.load_state_dict(merged_state)
    assert not layer.merged and torch.equal(layer(x), unmerged)


@pytest.mark.parametrize("fmt", ["int8", "fp8", "nf4"])
def test_to_linear_keeps_the_model_dtype(fmt):
    _, layer = _layer(fmt, dtype=torch.bfloat16)
    linear = layer.to_linear()
    assert linear.weight.dtype == torch.bfloat16
    x = torch.randn(3, 96, dtype=torch.bfloat16)
    assert linear(x).dtype == torch.bfloat16


def test_row_scaled_checkpoint_takes_the_dtype_of_the_layer_it_loads_into():
    _, layer = _layer("int8", dtype=torch.bfloat16)
    _, fresh = _layer("int8", dtype=torch.bfloat16, seed=3)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.weight.dtype == torch.bfloat16 and fresh.to_linear().weight.dtype == torch.bfloat16


def test_a_float_checkpoint_is_quantized_into_the_layers_format():
    linear, layer = _layer("nf4")
    pretrained = nn.Linear(96, 80)
    adapters = {k: v for k, v in layer.state_dict().items() if k.startswith("lora_")}
    state = {**adapters, "weight": pretrained.weight.detach(), "bias": pretrained.bias.detach()}
    layer.load_state_dict(state)
    assert layer.weight.fmt == "nf4"
    assert torch.equal(layer.weight.packed, quantize(pretrained.weight.detach(), "nf4").packed)


def test_load_with_assign_takes_the_checkpoint_tensors_onto_a_meta_skeleton():
    _, source = _layer("nf4")
    skeleton = LoRALinear.from_linear(nn.Linear(96, 80), r=8, alpha=16).to("meta")
    skeleton.load_state_dict(source.state_dict(), assign=True)
    assert skeleton.weight.device.type == "cpu" and skeleton.lora_A.weight.device.type == "cpu"
    x = torch.randn(2, 96)
    assert torch.equal(skeleton(x), source(x))


def test_unknown_weight_keys_are_reported_under_strict():
    _, layer = _layer("nf4")
    with pytest.raises(RuntimeError, match='Unexpected key.*"weight.bogus"'):
        layer.load_state_dict({**layer.state_dict(), "weight.bogus": torch.zeros(1)})


def test_layers_do_not_share_code_tables():
    _, first = _layer("nf4")
    _, second = _layer("nf4", seed=1)
    assert first.weight.nested_code.data_ptr() != second.weight.nested_code.data_ptr()
    x = torch.randn(2, 96)
    before = second(x)
    first.state_dict()["weight.nested_quant_map"].mul_(2)
    first.state_dict()["weight.quant_map"].mul_(2)
    assert torch.equal(second(x), before)


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        (dict(adapter_dtype=torch.int8), "adapter_dtype must be a floating torch.dtype"),
        (dict(adapter_dtype="bf16"), "adapter_dtype must be a floating torch.dtype"),
        (dict(bias=[0.0] * 4), "bias must be a floating-point tensor"),
        (dict(bias=torch.zeros(4, dtype=torch.int64)), "bias must be a floating-point tensor"),
    ],
)
def test_bad_constructor_arguments_are_type_errors(kwargs, fragment):
    with pytest.raises(TypeError, match=fragment):
        LoRALinear(quantize(torch.randn(4, 64), "nf4"), **kwargs)
