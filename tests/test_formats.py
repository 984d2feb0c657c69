"""Weight formats: the test vector of docs/design.md §2 and statistics, round trips, storage, bad input."""

import math

import pytest
import torch

import fusedlora
from fusedlora.formats import FourBitWeight, FrozenWeight, quantize
from helpers import random_weight, unpack_codes

ALL_FORMATS = ["nf4", "fp4", "int8", "fp8", "dense"]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def test_nf4_test_vector_from_design():
    x = torch.tensor([[1, -1, 0, 0.5, -0.5, 0.1, 0.7229568, -0.6961928]])
    weight = quantize(x, "nf4", blocksize=64, double_quant=False)
    assert weight.absmax.tolist() == [1.0]
    assert unpack_codes(weight.packed, 8).tolist() == [15, 0, 7, 12, 2, 8, 14, 1]
    assert bytes(weight.packed.tolist()) == bytes.fromhex("F07C28E1")


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_error_statistics_from_design(double_quant):
    w = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
    err = (quantize(w, "nf4", 64, double_quant).dequantize() - w).abs()
    assert err.mean().item() == pytest.approx(0.0728, abs=0.001)
    assert (err / (w.abs() + 1e-8)).mean().item() == pytest.approx(0.2033, abs=0.003)


@pytest.mark.parametrize("fmt", ALL_FORMATS)
@pytest.mark.parametrize("shape", [(7, 9), (80, 96), (33, 130)])
def test_state_dict_round_trip_is_bit_exact(fmt, shape):
    w = random_weight(*shape, generator=torch.Generator().manual_seed(1))
    for weight in (quantize(w, fmt), quantize(w, fmt, blocksize=32, double_quant=False)):
        rebuilt = FrozenWeight.from_state_dict(weight.state_dict())
        assert type(rebuilt) is type(weight) and rebuilt.fmt == fmt
        assert rebuilt.shape == weight.shape and rebuilt.blocksize == weight.blocksize and rebuilt.dtype == weight.dtype
        for original, copy in zip(weight.tensors(), rebuilt.tensors(), strict=True):
            assert original.dtype == copy.dtype and torch.equal(_bits(original), _bits(copy))
        assert torch.equal(rebuilt.dequantize(), weight.dequantize())


@pytest.mark.parametrize("fmt,storage", [("nf4", torch.uint8), ("fp4", torch.uint8), ("int8", torch.int8), ("fp8", torch.float8_e4m3fn)])
def test_packed_storage_dtype(fmt, storage):
    weight = quantize(torch.randn(16, 64), fmt)
    assert weight.tensors()[0].dtype == storage


def test_nf4_nbytes_counts_every_tensor():
    n, k = 96, 200
    blocks = math.ceil(n * k / 64)
    nested = quantize(torch.randn(n, k), "nf4")
    assert nested.nbytes == n * k // 2 + blocks + 4 * math.ceil(blocks / 256) + 256 * 4 + 4
    plain = quantize(torch.randn(n, k), "nf4", double_quant=False)
    assert plain.nbytes == n * k // 2 + 4 * blocks


def test_int8_and_fp8_error_bounds():
    w = random_weight(64, 256, generator=torch.Generator().manual_seed(2))
    row_max = w.abs().amax(dim=1, keepdim=True)
    int8_err = (quantize(w, "int8").dequantize() - w).abs()
    assert (int8_err <= row_max / 254 * 1.0001 + 1e-7).all()
    fp8_err = (quantize(w, "fp8").dequantize() - w).abs()
    # e4m3 keeps 3 mantissa bits: half an ulp is 1/16 of the value (values below 2^-6 are subnormal).
    assert (fp8_err <= w.abs() / 16 * 1.0001 + row_max / 448 * 2**-9).all()


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int8", "fp8"])
def test_zero_blocks_and_extreme_values_do_not_make_nan(fmt):
    w = torch.zeros(8, 128)
    w[1] = 1e-40  # denormal
    w[2, :7] = 3e38
    w[3] = torch.randn(128) * 1e-30
    deq = quantize(w, fmt, blocksize=32).dequantize()
    assert torch.isfinite(deq).all()
    assert torch.equal(deq[0], torch.zeros(128)) and torch.equal(deq[4:], torch.zeros(4, 128))


def test_dequantize_dtype_and_default():
    w = torch.randn(16, 64, dtype=torch.bfloat16)
    weight = quantize(w, "nf4")
    assert weight.dtype == torch.bfloat16 and weight.dequantize().dtype == torch.bfloat16
    assert weight.dequantize(torch.float64).dtype == torch.float64


def test_to_same_device_is_identity():
    weight = quantize(torch.randn(16, 64), "nf4")
    assert weight.to("cpu") is weight


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int8", "fp8"])
def test_dtype_casts_never_touch_packed_formats(fmt):
    weight = quantize(torch.randn(16, 64), fmt)
    cast = weight.apply_module_fn(lambda t: t.half() if t.is_floating_point() else t)
    for before, after in zip(weight.tensors(), cast.tensors(), strict=True):
        assert before.dtype == after.dtype and torch.equal(_bits(before), _bits(after))


