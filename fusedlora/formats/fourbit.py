"""NF4 / FP4: 4-bit codes with one absmax per block, bit-compatible with bitsandbytes Linear4bit.

Layout (docs/design.md §2): element i of the row-major flattened (N, K) weight is the high nibble of byte
i // 2 when i is even, the low nibble when odd; `absmax[i // blocksize]` scales it:
`W_i = code[q_i] · absmax[i // blocksize]`. With nested ("double") quantization the absmax are
themselves uint8 codes into the signed dynamic map, one fp32 `nested_absmax` per 256 blocks and
one fp32 `nested_offset`: `absmax_j = map[a_j] · nested_absmax[j // 256] + nested_offset`.

Quantization reproduces the packed bytes and absmax of bitsandbytes' CPU path bit for bit: values
are scaled by the fp32 reciprocal of their block's absmax (a trailing partial block divides
instead), the nearest code wins with ties to the lower code, and an odd element count is padded
with the code of 0.0, as bitsandbytes does. Nested absmax codes follow bitsandbytes' CPU kernel: scale by the fp32
reciprocal of the 256-block absmax, snap to a 65536-point grid, take the nearest map entry.
"""

import json
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from ..contract import FORMAT_IDS, WeightArgs
from .base import FrozenWeight, Tensor, check_finite_for_quantization, expect_dtype, expect_numel, register_format, require_key
from .codebooks import code_pairs, code_table, device_code_table, signed_dynamic_map

VALID_BLOCKSIZES = tuple(2**p for p in range(5, 13))
NESTED_BLOCKSIZE = 256
_QUANT_STATE_KEY = "weight.quant_state.bitsandbytes__{}"


def check_blocksize(blocksize) -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"blocksize must be a power of two from 32 to 4096, got {blocksize!r}")
    return blocksize


