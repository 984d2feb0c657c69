"""bitsandbytes (on the CPU) as the oracle of the nf4/fp4/int8 layouts: same weight, same bytes.

It is the oracle of what it writes only. What its bytes mean is decoded by hand
(`helpers.decode_bnb_4bit`), never by its dequantize functions: their CPU paths depend on the
processor's instruction set and have returned wrong values on machines with AVX-512."""

import subprocess
import sys
import textwrap

import pytest
import torch

from fusedlora.formats import from_bnb_module, quantize
from fusedlora.formats.codebooks import code_table, signed_dynamic_map
from helpers import decode_bnb_4bit, random_weight

bnb = pytest.importorskip("bitsandbytes")
bnb_functional = pytest.importorskip("bitsandbytes.functional")

CASES = [  # (N, K, blocksize, dtype): ragged sizes, odd element counts, every blocksize
    (7, 9, 32, torch.float32),
    (64, 96, 64, torch.bfloat16),
    (80, 136, 128, torch.float16),
    (33, 250, 256, torch.float32),
    (252, 103, 128, torch.bfloat16),
    (17, 300, 512, torch.float32),
    (300, 77, 1024, torch.float16),
    (129, 256, 2048, torch.float32),
    (5, 4000, 4096, torch.bfloat16),
    (600, 700, 64, torch.float32),
]


def test_code_tables_match():
    assert torch.equal(code_table("nf4"), bnb_functional.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(code_table("fp4").view(torch.int32), bnb_functional.get_4bit_type("fp4", device="cpu").view(torch.int32))
    assert torch.equal(signed_dynamic_map(), bnb_functional.create_dynamic_map())


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}-bs{c[2]}-{str(c[3])[6:]}")
def test_4bit_bytes_and_absmax_equal_bitsandbytes(fmt, double_quant, case):
    n, k, blocksize, dtype = case
    w = random_weight(n, k, dtype, torch.Generator().manual_seed(n * k + blocksize))
    packed, state = bnb_functional.quantize_4bit(w, blocksize=blocksize, quant_type=fmt, compress_statistics=double_quant)
    ours = quantize(w, fmt, blocksize, double_quant)
    assert torch.equal(ours.packed, packed.view(-1))
    assert torch.equal(ours.absmax, state.absmax)
    if double_quant:
        assert torch.equal(ours.nested_absmax, state.state2.absmax)
        assert torch.equal(ours.nested_offset, state.offset)
        assert torch.equal(ours.nested_code, state.state2.code)
    assert torch.equal(ours.dequantize(), decode_bnb_4bit(packed, state))


@pytest.mark.parametrize("n,k", [(7, 9), (80, 136), (300, 77)])
def test_int8_equals_bitsandbytes_vectorwise_quant(n, k):
    w = random_weight(n, k, torch.float16, torch.Generator().manual_seed(n + k))
    codes, row_absmax, _ = bnb_functional.int8_vectorwise_quant(w.clone())
    ours = quantize(w, "int8")
    assert torch.equal(ours.data, codes) and torch.equal(ours.scale, row_absmax)
    expected = codes.double() * row_absmax.double().unsqueeze(1) / 127  # LLM.int8's meaning of its bytes
    torch.testing.assert_close(ours.dequantize(torch.float32).double(), expected, atol=0, rtol=2.4e-7)


def _bnb_linear4bit(w: torch.Tensor, fmt: str, double_quant: bool):
    layer = bnb.nn.Linear4bit(w.shape[1], w.shape[0], bias=False, quant_type=fmt, compress_statistics=double_quant)
    layer.load_state_dict({"weight": w})
    return layer.to("cpu")  # bitsandbytes quantizes when the layer moves to a device


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_live_linear4bit_bytes_are_reused(fmt, double_quant):
    w = random_weight(48, 200, generator=torch.Generator().manual_seed(3))
    layer = _bnb_linear4bit(w, fmt, double_quant)
    weight = from_bnb_module(layer)
    assert weight.packed.data_ptr() == layer.weight.data_ptr()
    assert weight.nested == double_quant and weight.blocksize == 64 and weight.fmt == fmt
    assert torch.equal(weight.dequantize(), decode_bnb_4bit(layer.weight.data, layer.weight.quant_state))
    assert torch.equal(weight.packed, quantize(w, fmt, 64, double_quant).packed)


def test_live_linear8bitlt_is_reused():
    w = random_weight(48, 200, generator=torch.Generator().manual_seed(4))
    layer = bnb.nn.Linear8bitLt(200, 48, bias=False, has_fp16_weights=False)
    layer.load_state_dict({"weight": w})
    layer = layer.to("cpu")
    weight = from_bnb_module(layer)
    assert weight.data.data_ptr() == layer.weight.data_ptr()
    assert torch.equal(weight.data, quantize(w.half(), "int8").data)


def test_unquantized_bnb_layer_is_refused():
    layer = bnb.nn.Linear4bit(64, 16, bias=False)
    with pytest.raises(ValueError, match="no quantized weight yet"):
        from_bnb_module(layer)
    with pytest.raises(TypeError, match="Linear4bit or Linear8bitLt"):
        from_bnb_module(torch.nn.Linear(4, 4))


@pytest.mark.parametrize("double_quant", [False, True])
def test_our_state_dict_loads_into_bitsandbytes(double_quant):
    """The path transformers takes for a pre-quantized bitsandbytes checkpoint."""
    w = random_weight(48, 200, torch.bfloat16, torch.Generator().manual_seed(5))
    ours = quantize(w, "nf4", 64, double_quant)
    state = ours.state_dict()
    stats = {key.removeprefix("weight."): value for key, value in state.items() if key != "weight"}
    param = bnb.nn.Params4bit.from_prequantized(state["weight"], stats, device="cpu")
    assert torch.equal(decode_bnb_4bit(param.data, param.quant_state), ours.dequantize())


def test_bnb_state_dict_loads_without_bitsandbytes(tmp_path):
    """A Linear4bit checkpoint saved with safetensors loads in a process where bitsandbytes cannot be imported."""
    from safetensors.torch import save_file

    w = random_weight(40, 130, generator=torch.Generator().manual_seed(6))
    layer = _bnb_linear4bit(w, "nf4", True)
    state = {key: value.contiguous() for key, value in layer.state_dict().items()}
    save_file(state, tmp_path / "layer.safetensors")
    torch.save(decode_bnb_4bit(layer.weight.data, layer.weight.quant_state), tmp_path / "expected.pt")
    script = textwrap.dedent(f"""
        import sys
        sys.modules["bitsandbytes"] = None  # any import of bitsandbytes now fails
        import torch
        from safetensors.torch import load_file
        from fusedlora import FrozenWeight
        weight = FrozenWeight.from_state_dict(load_file({str(tmp_path / "layer.safetensors")!r}))
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        assert weight.fmt == "nf4" and weight.nested and tuple(weight.shape) == (40, 130)
        assert torch.equal(weight.dequantize(), expected)
        print("ok")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
