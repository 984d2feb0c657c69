"""The C++ kernels' copies of the shared constants (fusedlora/contract.py) are the same numbers."""

import re
from pathlib import Path

from fusedlora.contract import FORMAT_IDS, MAX_RANK

CSRC = Path(__file__).resolve().parents[1] / "csrc"


def test_the_cuda_weight_format_enum_matches_the_format_ids():
    enum = re.search(r"enum WeightFormat : int \{([^}]*)\}", (CSRC / "types.h").read_text()).group(1)
    ids = {name.strip().lower(): int(value) for name, value in re.findall(r"k(\w+)\s*=\s*(\d+)", enum)}
    assert ids == FORMAT_IDS


def test_the_cuda_kernels_take_the_same_largest_rank():
    assert re.search(r"constexpr int kMaxRank = (\d+);", (CSRC / "lora.cu").read_text()).group(1) == str(MAX_RANK)
