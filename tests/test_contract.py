"""The C++ kernels' copies of the shared constants (fusedlora/contract.py) are the same numbers,
and every format hands the ops its tensors in the contract's order."""

import re
from pathlib import Path

import pytest
import torch

from fusedlora import quantize
from fusedlora.contract import FORMAT_IDS, MAX_RANK, WEIGHT_SLOTS, WeightArgs

CSRC = Path(__file__).resolve().parents[1] / "csrc"


def test_the_cuda_weight_format_enum_matches_the_format_ids():
    enum = re.search(r"enum WeightFormat : int \{([^}]*)\}", (CSRC / "types.h").read_text()).group(1)
    ids = {name.strip().lower(): int(value) for name, value in re.findall(r"k(\w+)\s*=\s*(\d+)", enum)}
    assert ids == FORMAT_IDS


def test_the_cuda_kernels_take_the_same_largest_rank():
    assert re.search(r"constexpr int kMaxRank = (\d+);", (CSRC / "lora.cu").read_text()).group(1) == str(MAX_RANK)


def _snake(camel: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", camel).lower()


def test_the_cuda_weight_slots_are_the_contract_order():
    enum = re.search(r"enum WeightSlot : int \{([^}]*)\}", (CSRC / "types.h").read_text()).group(1)
    slots = {_snake(name): int(value) for name, value in re.findall(r"k(\w+)\s*=\s*(\d+)", enum)}
    assert slots == {name: index for index, name in enumerate(WEIGHT_SLOTS)}


def test_the_cuda_weight_view_has_the_fields_of_the_weight_args():
    struct = re.search(r"struct WeightView \{([^}]*)\}", (CSRC / "types.h").read_text()).group(1)
    fields = set(re.findall(r"(\w+);", struct))
    # C++ adds the dense dtype (Triton reads it from the pointer), the nested flag and K; its code
    # tables live in constant memory.
    assert fields == (set(WeightArgs._fields) - {"code"}) | {"dense_type", "nested", "k"}


@pytest.mark.parametrize("fmt, double_quant", [("dense", False), ("int8", False), ("fp8", False),
                                                ("nf4", False), ("nf4", True), ("fp4", True)])
def test_every_format_hands_the_ops_its_kernel_arguments_in_slot_order(fmt, double_quant):
    weight = quantize(torch.randn(48, 128), fmt, blocksize=64, double_quant=double_quant)
    args = weight.kernel_args()
    present = [getattr(args, slot) for slot in WEIGHT_SLOTS if getattr(args, slot) is not None]
    assert [t.data_ptr() for t in weight.tensors()] == [t.data_ptr() for t in present]
    assert args.fmt == FORMAT_IDS[fmt] and args.nested == double_quant
    assert (args.code is not None) == (fmt in ("nf4", "fp4"))
    rebuilt = type(weight).from_tensors(fmt, weight.tensors(), weight.shape, weight.blocksize)
    assert torch.equal(rebuilt.dequantize(torch.float32), weight.dequantize(torch.float32))
