"""A layer's frozen weight held as the layer's own parameters, so that FSDP2 shards it
(docs/design.md §10).

Each storage tensor of the `FrozenWeight` with at least one dimension is a frozen
`nn.Parameter` named `frozen_<field>`; a 0-dim one (the nested offset) is a buffer. In a packed
format a tensor of a floating dtype (fp32 scales, fp8 codes) is held as its bytes, uint8 of shape
(rows, bytes per row): FSDP2's `MixedPrecisionPolicy` and `model.to(dtype)` cast floating
tensors only, so neither can touch it, and a shard along dim 0 holds whole elements. A dense
weight is held as it is and follows casts, as `nn.Linear`'s does.

Under `fully_shard` the parameters are DTensors sharded on dim 0 between forwards; FSDP2
all-gathers them (packed) before the layer computes and frees them after. `held_weight` views
them back in their own dtypes and shapes: plain tensors inside forward, DTensors outside, so the
layer's state dict holds shards under bitsandbytes' key names and `get_model_state_dict`
gathers exactly the bytes a single process holds.
"""

from typing import Optional

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from .formats import FrozenWeight

Tensor = torch.Tensor
STORAGE_PREFIX = "frozen_"


def _keeps_dtype(weight: FrozenWeight, tensor: Tensor) -> bool:
    return weight.follows_dtype_casts or not tensor.is_floating_point()


def stored_form(weight: FrozenWeight, tensor: Tensor) -> Tensor:
    """`tensor` as the layer holds it: itself, or its bytes as (rows, bytes per row) uint8."""
    if _keeps_dtype(weight, tensor):
        return tensor
    rows = tensor.shape[0] if tensor.dim() else 1
    return tensor.contiguous().view(rows, -1).view(torch.uint8)


def _natural_local(stored: Tensor, like: Tensor) -> Tensor:
    if like.dim() == 0:
        return stored.view(like.dtype).view(())
    return stored.view(like.dtype).view((stored.shape[0],) + tuple(like.shape[1:]))


def natural_form(stored: Tensor, like: Tensor) -> Tensor:
    """`stored` (a plain tensor or a dim-0-sharded DTensor) viewed with `like`'s dtype and shape;
    no copy."""
    if not isinstance(stored, DTensor):
        return _natural_local(stored, like)
    if any(not placement.is_shard(0) and not placement.is_replicate() for placement in stored.placements):
        raise NotImplementedError(f"frozen weights shard on dim 0 only (rows), got placements {stored.placements}")
    local = _natural_local(stored.to_local(), like)
    contiguous = torch.empty(like.shape, device="meta").stride()
    return DTensor.from_local(local, stored.device_mesh, stored.placements, run_check=False,
                              shape=like.shape, stride=contiguous)


def storage_names(module: nn.Module) -> list[str]:
    """The names of `module`'s storage parameters and buffers."""
    return [name for name in (*module._parameters, *module._buffers) if name.startswith(STORAGE_PREFIX)]


def hold(module: nn.Module, weight: FrozenWeight) -> None:
    """Register `weight`'s tensors on `module` (replacing what it held) and keep its layout."""
    check_replaceable(module)
    for name in storage_names(module):
        delattr(module, name)
    for field, tensor in zip(weight.tensor_fields, weight.tensors()):
        stored = stored_form(weight, tensor)
        if tensor.dim() == 0:
            module.register_buffer(STORAGE_PREFIX + field, stored, persistent=False)
        else:
            module.register_parameter(STORAGE_PREFIX + field, nn.Parameter(stored, requires_grad=False))
    module._weight_layout = weight.with_tensors([t.to("meta") for t in weight.tensors()])
    record_held(module)


def record_held(module: nn.Module) -> None:
    """Note `module`'s storage parameters as its own (see `is_managed_elsewhere`): after `hold`,
    and after a device move or cast that made new ones (`.to("meta")` does)."""
    module._held_parameters = {name: module._parameters[name] for name in storage_names(module)
                               if name in module._parameters}


