"""The frozen-weight object every storage format implements (dense, int8, fp8, nf4, fp4).

A frozen weight is a plain object holding tensors, not an `nn.Module`: the layer that owns it
moves it between devices and never lets a dtype cast touch packed data (see
`FrozenWeight.apply_module_fn`). Its `state_dict()` uses the key names of a bitsandbytes
Linear layer (`weight`, `weight.absmax`, ..., `SCB`), relative to the owning linear layer, so
checkpoints move between fusedlora and bitsandbytes without conversion.
"""

import copy
from typing import Callable, ClassVar, Optional

import torch

from ..contract import WeightArgs

Tensor = torch.Tensor


class FrozenWeight:
    """A frozen (N, K) weight in a storage format (dense or quantized); dequantized on demand or
    inside the kernels.

    Subclasses name their tensors in `tensor_fields`, in the order the ops receive them
    (`tensors()`: `fusedlora.contract.WEIGHT_SLOTS`), and implement `dequantize`, `kernel_args`,
    `state_dict`, `claims_state_dict`, `from_state_dict` and `from_tensors`; `register_format`
    makes them known by name.
    """

    fmt: str
    tensor_fields: tuple[str, ...]
    follows_dtype_casts: ClassVar[bool] = False
    claims_any_float_weight: ClassVar[bool] = False  # dense: tried last by from_state_dict
    records_dtype: ClassVar[bool] = True  # whether state_dict() keeps `dtype` (int8/fp8 do not)

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype, blocksize: int = 0):
        self.shape = torch.Size(shape)
        self.dtype = dtype  # what dequantize() returns by default: the dtype it was quantized from
        self.blocksize = blocksize

    def tensors(self) -> list[Tensor]:
        """The storage tensors in the order the fused ops take them."""
        return [getattr(self, name) for name in self.tensor_fields]

    @property
    def device(self) -> torch.device:
        return self.tensors()[0].device

    @property
    def nbytes(self) -> int:
        """Bytes of storage: packed data plus every scale and code table."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The (N, K) weight as a dense tensor of `dtype` (default: `self.dtype`)."""
        raise NotImplementedError

    def kernel_args(self) -> WeightArgs:
        """This weight as the kernels take it (one marshalling for every kernel that reads W)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors keyed as in a bitsandbytes-style Linear layer's state dict (no prefix)."""
        raise NotImplementedError

    @classmethod
    def claims_state_dict(cls, state_dict: dict[str, Tensor]) -> bool:
        """Whether `state_dict` (keys relative to a linear layer) holds a weight of this class."""
        raise NotImplementedError

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, Tensor]) -> "FrozenWeight":
        """Rebuild a weight from `state_dict()` output, or from a bitsandbytes layer's state dict.

        Called on `FrozenWeight` itself it picks the format from the keys; the tensors are
        used as they are (no copy, no re-quantization).
        """
        candidates = sorted(set(_FORMAT_CLASSES.values()), key=lambda c: (c.claims_any_float_weight, c.__name__))
        for weight_class in candidates:
            if weight_class.claims_state_dict(state_dict):
                return weight_class.from_state_dict(state_dict)
        raise ValueError(
            f"state_dict holds no weight of a known format (keys: {sorted(state_dict)}); expected "
            "'weight' plus 'weight.quant_state.bitsandbytes__nf4'/'__fp4' (4-bit), 'SCB' (int8), "
            "'weight_scale' (fp8), or a floating-point 'weight' (dense)"
        )

    @classmethod
    def from_tensors(cls, fmt: str, tensors: list[Tensor], shape, blocksize: int) -> "FrozenWeight":
        """Rebuild a weight from `tensors()` output (used inside the ops)."""
        return _FORMAT_CLASSES[fmt].from_tensors(fmt, tensors, shape, blocksize)

    def with_tensors(self, tensors: list[Tensor]) -> "FrozenWeight":
        """This weight's layout (format, shape, settings) holding `tensors`, in `tensors()` order;
        a dense weight takes their dtype."""
        moved = copy.copy(self)
        for name, tensor in zip(self.tensor_fields, tensors, strict=True):
            setattr(moved, name, tensor)
        if self.follows_dtype_casts:
            moved.dtype = tensors[0].dtype
        return moved

    def _map_tensors(self, fn: Callable[[Tensor], Tensor]) -> "FrozenWeight":
        return self.with_tensors([fn(t) for t in self.tensors()])

    def to(self, device) -> "FrozenWeight":
        """This weight on `device` (the same object when it is already there)."""
        device = torch.device(device)
        if all(t.device == device for t in self.tensors()):
            return self
        return self._map_tensors(lambda t: t.to(device))

    def clone(self, device=None) -> "FrozenWeight":
        """A copy with its own storage, on `device` (default: where it is now)."""
        return self._map_tensors(lambda t: t.to(device or t.device, copy=True))

    def requantize(self, weight: Tensor) -> "FrozenWeight":
        """A new weight in this one's format and settings, holding the float (N, K) `weight`."""
        raise NotImplementedError

    def apply_module_fn(self, fn: Callable[[Tensor], Tensor]) -> "FrozenWeight":
        """Apply an `nn.Module._apply` function: device moves yes, dtype casts only for dense.

        `model.half()` or `model.to(torch.bfloat16)` would otherwise cast fp32 scales (and fp8
        data) and silently change the weight; packed formats keep their dtypes bit for bit.
        """
        return self._map_tensors(fn if self.follows_dtype_casts else device_moves_only(fn))

    def describe(self) -> str:
        """A short human-readable description, e.g. 'nf4(blocksize=64, nested)'."""
        return self.fmt

    def __repr__(self) -> str:
        n, k = self.shape
        return f"{type(self).__name__}({self.describe()}, shape=({n}, {k}), dtype={self.dtype}, device={self.device})"


