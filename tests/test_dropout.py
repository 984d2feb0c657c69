"""The dropout mask: the hash of docs/design.md §3 exactly, including 64-bit element indices."""

import pytest
import torch

from fusedlora.dropout import apply_dropout, drop_threshold, element_hash, keep_mask
from helpers import spec_hash

INDICES = [0, 1, 2, 7, 12345, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 5, 2**40 + 3, 2**62 + 11]


@pytest.mark.parametrize("seed", [0, 1, 0x5EED, 0xDEADBEEF, 2**32 - 1])
def test_hash_matches_the_specification(seed):
    got = element_hash(torch.tensor(INDICES, dtype=torch.int64), seed).tolist()
    assert got == [spec_hash(i, seed) for i in INDICES]


def test_mask_is_row_major_over_the_flattened_input():
    mask = keep_mask((13, 29), 0.3, 99)
    expected = [[spec_hash(m * 29 + k, 99) >= drop_threshold(0.3) for k in range(29)] for m in range(13)]
    assert mask.tolist() == expected


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_keep_rate(p):
    assert keep_mask((512, 512), p, 3).float().mean().item() == pytest.approx(1 - p, abs=0.005)


def test_threshold_is_floor_of_p_times_2_to_32():
    assert drop_threshold(0.0) == 0
    assert drop_threshold(0.5) == 2**31
    assert drop_threshold(0.1) == 429496729


def test_apply_dropout_scales_kept_values_and_zeroes_the_rest():
    x = torch.randn(40, 50, dtype=torch.float64)
    out = apply_dropout(x, 0.25, 7)
    keep = keep_mask((40, 50), 0.25, 7)
    assert torch.equal(out[~keep], torch.zeros(int((~keep).sum()), dtype=torch.float64))
    torch.testing.assert_close(out[keep], x[keep] / 0.75, rtol=1e-15, atol=0)
    assert apply_dropout(x, 0.0, 7) is x


def test_different_seeds_give_different_masks():
    assert not torch.equal(keep_mask((64, 64), 0.5, 1), keep_mask((64, 64), 0.5, 2))
