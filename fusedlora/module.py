"""`LoRALinear`: a drop-in `nn.Linear` with a frozen (quantized) weight and a LoRA adapter.

Names follow PEFT (`lora_A.weight` (r, K), `lora_B.weight` (N, r), `scaling`, `merge`,
`unmerge`); the frozen weight's state-dict keys follow bitsandbytes' Linear layers, so a
LoRALinear's state dict minus the adapter is what `bnb.nn.Linear4bit` / `Linear8bitLt` write.
"""

import contextlib
import math
import warnings
from numbers import Real
from typing import Optional

import torch
import torch.nn as nn

from .checks import check_probability, check_quant
from .formats import FrozenWeight, from_bnb_module, quantize
from .formats.base import device_moves_only
from .ops import fused_lora_linear
from .storage import (check_replaceable, held_weight, hold, is_managed_elsewhere, load_shards, local_part, local_tensor,
                      record_held, storage_names)

_INITS = ("kaiming", "gaussian")
_BNB_LINEARS = ("Linear4bit", "LinearNF4", "LinearFP4", "Linear8bitLt")
_WEIGHT_KEYS = ("weight", "SCB", "weight_format", "weight_scale")


def is_bnb_linear(module: nn.Module) -> bool:
    """Whether `module` is a bitsandbytes 4-bit or 8-bit linear layer."""
    return type(module).__module__.startswith("bitsandbytes") and type(module).__name__ in _BNB_LINEARS