def test_dense_follows_dtype_casts():
    weight = quantize(torch.randn(16, 64), "dense")
    cast = weight.apply_module_fn(lambda t: t.half())
    assert cast.weight.dtype == torch.float16 and cast.dtype == torch.float16


@pytest.mark.parametrize("blocksize", [16, 48, 8192, True, 64.0])
def test_bad_blocksize(blocksize):
    with pytest.raises(ValueError, match="blocksize"):
        quantize(torch.randn(8, 64), "nf4", blocksize=blocksize)


@pytest.mark.parametrize(
    "weight,fmt,error,fragment",
    [
        (torch.randn(8, 64), "nf3", ValueError, "fmt must be one of"),
        (torch.randn(8, 64), ["nf4"], ValueError, "fmt must be one of"),
        (torch.randn(64), "nf4", ValueError, "2-D"),
        (torch.ones(8, 64, dtype=torch.int32), "int8", TypeError, "floating-point"),
        (torch.empty(0, 64), "nf4", ValueError, "empty"),
        (torch.tensor([[1.0, float("nan")]]), "nf4", ValueError, "NaN"),
        (torch.tensor([[1.0, float("inf")]]), "int8", ValueError, "NaN or Inf"),
        ([[1.0, 2.0]], "nf4", TypeError, "torch.Tensor"),
    ],
)
def test_bad_weight(weight, fmt, error, fragment):
    with pytest.raises(error, match=fragment):
        quantize(weight, fmt)


def test_from_state_dict_errors_name_the_key():
    state = quantize(torch.randn(16, 64), "nf4").state_dict()
    with pytest.raises(ValueError, match="weight.absmax"):
        FrozenWeight.from_state_dict({k: v for k, v in state.items() if k != "weight.absmax"})
    with pytest.raises(ValueError, match="has 511 elements, expected 512"):
        FrozenWeight.from_state_dict({**state, "weight": state["weight"][:-1]})
    with pytest.raises(ValueError, match="quant_map"):
        FrozenWeight.from_state_dict({**state, "weight.quant_map": state["weight.quant_map"] * 2})
    with pytest.raises(ValueError, match="no weight of a known format"):
        FrozenWeight.from_state_dict({"something": torch.zeros(1)})
    int8 = quantize(torch.randn(16, 64), "int8").state_dict()
    with pytest.raises(ValueError, match="SCB.* has 15 elements"):
        FrozenWeight.from_state_dict({**int8, "SCB": int8["SCB"][:15]})


def test_quant_storage_other_than_uint8_is_read_as_bytes():
    weight = quantize(torch.randn(16, 64), "nf4")
    state = weight.state_dict()
    state["weight"] = state["weight"].view(-1).view(torch.bfloat16).view(-1, 1)  # bitsandbytes quant_storage=bf16
    assert torch.equal(FrozenWeight.from_state_dict(state).packed, weight.packed)


def test_public_api_exports_quantize():
    assert fusedlora.quantize is quantize and isinstance(fusedlora.quantize(torch.randn(4, 64), "fp4"), FourBitWeight)


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int8", "fp8", "dense"])
def test_quantizing_on_the_meta_device_gives_the_shapes_and_dtypes_of_a_real_quantization(fmt):
    real = quantize(torch.randn(48, 128, dtype=torch.bfloat16), fmt)
    meta = quantize(torch.empty(48, 128, dtype=torch.bfloat16, device="meta"), fmt)
    assert [(t.dtype, t.shape) for t in meta.tensors()] == [(t.dtype, t.shape) for t in real.tensors()]
    assert all(t.is_meta for t in meta.tensors()) and meta.shape == real.shape


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
def test_the_kernels_code_table_is_the_codes_then_each_bytes_two_values(fmt):
    """Byte b of packed codes holds element 2j in its high nibble and 2j+1 in its low one."""
    from fusedlora.formats.codebooks import code_table, device_code_table

    table = device_code_table(fmt, torch.device("cpu"))
    codes = code_table(fmt)
    assert table.dtype == torch.float32 and table.shape == (16 + 2 * 256 + 256 + 256,)
    assert torch.equal(table[:16], codes)
    packed = torch.arange(256, dtype=torch.int64)
    pairs = table[16:528].view(256, 2)
    assert torch.equal(pairs[:, 0], codes[packed // 16]) and torch.equal(pairs[:, 1], codes[packed % 16])
    for start, dtype in ((528, torch.bfloat16), (784, torch.float16)):  # one 32-bit word per byte
        halves = table[start:start + 256].view(dtype).view(256, 2)
        assert torch.equal(halves[:, 0], codes[packed // 16].to(dtype)), dtype
        assert torch.equal(halves[:, 1], codes[packed % 16].to(dtype)), dtype
