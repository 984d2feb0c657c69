"""Several named adapters over one frozen base, as PEFT's: add, switch, disable, delete.

Every LoRALinear of the model holds every adapter; `set_adapter` swaps the named one's factors
into each layer's lora_A / lora_B (no copy, no re-quantization: the frozen weight is shared).
`save_adapter` / `load_adapter` take an adapter name and write PEFT's multi-adapter folder
layout ("default" at the top, any other adapter in a subfolder of its name).
"""

import contextlib
from typing import Optional

import torch.nn as nn

from .model import fully_trained_modules, lora_layers, pattern_value
from .storage import is_managed_elsewhere


def _layers(model: nn.Module) -> dict:
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRALinear layers (see fusedlora.apply_lora)")
    return layers


def adapter_names(model: nn.Module) -> list[str]:
    """The model's adapter names, the active one first."""
    return next(iter(_layers(model).values())).adapter_names


def active_adapter(model: nn.Module) -> str:
    """The name of the adapter the model computes with."""
    return next(iter(_layers(model).values())).active_adapter


def add_adapter(model: nn.Module, name: str, r: int = 16, alpha: float = 16, dropout: float = 0.0,
                rslora: bool = False, init: str = "kaiming", rank_pattern: Optional[dict] = None,
                alpha_pattern: Optional[dict] = None) -> nn.Module:
    """Give every LoRALinear of `model` a new inactive adapter `name` (B = 0); r / alpha per layer
    by PEFT's patterns as in `apply_lora`. All layers get it or, on an error, none."""
    layers = _layers(model)
    if name in adapter_names(model):
        raise ValueError(f"adapter {name!r} exists already (adapters: {adapter_names(model)})")
    if fully_trained_modules(model):
        raise ValueError(f"add_adapter({name!r}): the model trains {sorted(fully_trained_modules(model))} whole "
                         "(modules_to_save), which every named adapter would share; fusedlora keeps one adapter "
                         "on such models")
    if any(is_managed_elsewhere(layer) for layer in layers.values()):
        raise RuntimeError(f"add_adapter({name!r}): the model is sharded by FSDP; add adapters before fully_shard")
    try:
        for layer_name, layer in layers.items():
            layer.add_adapter(name, pattern_value(rank_pattern, layer_name, r),
                              pattern_value(alpha_pattern, layer_name, alpha), dropout, rslora, init)
    except BaseException:
        for layer in layers.values():
            if name in layer.inactive_adapters:
                layer.delete_adapter(name)
        raise
    return model


def set_adapter(model: nn.Module, name: str) -> nn.Module:
    """Compute with adapter `name` from now on; its factors train, the other adapters' do not
    (as PEFT's set_adapter). Build the optimizer over the active factors after switching, and
    switch before wrapping the model in DDP (which registers the parameters it reduces)."""
    layers = _layers(model)
    for layer_name, layer in layers.items():  # every layer checked before any switches
        if name not in layer.adapter_names:
            raise KeyError(f"no adapter {name!r} in {layer_name} (its adapters: {layer.adapter_names})")
        if layer.merged and name != layer.active_adapter:
            raise RuntimeError(f"set_adapter({name!r}): {layer_name} is merged; unmerge it first")
    for layer in layers.values():
        layer.set_adapter(name)
        for factor in (layer.lora_A, layer.lora_B):
            factor.weight.requires_grad_(True)
        for adapter in layer.inactive_adapters.values():
            adapter.requires_grad_(False)
    return model


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove the inactive adapter `name` from every layer."""
    if name == active_adapter(model):
        raise ValueError(f"adapter {name!r} is the active one; set another adapter before deleting it")
    if name not in adapter_names(model):
        raise KeyError(f"no adapter {name!r} (adapters: {adapter_names(model)})")
    for layer in _layers(model).values():
        layer.delete_adapter(name)
    return model


@contextlib.contextmanager
def disable_adapter(model: nn.Module):
    """Within the block every LoRALinear computes its base output only."""
    with contextlib.ExitStack() as stack:
        for layer in _layers(model).values():
            stack.enter_context(layer.disable_adapter())
        yield model


@contextlib.contextmanager
def using_adapter(model: nn.Module, name: str):
    """Within the block the model computes with adapter `name`; after it, the adapter active
    before, with every factor's requires_grad as it was."""
    previous = active_adapter(model)
    flags = {parameter: parameter.requires_grad for layer in _layers(model).values() for parameter in layer.parameters()}
    set_adapter(model, name)
    try:
        yield model
    finally:
        set_adapter(model, previous)
        for parameter, flag in flags.items():
            parameter.requires_grad_(flag)