def is_conv1d(module: nn.Module) -> bool:
    """Whether `module` is transformers' `Conv1D` (GPT-2's projections: y = x·W + b, W stored
    (in_features, out_features))."""
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an `nn.Linear`, a bitsandbytes linear or a `Conv1D`."""
    if is_conv1d(module):
        return tuple(module.weight.shape)
    return module.in_features, module.out_features


def _is_weight_key(relative_key: str) -> bool:
    return relative_key in _WEIGHT_KEYS or relative_key.startswith("weight.")


@torch.no_grad()
def _initialise(lora_A: torch.Tensor, lora_B: torch.Tensor, r: int, init: str) -> None:
    """A kaiming-uniform (a=√5, as PEFT) or normal with std 1/r ("gaussian"), B = 0. A is drawn
    whole and a sharded A takes its rows of it, so ranks seeded alike hold one consistent A."""
    if init not in _INITS:
        raise ValueError(f"init must be one of {_INITS}, got {init!r}")
    whole = torch.empty(lora_A.shape, dtype=lora_A.dtype, device=local_tensor(lora_A).device)
    if init == "gaussian":
        nn.init.normal_(whole, std=1.0 / r)
    else:
        nn.init.kaiming_uniform_(whole, a=math.sqrt(5))
    local_tensor(lora_A).copy_(local_part(whole, lora_A))
    nn.init.zeros_(lora_B)


class LoRAFactor(nn.Module):
    """One LoRA factor, held as `.weight` so that keys read `lora_A.weight` as in PEFT."""

    def __init__(self, rows: int, cols: int, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rows, cols, dtype=dtype, device=device))

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, {self.weight.shape[1]}"


class LoRAAdapter(nn.Module):
    """A named adapter a `LoRALinear` holds but does not use now: its factors and settings."""

    def __init__(self, lora_A: LoRAFactor, lora_B: LoRAFactor, r: int, alpha: float, dropout: float, rslora: bool):
        super().__init__()
        self.lora_A, self.lora_B = lora_A, lora_B
        self.r, self.lora_alpha, self.lora_dropout, self.use_rslora = r, alpha, dropout, rslora


def _check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha!r}")
    return alpha


def _check_rank(r) -> int:
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r must be an int >= 1, got {r!r}")
    return r


class LoRALinear(nn.Module):
    """y = x·Wᵀ + scaling·lora_B(lora_A(dropout(x))) (+ bias), W frozen in any fusedlora format.

    weight: a `FrozenWeight` (N, K), held as this layer's frozen `frozen_*` parameters so that
    FSDP2 shards it (`fusedlora.storage`); bias: (N,) or None, frozen; r: adapter rank (>= 1);
    alpha: scaling = alpha / r (alpha / sqrt(r) with rslora); dropout: on the adapter input
    only; init: "kaiming" (A kaiming-uniform a=√5, B zeros, as PEFT) or "gaussian" (A normal
    with std 1/r); adapter_dtype: default the weight's dtype for a dense base, fp32 otherwise;
    fan_in_fan_out: the layer replaces a transformers `Conv1D` (as PEFT's option of that name):
    W is still held (N, K), but `to_linear` gives a `Conv1D` back and a dense W is saved and
    loaded in the Conv1D's own (K, N) layout, so the state dict is GPT-2's (packed formats keep
    bitsandbytes' (N, K), as transformers' bitsandbytes loading stores a Conv1D).
    """

    def __init__(self, weight: FrozenWeight, bias: Optional[torch.Tensor] = None, r: int = 16, alpha: float = 16,
                 dropout: float = 0.0, rslora: bool = False, init: str = "kaiming", adapter_dtype=None,
                 fan_in_fan_out: bool = False):
        super().__init__()
        if not isinstance(weight, FrozenWeight):
            raise TypeError(f"weight must be a FrozenWeight (see fusedlora.quantize), got {type(weight).__name__}")
        _check_rank(r)
        _check_alpha(alpha)
        out_features, in_features = weight.shape
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
                raise TypeError(f"bias must be a floating-point tensor or None, got {type(bias).__name__}")
            if tuple(bias.shape) != (out_features,):
                raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
        if adapter_dtype is None:
            adapter_dtype = weight.dtype if weight.fmt == "dense" else torch.float32
        if not isinstance(adapter_dtype, torch.dtype) or not adapter_dtype.is_floating_point:
            raise TypeError(f"adapter_dtype must be a floating torch.dtype, got {adapter_dtype!r}")
        self.weight = weight
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.lora_A = LoRAFactor(r, in_features, adapter_dtype, weight.device)
        self.lora_B = LoRAFactor(out_features, r, adapter_dtype, weight.device)
        self.r = r
        self.fan_in_fan_out = bool(fan_in_fan_out)
        self.set_hyperparameters(alpha, dropout, rslora)
        self.merged = False
        self._adapter_enabled = True
        self._premerge_weight: Optional[FrozenWeight] = None
        self.active_adapter = "default"  # the name of the adapter in lora_A / lora_B
        self.inactive_adapters = nn.ModuleDict()  # the other named adapters (fusedlora.add_adapter)
        self.reset_lora_parameters(init)

    @property
    def adapter_names(self) -> list[str]:
        """The names of this layer's adapters, the active one first."""
        return [self.active_adapter, *self.inactive_adapters]

    def add_adapter(self, name: str, r: int = 16, alpha: float = 16, dropout: float = 0.0, rslora: bool = False,
                    init: str = "kaiming") -> None:
        """Add a new inactive adapter `name` (B = 0) over the same frozen weight."""
        if not isinstance(name, str) or not name or "." in name or hasattr(nn.ModuleDict(), name):
            raise ValueError(f"adapter name must be a non-empty string without '.' that is no attribute of a "
                             f"ModuleDict, got {name!r}")
        if name in self.adapter_names:
            raise ValueError(f"adapter {name!r} exists already (adapters: {self.adapter_names})")
        dtype, device = self.lora_A.weight.dtype, local_tensor(self.lora_A.weight).device
        adapter = LoRAAdapter(LoRAFactor(_check_rank(r), self.in_features, dtype, device),
                              LoRAFactor(self.out_features, r, dtype, device), r, _check_alpha(alpha),
                              check_probability("dropout", dropout), bool(rslora))
        _initialise(adapter.lora_A.weight, adapter.lora_B.weight, r, init)
        self.inactive_adapters[name] = adapter.requires_grad_(False)  # only the active adapter trains

    def set_adapter(self, name: str) -> None:
        """Make adapter `name` the one this layer computes with: its factors are swapped into
        lora_A / lora_B (no copy; the frozen weight untouched)."""
        if name == self.active_adapter:
            return
        if name not in self.inactive_adapters:
            raise KeyError(f"no adapter {name!r} (adapters: {self.adapter_names})")
        if self.merged:
            raise RuntimeError(f"set_adapter({name!r}): the layer is merged; unmerge() first")
        chosen = self.inactive_adapters[name]
        del self.inactive_adapters[name]
        self.inactive_adapters[self.active_adapter] = LoRAAdapter(self.lora_A, self.lora_B, self.r, self.lora_alpha,
                                                                  self.lora_dropout, self.use_rslora)
        self.lora_A, self.lora_B, self.r = chosen.lora_A, chosen.lora_B, chosen.r
        self.set_hyperparameters(chosen.lora_alpha, chosen.lora_dropout, chosen.use_rslora)
        self.active_adapter = name

    def delete_adapter(self, name: str) -> None:
        """Remove the inactive adapter `name`."""
        if name == self.active_adapter:
            raise ValueError(f"adapter {name!r} is the active one; set another adapter before deleting it")
        if name not in self.inactive_adapters:
            raise KeyError(f"no adapter {name!r} (adapters: {self.adapter_names})")
        del self.inactive_adapters[name]

    def set_hyperparameters(self, alpha: float, dropout: float, rslora: bool) -> None:
        """Set lora_alpha, lora_dropout, use_rslora and the scaling they give: alpha / r, or
        alpha / sqrt(r) with rslora."""
        self.lora_dropout = check_probability("dropout", dropout)
        self.lora_alpha = alpha
        self.use_rslora = bool(rslora)
        self.scaling = alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @classmethod
    def from_linear(cls, linear: nn.Module, r: int = 16, alpha: float = 16, dropout: float = 0.0,
                    quant: Optional[str] = "nf4", blocksize: int = 64, double_quant: bool = True,
                    rslora: bool = False, init: str = "kaiming") -> "LoRALinear":
        """Wrap an `nn.Linear` or a transformers `Conv1D` (its weight stored as `quant`; None means
        "dense") or a bitsandbytes `Linear4bit` / `Linear8bitLt` (its bytes reused as they are;
        `quant` is then ignored)."""
        check_quant(quant)
        if is_bnb_linear(linear):
            weight = from_bnb_module(linear)
        elif isinstance(linear, nn.Linear):
            weight = quantize(linear.weight.detach(), quant or "dense", blocksize, double_quant)
        elif is_conv1d(linear):
            weight = quantize(linear.weight.detach().t().contiguous(), quant or "dense", blocksize, double_quant)
        else:
            raise TypeError("linear must be an nn.Linear, a transformers Conv1D or a bitsandbytes "
                            f"Linear4bit/Linear8bitLt, got {type(linear).__name__}")
        bias = None if linear.bias is None else linear.bias.detach()
        # transformers' bitsandbytes loading turns a Conv1D into a Linear4bit marked source_cls=Conv1D
        from_conv1d = is_conv1d(linear) or getattr(getattr(linear, "source_cls", None), "__name__", "") == "Conv1D"
        return cls(weight, bias, r=r, alpha=alpha, dropout=dropout, rslora=rslora, init=init,
                   fan_in_fan_out=from_conv1d)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def reset_lora_parameters(self, init: str = "kaiming") -> None:
        """Re-initialise the active adapter: B = 0, so the layer starts as its base."""
        _initialise(self.lora_A.weight, self.lora_B.weight, self.r, init)

    @property
    def weight(self) -> FrozenWeight:
        """The frozen weight, a view of this layer's storage parameters (DTensors while FSDP2
        holds them sharded)."""
        return held_weight(self)

    @weight.setter
    def weight(self, weight: FrozenWeight) -> None:
        hold(self, weight)

    @property
    def base_weight(self) -> FrozenWeight:
        """The frozen weight without the adapter (the pre-merge weight while merged)."""
        return self._premerge_weight if self.merged else self.weight

    def __getattr__(self, name: str):
        # torch.distributed.checkpoint (FSDP2's and Accelerate's state dicts) resolves every
        # state-dict key by getattr, so the base weight's keys beside "weight" must resolve too.
        if name in _WEIGHT_KEYS[1:] and "_weight_layout" in self.__dict__:
            state = self.base_weight.state_dict()
            if name in state:
                return state[name]
        return super().__getattr__(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lora_A, lora_B = self.lora_A.weight, self.lora_B.weight
        if self.merged or not self._adapter_enabled:
            # scaling 0 switches the adapter branch off: the base output, whatever A and B hold.
            weight = self.weight if self._adapter_enabled else self.base_weight
            return fused_lora_linear(x, weight, lora_A.detach(), lora_B.detach(), 0.0, self.bias)
        dropout = self.lora_dropout if self.training else 0.0
        return fused_lora_linear(x, self.weight, lora_A, lora_B, self.scaling, self.bias, dropout)

    def delta_weight(self) -> torch.Tensor:
        """scaling·B·A, the (N, K) fp32 update the adapter adds to W."""
        return self.scaling * (self.lora_B.weight.detach().float() @ self.lora_A.weight.detach().float())

    def merge(self) -> None:
        """Fold the adapter into the frozen weight; `unmerge` restores the original exactly.

        A quantized base is dequantized, updated and re-quantized in its own format, which adds
        that format's rounding error. The original weight is kept until `unmerge`, and it is what
        `state_dict()` saves meanwhile (with the adapter), so a checkpoint never holds both.
        """
        if self.merged:
            warnings.warn("LoRALinear.merge(): already merged; nothing to do", stacklevel=2)
            return
        check_replaceable(self)
        base = self.weight
        merged = base.dequantize(torch.float32) + self.delta_weight()
        if base.fmt != "dense":
            warnings.warn(f"merging into a {base.describe()} weight re-quantizes it, which adds {base.fmt} rounding "
                          "error to the merged weight; unmerge() restores the original exactly", stacklevel=2)
        self.weight = base.requantize(merged.to(base.dtype))
        self._premerge_weight = base
        self.merged = True

    def unmerge(self) -> None:
        """Undo `merge`, restoring the frozen weight bit for bit."""
        if not self.merged:
            warnings.warn("LoRALinear.unmerge(): not merged; nothing to do", stacklevel=2)
            return
        self.weight = self._premerge_weight.to(self.weight.device)
        self._premerge_weight = None
        self.merged = False

    def to_linear(self) -> nn.Module:
        """A plain frozen `nn.Linear` holding the dense merged weight (base + adapter); a
        transformers `Conv1D` (weight (K, N)) for a layer made from one."""
        base = self.base_weight
        dtype = base.dtype
        merged = (base.dequantize(torch.float32) + self.delta_weight()).to(dtype)
        if self.fan_in_fan_out:
            from transformers.pytorch_utils import Conv1D

            linear = Conv1D(self.out_features, self.in_features).to(device=base.device, dtype=dtype)
            merged = merged.t()
        else:
            linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                               device=base.device, dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(merged)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
            elif self.fan_in_fan_out:
                linear.bias.zero_()
        return linear.requires_grad_(False)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Within the block the layer computes its base output only."""
        previous = self._adapter_enabled
        self._adapter_enabled = False
        try:
            yield self
        finally:
            self._adapter_enabled = previous

    def _apply(self, fn, recurse=True):
        # A packed format's storage keeps its dtype whatever `fn` does (`module.type(dtype)`
        # casts integer tensors too); the pre-merge weight is a plain object, moved here.
        if not self._weight_layout.follows_dtype_casts:
            fn = device_moves_only(fn, only={id(getattr(self, name)) for name in storage_names(self)})
        held = not is_managed_elsewhere(self)
        super()._apply(fn, recurse)
        if held:
            record_held(self)
        if self._premerge_weight is not None:
            self._premerge_weight = self._premerge_weight.apply_module_fn(fn)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # While merged the adapter is saved beside the base weight it was merged into: saving
        # the merged weight would apply the adapter twice once loaded.
        # The storage parameters are saved under bitsandbytes' key names instead of their own.
        for key, tensor in self.base_weight.state_dict().items():
            conv1d_layout = self.fan_in_fan_out and key == "weight" and self.base_weight.fmt == "dense"
            destination[prefix + key] = tensor.t().contiguous() if conv1d_layout else tensor  # a Conv1D's (K, N)
        own = {}
        super()._save_to_state_dict(own, prefix, keep_vars)
        storage = {prefix + name for name in storage_names(self)}
        destination.update((key, value) for key, value in own.items() if key not in storage)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        storage = {prefix + name for name in storage_names(self)}
        missing_keys[:] = [key for key in missing_keys if key not in storage]
        own = {key[len(prefix):]: value for key, value in state_dict.items()
               if key.startswith(prefix) and _is_weight_key(key[len(prefix):])}
        consumed = set()
        if not own and is_managed_elsewhere(self) and storage & set(state_dict):
            # torch's broadcast_from_rank0 load keeps a module's own parameter names only
            error_msgs.append(f"{prefix}weight: the state dict holds this sharded layer's storage parameters but not "
                              "its weight under bitsandbytes' names; load a full state dict on every rank "
                              "(StateDictOptions(full_state_dict=True) without broadcast_from_rank0) or use "
                              "torch.distributed.checkpoint")
        elif not own:
            missing_keys.append(prefix + "weight")
        else:
            try:
                loaded = FrozenWeight.from_state_dict(own)
            except ValueError as err:
                error_msgs.append(f"{prefix}weight: {err}")
            else:
                consumed = {prefix + key for key in loaded.state_dict() if key in own}
                if self.fan_in_fan_out and loaded.fmt == "dense":  # saved in a Conv1D's own (K, N) layout
                    loaded = quantize(loaded.dequantize().t().contiguous(), "dense")
                if loaded.shape != self.weight.shape:
                    error_msgs.append(f"{prefix}weight: shape {tuple(loaded.shape)} in the checkpoint, "
                                      f"{tuple(self.weight.shape)} in the model")
                elif is_managed_elsewhere(self):
                    problem = load_shards(self, loaded)
                    if problem:
                        error_msgs.append(f"{prefix}weight: {problem}")
                else:
                    self._take_loaded_weight(loaded, assign=local_metadata.get("assign_to_params_buffers", False))
        unexpected_keys[:] = [key for key in unexpected_keys if key not in consumed]

    def _take_loaded_weight(self, loaded: FrozenWeight, assign: bool) -> None:
        """Install a checkpoint's frozen weight. Packed data is taken as it is (no
        re-quantization); a float weight loaded into a quantized layer is quantized into the
        layer's format, as bitsandbytes' layers do; a float weight into a dense layer keeps the
        layer's dtype, as `nn.Linear` does. The tensors are copied unless `assign=True`."""
        current = self.base_weight
        if not assign and current.device.type != "meta":
            loaded = loaded.clone(current.device)
        if loaded.fmt == "dense" and current.fmt != "dense":
            loaded = current.requantize(loaded.dequantize(current.dtype))
        elif loaded.fmt == "dense" and not assign:
            loaded = loaded.apply_module_fn(lambda t: t.to(current.dtype))
        elif not loaded.records_dtype:
            loaded.dtype = current.dtype
        self.weight = loaded
        self._premerge_weight = None
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.lora_alpha}, scaling={self.scaling:g}, dropout={self.lora_dropout}, "
                f"weight={self.weight.describe()}, bias={self.bias is not None}{', merged' if self.merged else ''}")