def device_moves_only(fn: Callable[[Tensor], Tensor], only: Optional[set] = None) -> Callable[[Tensor], Tensor]:
    """`fn` (an `nn.Module._apply` function) that moves tensors between devices but never changes
    their dtype: every tensor's, or only those whose `id` is in `only`."""

    def apply(tensor: Tensor) -> Tensor:
        moved = fn(tensor)
        kept = only is None or id(tensor) in only
        return tensor.to(moved.device) if kept and moved.dtype != tensor.dtype else moved

    return apply


def check_dense_weight(weight, name: str = "weight") -> Tensor:
    """Validate a float (N, K) tensor that is about to be quantized."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
    if not weight.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {weight.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"{name} must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if weight.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(weight.shape)}")
    return weight


def check_finite_for_quantization(weight: Tensor, fmt: str) -> None:
    if not weight.is_meta and not torch.isfinite(weight).all():  # meta: shapes and dtypes only
        raise ValueError(
            f"weight holds NaN or Inf values, which the {fmt!r} format cannot represent "
            "(its scales would become NaN); clean the weight or use fmt='dense'"
        )


_FORMAT_CLASSES: dict[str, type] = {}


def register_format(*names: str):
    """Class decorator: make a `FrozenWeight` subclass known under the format `names`."""

    def register(weight_class):
        for name in names:
            _FORMAT_CLASSES[name] = weight_class
        return weight_class

    return register


def format_class(fmt) -> type:
    """The `FrozenWeight` subclass of format `fmt`, or a ValueError naming the choices."""
    if not isinstance(fmt, str) or fmt not in _FORMAT_CLASSES:
        raise ValueError(f"fmt must be one of {sorted(_FORMAT_CLASSES)}, got {fmt!r}")
    return _FORMAT_CLASSES[fmt]


def require_key(state_dict, key) -> Tensor:
    if key not in state_dict:
        raise ValueError(f"state_dict is missing {key!r} (keys: {sorted(state_dict)})")
    return state_dict[key]


def expect_numel(tensor: Tensor, numel: int, key: str) -> Tensor:
    if tensor.numel() != numel:
        raise ValueError(f"state_dict[{key!r}] has {tensor.numel()} elements, expected {numel} for this shape and blocksize")
    return tensor


def expect_dtype(tensor: Tensor, dtype: torch.dtype, key: str) -> Tensor:
    if tensor.dtype != dtype:
        raise ValueError(f"state_dict[{key!r}] has dtype {tensor.dtype}, expected {dtype}")
    return tensor
