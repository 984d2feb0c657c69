"""The dropout mask: the hash of docs/design.md §3 exactly, including 64-bit element indices."""

import pytest
import torch

from fusedlora.dropout import apply_dropout, drop_mask, drop_threshold, element_hash, keep_mask
from helpers import spec_hash

INDICES = [0, 1, 2, 7, 12345, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 5, 2**40 + 3, 2**62 + 11]


@pytest.mark.parametrize("seed", [0, 1, 0x5EED, 0xDEADBEEF, 2**32 - 1])
def test_hash_matches_the_specification(seed):
    got = element_hash(torch.tensor(INDICES, dtype=torch.int64), seed).tolist()
    assert got == [spec_hash(i, seed) for i in INDICES]


@pytest.mark.parametrize("seed", [0, 0x5EED, 0xDEADBEEF, 2**32 - 1])
def test_masks_below_2_to_31_elements_hash_in_int32_as_the_specification_does(seed):
    """keep_mask hashes masks of fewer than 2^31 elements in int32 (wrapping products, masked
    shifts): the same bits as the int64 hash, up to the last index of that range."""
    from fusedlora.dropout import _hash32_

    indices = [0, 1, 77, 2**16 - 1, 2**16, 2**24 + 3, 2**31 - 2, 2**31 - 1]
    got = (_hash32_(torch.tensor(indices, dtype=torch.int32), seed).to(torch.int64) & 0xFFFFFFFF).tolist()
    assert got == [spec_hash(i, seed) for i in indices]
    mask = keep_mask((61, 97), 0.37, seed)
    expected = element_hash(torch.arange(61 * 97, dtype=torch.int64), seed) >= drop_threshold(0.37)
    assert torch.equal(mask, expected.view(61, 97))
    assert torch.equal(drop_mask((61, 97), 0.37, seed), ~expected.view(61, 97))


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
