"""Code tables of the 4-bit formats and of the nested-absmax map.

The values are those bitsandbytes uses, so packed checkpoints decode to the same numbers:
NF4 is the 16-level normal-float table of QLoRA (Dettmers et al., 2023); FP4 is a 1-3-1-ish
float with bit 3 as the sign, normalised to [-1, 1]; the 256-entry map is the signed dynamic
map of "8-bit Approximations for Parallelism in Deep Learning" (Dettmers, 2015).
"""

from functools import lru_cache

import torch

from ..contract import CODE_TABLE_WORDS, PAIRS_BF16, PAIRS_FP16, PAIRS_FP32

NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

# FP4 codes 0..7 are the magnitudes below (code | 8 is the negative twin), in units of 1/12 so
# that the largest magnitude is 1.
FP4_MAGNITUDES_TWELFTHS = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)


@lru_cache(maxsize=None)
def _code_cpu(fmt: str) -> torch.Tensor:
    if fmt == "nf4":
        return torch.tensor(NF4_VALUES, dtype=torch.float32)
    if fmt == "fp4":
        # 0.0 - v rather than -v: code 8 is +0.0 in bitsandbytes' table, not -0.0.
        signed = list(FP4_MAGNITUDES_TWELFTHS) + [0.0 - v for v in FP4_MAGNITUDES_TWELFTHS]
        return torch.tensor(signed, dtype=torch.float32) / 12.0
    raise ValueError(f"fmt must be 'nf4' or 'fp4', got {fmt!r}")


def code_table(fmt: str, device=None) -> torch.Tensor:
    """The 16 fp32 values that 4-bit codes 0..15 of `fmt` ("nf4" or "fp4") stand for (a fresh copy)."""
    return _code_cpu(fmt).to(device, copy=True)



def _sixteen_bit_pairs(pair_values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(256, 2) fp32 pairs rounded to `dtype`, each pair packed into one 32-bit word (the first
    value in the low half, as a little-endian load of two 16-bit values reads it), as fp32 bits."""
    halves = pair_values.to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF
    return (halves[:, 0] | (halves[:, 1] << 16)).view(torch.float32)


@lru_cache(maxsize=None)
def device_code_table(fmt: str, device: torch.device) -> torch.Tensor:
    """The 4-bit table the kernels read, CODE_TABLE_WORDS 32-bit words on `device` as fp32 (one
    shared copy per device): the 16 values of `code_table(fmt)`; then for each byte value
    b = 0..255 the pair (code[b >> 4], code[b & 15]), its high and its low nibble's values, as two
    fp32 (one 8-byte load decodes a byte); then the same pairs rounded to bf16, and to fp16, one
    32-bit word each (a 4-byte load gives a 16-bit MMA operand's two values, k and k + 1). The
    16-bit pairs are bit patterns, some fp32 denormals as fp32: copy the table, never cast it."""
    code = _code_cpu(fmt)
    byte = torch.arange(256)
    pairs = torch.stack([code[byte >> 4], code[byte & 0xF]], dim=1)
    table = torch.cat([code, pairs.reshape(-1), _sixteen_bit_pairs(pairs, torch.bfloat16),
                       _sixteen_bit_pairs(pairs, torch.float16)])
    assert table.numel() == CODE_TABLE_WORDS and table[PAIRS_BF16:PAIRS_FP16].numel() == 256
    return table.to(device)


def code_pairs(fmt: str, device: torch.device) -> torch.Tensor:
    """(256, 2) fp32: byte b's two values (code[b >> 4], code[b & 15]), a view of the shared
    `device_code_table` (read it, never write it): one lookup decodes a packed byte."""
    return device_code_table(fmt, device)[PAIRS_FP32:PAIRS_BF16].view(256, 2)


@lru_cache(maxsize=None)
def _dynamic_map_cpu() -> torch.Tensor:
    values = [0.0, 1.0]
    for exponent in range(7):
        edges = torch.linspace(0.1, 1.0, 2**exponent + 1, dtype=torch.float32)
        midpoints = (edges[:-1] + edges[1:]) / 2.0
        decade = (10.0 ** (exponent - 6)) * midpoints
        values += decade.tolist() + (-decade).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


def signed_dynamic_map(device=None) -> torch.Tensor:
    """The sorted 256-entry fp32 map that nested (double) quantization codes absmax with.

    Decade 10^(e-6) for e = 0..6 holds 2^e linear steps (midpoints of a split of [0.1, 1]),
    mirrored for the negative side, plus 0 and 1. A fresh copy: layers own their tables.
    """
    return _dynamic_map_cpu().to(device, copy=True)