def held_weight(module: nn.Module) -> FrozenWeight:
    """The `FrozenWeight` whose tensors are views of `module`'s storage (DTensors while sharded).

    Kept until a storage tensor is replaced or given other data (`param.data = ...`, FSDP2
    swapping sharded and gathered parameters): building it costs ~15 us, every forward reads it.
    """
    layout = module._weight_layout
    stored = [module._parameters.get(STORAGE_PREFIX + field, module._buffers.get(STORAGE_PREFIX + field))
              for field in layout.tensor_fields]
    if torch.compiler.is_compiling() or any(isinstance(t, DTensor) for t in stored):
        return _viewed(layout, stored)  # traced once, or sharded (between forwards): not cached
    key = [(t, t.data_ptr()) for t in stored]
    cached = module.__dict__.get("_held_weight")
    if cached is not None and all(a is b and p == q for (a, p), (b, q) in zip(cached[0], key, strict=True)):
        return cached[1]
    weight = _viewed(layout, stored)
    module.__dict__["_held_weight"] = (key, weight)
    return weight


def _viewed(layout: FrozenWeight, stored: list[Tensor]) -> FrozenWeight:
    return layout.with_tensors([t if _keeps_dtype(layout, like) else natural_form(t, like)
                                for t, like in zip(stored, layout.tensors())])


def check_replaceable(module: nn.Module) -> None:
    """Refuse to replace `module`'s frozen weight while FSDP manages its storage."""
    if is_managed_elsewhere(module):
        raise RuntimeError(f"{type(module).__name__}: its frozen weight is managed by FSDP (sharded or gathered); "
                           "replace or merge it before fully_shard, or load it through the model's state dict")


def is_managed_elsewhere(module: nn.Module) -> bool:
    """Whether `module`'s storage parameters are no longer those `hold` registered: FSDP2 put its
    sharded or its gathered ones in their place."""
    held = module.__dict__.get("_held_parameters", {})
    return any(module._parameters.get(name) is not parameter for name, parameter in held.items())


def is_sharded(module: nn.Module) -> bool:
    """Whether `module`'s storage parameters are DTensors (FSDP2 between forwards)."""
    return any(isinstance(p, DTensor) for name, p in module._parameters.items() if name.startswith(STORAGE_PREFIX))


def shard_slices(target: DTensor) -> tuple[slice, ...]:
    """Where `target`'s local shard lies in the whole tensor, one slice per dimension."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(target.shape, target.device_mesh, target.placements)
    return tuple(slice(start, start + size) for size, start in zip(shape, offset))


def local_tensor(tensor: Tensor) -> Tensor:
    """What this rank holds of `tensor`: its local shard for a DTensor, itself otherwise."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def local_part(whole: Tensor, target: Tensor) -> Tensor:
    """The part of the whole tensor `whole` (shaped as `target`) that `target` holds here: its
    shard for a DTensor, all of it otherwise."""
    whole = whole.reshape(target.shape)
    return whole[shard_slices(target)] if isinstance(target, DTensor) else whole


def load_shards(module: nn.Module, loaded: FrozenWeight) -> Optional[str]:
    """Copy `loaded` (full tensors or DTensors) into `module`'s sharded storage in place.

    Returns an error message when `loaded` is laid out differently (format, shape, blocksize,
    nesting), which a sharded layer cannot take; None on success.
    """
    current = held_weight(module)
    if any(local_tensor(t).is_meta for t in current.tensors()):
        return ("the sharded layer is on the meta device; allocate it first (model.to_empty(device=...)) or "
                "fill it with fusedlora.load_checkpoint_shards")
    if loaded.describe() != current.describe() or loaded.shape != current.shape:
        return (f"the checkpoint holds {loaded.describe()} {tuple(loaded.shape)} and the sharded layer "
                f"{current.describe()} {tuple(current.shape)}; a sharded layer keeps its format")
    with torch.no_grad():
        for source, target in zip(loaded.tensors(), current.tensors()):
            if not isinstance(target, DTensor):
                target.copy_(source.reshape(target.shape))
                continue
            if isinstance(source, DTensor):
                rows = source.reshape(target.shape).redistribute(target.device_mesh, target.placements).to_local()
            else:
                rows = local_part(source.to(target.device), target)
            if rows.data_ptr() != target.to_local().data_ptr():
                target.to_local().copy_(rows)
    return None