def _blocked(flat: Tensor, blocksize: int) -> Tensor:
    """`flat` zero-padded to whole blocks, as (blocks, blocksize)."""
    blocks = -(-flat.numel() // blocksize)
    return F.pad(flat, (0, blocks * blocksize - flat.numel())).view(blocks, blocksize)


def quantize_4bit(weight: Tensor, fmt: str, blocksize: int) -> tuple[Tensor, Tensor]:
    """Pack `weight` (any shape, float) as 4-bit `fmt` codes.

    Returns (packed uint8 (ceil(n/2),), absmax fp32 (ceil(n/blocksize),)) for n = weight.numel().
    """
    flat = weight.reshape(-1).float()
    n = flat.numel()
    whole = n - n % blocksize
    blocks = flat[:whole].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    # An all-zero block has absmax 0: its reciprocal is clamped so that 0 · 1e38 codes as 0.0.
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).reshape(-1)
    if whole < n:
        # The trailing partial block divides (and stores its absmax clamped), as bitsandbytes' CPU path does.
        tail_absmax = flat[whole:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat((absmax, tail_absmax.view(1)))
        scaled = torch.cat((scaled, flat[whole:] / tail_absmax))
    scaled = scaled.clamp(-1.0, 1.0)
    if n % 2:
        scaled = F.pad(scaled, (0, 1))
    sorted_code, order = torch.sort(code_table(fmt, flat.device), stable=True)
    midpoints = (sorted_code[:-1] + sorted_code[1:]) / 2
    codes = order[torch.bucketize(scaled, midpoints)].to(torch.uint8)
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed, absmax


def quantize_absmax_nested(absmax: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Code fp32 `absmax` as uint8 into the signed dynamic map, per 256 values.

    Returns (codes uint8 like absmax, nested_absmax fp32 (ceil(len/256),), offset fp32 ()).
    """
    offset = absmax.mean()
    blocks = _blocked(absmax - offset, NESTED_BLOCKSIZE)
    nested_absmax = blocks.abs().amax(dim=1)
    normed = (blocks * (1.0 / nested_absmax).unsqueeze(1)).clamp(-1.0, 1.0)
    codes = _nearest_on_grid(normed, signed_dynamic_map(absmax.device))
    # A 256-block whose values all equal the mean has nested_absmax 0: bitsandbytes writes code 0.
    codes = torch.where(nested_absmax.unsqueeze(1) > 0, codes, 0).reshape(-1)[: absmax.numel()]
    return codes.to(torch.uint8), nested_absmax, offset


_GRID_STEPS = 65535


def _nearest_on_grid(normed: Tensor, code: Tensor) -> Tensor:
    """Index of the `code` entry nearest to `normed` after snapping it to a 65536-point grid.

    bitsandbytes' CPU quantizer (0.50) rounds each value in [-1, 1] to the nearest of 65536
    evenly spaced points and looks the code up from there; all arithmetic is fp32 as it does.
    """
    grid_index = (((normed + 1.0) * 0.5) * float(_GRID_STEPS) + 0.5).to(torch.int64)
    grid_value = -1.0 + (2.0 * grid_index.to(torch.float32)) / float(_GRID_STEPS)
    midpoints = 0.5 * (code[:-1] + code[1:])
    return torch.searchsorted(midpoints, grid_value)


@register_format("nf4", "fp4")
class FourBitWeight(FrozenWeight):
    """An (N, K) weight as packed NF4 or FP4 codes with per-block (optionally nested) absmax."""

    def __init__(self, fmt, packed, absmax, shape, dtype, blocksize, nested_absmax=None, nested_code=None, nested_offset=None):
        super().__init__(shape, dtype, blocksize)
        self.fmt = fmt
        self.packed = packed
        self.absmax = absmax
        self.nested = nested_absmax is not None
        if self.nested:
            self.nested_absmax, self.nested_code, self.nested_offset = nested_absmax, nested_code, nested_offset
            self.tensor_fields = ("packed", "absmax", "nested_absmax", "nested_code", "nested_offset")
        else:
            self.tensor_fields = ("packed", "absmax")

    @classmethod
    def quantize(cls, weight: Tensor, fmt: str, blocksize: int = 64, double_quant: bool = True) -> "FourBitWeight":
        check_blocksize(blocksize)
        check_finite_for_quantization(weight, fmt)
        packed, absmax = quantize_4bit(weight, fmt, blocksize)
        nested = quantize_absmax_nested(absmax) if double_quant else None
        if nested is None:
            return cls(fmt, packed, absmax, weight.shape, weight.dtype, blocksize)
        codes, nested_absmax, offset = nested
        return cls(fmt, packed, codes, weight.shape, weight.dtype, blocksize,
                   nested_absmax, signed_dynamic_map(weight.device), offset)

    def requantize(self, weight: Tensor) -> "FourBitWeight":
        return FourBitWeight.quantize(weight, self.fmt, self.blocksize, self.nested)

    def block_absmax(self) -> Tensor:
        """The fp32 absmax of every block, decoding the nested codes when there are any."""
        if not self.nested:
            return self.absmax
        per_value_scale = self.nested_absmax.repeat_interleave(NESTED_BLOCKSIZE)[: self.absmax.numel()]
        return self.nested_code[self.absmax.to(torch.int64)] * per_value_scale + self.nested_offset

    def dequantize(self, dtype=None) -> Tensor:
        # One lookup per byte in the table of code pairs, then each block times its absmax in
        # place: the products of code and absmax in fp32, rounded once to `dtype`.
        n = self.shape.numel()
        pairs = code_pairs(self.fmt, self.packed.device)
        values = torch.index_select(pairs, 0, self.packed.view(-1).to(torch.int32)).view(-1)[:n]
        absmax = self.block_absmax()
        if n % self.blocksize == 0:
            values.view(-1, self.blocksize).mul_(absmax.unsqueeze(1))
        else:
            values.mul_(absmax.repeat_interleave(self.blocksize)[:n])
        return values.view(self.shape).to(dtype or self.dtype)

    def describe(self) -> str:
        return f"{self.fmt}(blocksize={self.blocksize}{', nested' if self.nested else ''})"

    # torch.distributed.checkpoint (FSDP2's and Accelerate's state dicts) resolves every state-dict
    # key by getattr from the module, so each part of the bitsandbytes key names must be an attribute.
    @property
    def quant_map(self) -> Tensor:
        return code_table(self.fmt, self.packed.device)

    @property
    def nested_quant_map(self) -> Tensor:
        return self.nested_code

    @property
    def quant_state(self) -> SimpleNamespace:
        key = _QUANT_STATE_KEY.format(self.fmt)
        return SimpleNamespace(**{key.rsplit(".", 1)[1]: self.state_dict()[key]})

    def kernel_args(self) -> WeightArgs:
        nested = (self.nested_absmax, self.nested_code, self.nested_offset) if self.nested else (None, None, None)
        return WeightArgs(FORMAT_IDS[self.fmt], self.packed, self.absmax, device_code_table(self.fmt, self.packed.device),
                          *nested, 0, self.blocksize)

    def state_dict(self) -> dict[str, Tensor]:
        quant_state = {
            "quant_type": self.fmt,
            "blocksize": self.blocksize,
            "dtype": str(self.dtype).removeprefix("torch."),
            "shape": list(self.shape),
        }
        tensors = {
            "weight": self.packed.view(-1, 1),
            "weight.absmax": self.absmax,
            "weight.quant_map": self.quant_map,
        }
        if self.nested:
            offset = 0.0 if self.nested_offset.is_meta else self.nested_offset.item()  # meta: a layout only
            quant_state.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=offset)
            tensors["weight.nested_absmax"] = self.nested_absmax
            tensors["weight.nested_quant_map"] = self.nested_code
        packed_state = torch.tensor(list(json.dumps(quant_state).encode()), dtype=torch.uint8)
        tensors[_QUANT_STATE_KEY.format(self.fmt)] = packed_state
        return tensors

    @classmethod
    def claims_state_dict(cls, state_dict) -> bool:
        return any(_QUANT_STATE_KEY.format(fmt) in state_dict for fmt in ("nf4", "fp4"))

    @classmethod
    def from_state_dict(cls, state_dict) -> "FourBitWeight":
        fmt = "nf4" if _QUANT_STATE_KEY.format("nf4") in state_dict else "fp4"
        state_key = _QUANT_STATE_KEY.format(fmt)
        try:
            quant_state = json.loads(bytes(state_dict[state_key].tolist()).decode())
            shape = tuple(int(s) for s in quant_state["shape"])
            dtype = getattr(torch, quant_state["dtype"])
            blocksize = check_blocksize(int(quant_state["blocksize"]))
        except (KeyError, ValueError, TypeError, AttributeError) as err:
            raise ValueError(f"state_dict[{state_key!r}] is not a valid 4-bit quant state: {err!r}") from err
        if quant_state.get("quant_type", fmt) != fmt or len(shape) != 2:
            raise ValueError(f"state_dict[{state_key!r}] describes {quant_state}; expected a 2-D {fmt} weight")
        quant_map = state_dict.get("weight.quant_map")
        if quant_map is not None and not torch.equal(quant_map.cpu().float(), code_table(fmt)):
            raise ValueError(f"state_dict['weight.quant_map'] is not the standard {fmt} table; custom tables are not supported")
        packed = require_key(state_dict, "weight")
        if packed.dtype != torch.uint8:
            packed = packed.contiguous().view(torch.uint8)  # bitsandbytes' quant_storage may be any dtype
        n = shape[0] * shape[1]
        blocks = -(-n // blocksize)
        packed = expect_numel(packed.reshape(-1), -(-n // 2), "weight")
        absmax = expect_numel(require_key(state_dict, "weight.absmax").reshape(-1), blocks, "weight.absmax")
        if "nested_offset" not in quant_state:
            return cls(fmt, packed, expect_dtype(absmax, torch.float32, "weight.absmax"), shape, dtype, blocksize)
        if int(quant_state.get("nested_blocksize", NESTED_BLOCKSIZE)) != NESTED_BLOCKSIZE:
            raise ValueError(f"state_dict[{state_key!r}] has nested_blocksize {quant_state['nested_blocksize']}; only 256 is supported")
        nested_absmax = expect_numel(require_key(state_dict, "weight.nested_absmax").reshape(-1),
                                      -(-blocks // NESTED_BLOCKSIZE), "weight.nested_absmax")
        nested_code = expect_numel(require_key(state_dict, "weight.nested_quant_map").reshape(-1), 256, "weight.nested_quant_map")
        offset = torch.tensor(float(quant_state["nested_offset"]), dtype=torch.float32, device=packed.device)
        return cls(fmt, packed, expect_dtype(absmax, torch.uint8, "weight.absmax"), shape, dtype, blocksize,
                   expect_dtype(nested_absmax, torch.float32, "weight.nested_absmax"),
                   expect_dtype(nested_code, torch.float32, "weight.nested_quant_map"), offset)

    @classmethod
    def from_tensors(cls, fmt, tensors, shape, blocksize) -> "FourBitWeight":
        return cls(fmt, tensors[0], tensors[1], shape, torch.float32, blocksize, *tensors[2:])
