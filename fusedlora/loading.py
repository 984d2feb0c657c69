"""Loading a quantized checkpoint into a model built without memory: each rank reads only the
rows of its own shards (docs/design.md §10; the idea of Answer.AI's FSDP-QLoRA loader).

    with fusedlora.meta_parameters():
        model = transformers.AutoModelForCausalLM.from_config(config)
    fusedlora.apply_lora(model, "all-linear", quant="nf4")      # layouts only: nothing quantized
    for block in model.model.layers:
        fully_shard(block)
    fully_shard(model)
    fusedlora.load_checkpoint_shards(model, "checkpoint/", device="cuda")

The checkpoint is safetensors with the model's state-dict keys: one fusedlora saved
(`model.state_dict()`, bitsandbytes' key names for the frozen weights) or a Hugging Face
bitsandbytes checkpoint of the same formats.
"""

import contextlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Union

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from .module import LoRALinear
from .storage import local_part, local_tensor, shard_slices

Tensor = torch.Tensor
_QUANT_STATE = ".weight.quant_state.bitsandbytes__"


@contextlib.contextmanager
def meta_parameters():
    """Within the block, modules register their parameters on the meta device (no memory, no
    initialisation cost); buffers stay real, so computed ones such as rotary frequencies keep
    their values (as accelerate's `init_empty_weights(include_buffers=False)`)."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, parameter):
        register(module, name, parameter)
        if parameter is not None and parameter.device.type != "meta":
            module._parameters[name] = nn.Parameter(parameter.to("meta"), requires_grad=parameter.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def checkpoint_files(path: Union[str, os.PathLike]) -> list[Path]:
    """The safetensors files of `path`: one file, or every `*.safetensors` in a folder."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files or not all(f.is_file() and f.suffix == ".safetensors" for f in files):
        raise FileNotFoundError(f"path must be a .safetensors file or a folder holding some, got {str(path)!r}")
    return files


_SAFETENSORS_DTYPES = {"U8": torch.uint8, "I8": torch.int8, "F32": torch.float32, "F16": torch.float16,
                       "BF16": torch.bfloat16, "F8_E4M3": torch.float8_e4m3fn, "I32": torch.int32, "I64": torch.int64,
                       "F64": torch.float64, "BOOL": torch.bool}


class _SafetensorsReader:
    """Reads byte ranges of a safetensors file's tensors with plain reads, not a memory map, so
    that only what a rank reads is ever resident. The format: an 8-byte little-endian header
    length, a JSON header {name: {dtype, shape, data_offsets}}, then the data."""

    def __init__(self, path: Path):
        self.path = path
        self.file = open(path, "rb")
        try:
            length = int.from_bytes(self.file.read(8), "little")
            self.entries = json.loads(self.file.read(length))
            self.entries.pop("__metadata__", None)
        except (ValueError, UnicodeDecodeError, AttributeError) as err:
            self.file.close()
            raise ValueError(f"{path} is not a safetensors file ({err})") from None
        self.data_start = 8 + length

    def close(self) -> None:
        self.file.close()

    def describes(self, key: str, target: Tensor) -> bool:
        """Whether `key` is stored with `target`'s dtype and (whole) shape."""
        entry = self.entries[key]
        return list(entry["shape"]) == list(target.shape) and _SAFETENSORS_DTYPES.get(entry["dtype"]) == target.dtype

    def read_into(self, key: str, out: Tensor, first_row: int = 0) -> None:
        """Fill `out` with the bytes of `key` from row `first_row` on (all of them for a 0-dim one)."""
        begin, end = self.entries[key]["data_offsets"]
        shape = self.entries[key]["shape"]
        row_bytes = (end - begin) // shape[0] if shape and shape[0] else 0
        size = out.numel() * out.element_size()
        if size == 0:
            return
        if begin + first_row * row_bytes + size > end:
            raise ValueError(f"{self.path}: key {key!r} is shorter than the model's tensor")
        buffer = out if out.device.type == "cpu" and out.is_contiguous() else torch.empty(out.shape, dtype=out.dtype)
        self.file.seek(self.data_start + begin + first_row * row_bytes)
        if self.file.readinto(buffer.view(-1).view(torch.uint8).numpy()) != size:
            raise ValueError(f"{self.path}: key {key!r} is truncated")
        if buffer is not out:
            out.copy_(buffer)

    def read_whole(self, key: str) -> Tensor:
        """Tensor `key` as uint8 bytes."""
        begin, end = self.entries[key]["data_offsets"]
        whole = torch.empty(end - begin, dtype=torch.uint8)
        self.read_into(key, whole)
        return whole


def _read_part(reader: _SafetensorsReader, key: str, target: Tensor) -> None:
    """Copy into `target` (a DTensor or a whole tensor) the part of checkpoint tensor `key` it
    holds here, reading only that part when the checkpoint stores `key` in the target's dtype
    and shape and the shard is a run of whole rows (FSDP2's dim-0 shards). A float tensor
    stored in another float dtype is cast; packed bytes stored in another dtype (bitsandbytes'
    `quant_storage`) are taken as bytes."""
    local = local_tensor(target)
    if reader.describes(key, target):
        if not isinstance(target, DTensor):
            return reader.read_into(key, local)
        slices = shard_slices(target)
        if all(piece == slice(0, size) for piece, size in zip(slices[1:], target.shape[1:])):
            return reader.read_into(key, local, first_row=slices[0].start)
    entry = reader.entries[key]
    whole = reader.read_whole(key).view(_SAFETENSORS_DTYPES[entry["dtype"]]).view(entry["shape"])
    whole = whole.view(torch.uint8) if target.dtype == torch.uint8 else whole.to(target.dtype)
    local.copy_(local_part(whole, target))


def _check_entry(reader: _SafetensorsReader, key: str, target: Tensor) -> None:
    """Refuse checkpoint tensor `key` unless `_read_part` can fill `target` from it: the same
    number of elements (floats of another dtype are cast), or bytes for packed uint8 storage."""
    entry = reader.entries[key]
    dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
    begin, end = entry["data_offsets"]
    numel = math.prod(entry["shape"])
    fits = dtype is not None and end - begin == numel * dtype.itemsize and (
        reader.describes(key, target)
        or (target.dtype == torch.uint8 and end - begin == target.numel())
        or (dtype.is_floating_point and target.dtype.is_floating_point and numel == target.numel()))
    if not fits:
        raise ValueError(f"checkpoint key {key!r} is {entry['dtype']} {tuple(entry['shape'])}; the model holds "
                         f"{target.dtype} {tuple(target.shape)}")


def _aliases(targets: dict) -> dict:
    """Each key of `targets` with the keys naming the same tensor (tied embeddings)."""
    by_storage: dict = {}
    for key, tensor in targets.items():
        local = local_tensor(tensor)
        identity = (local.data_ptr(), local.dtype, tuple(local.shape)) if local.numel() else key
        by_storage.setdefault(identity, []).append(key)
    return {key: group for group in by_storage.values() for key in group}


def _materialize(model: nn.Module, device: torch.device) -> None:
    """Give every meta parameter and buffer uninitialised storage on `device` (only a shard's for
    FSDP2's sharded parameters), keeping tied parameters tied (a meta parameter is replaced by
    a new object, each place it is held separately)."""
    places: dict = {}
    for module in model.modules():
        for name, parameter in module._parameters.items():
            if parameter is not None:
                places.setdefault(id(parameter), []).append((module, name))
    model._apply(lambda t: torch.empty_like(t, device=device) if t.is_meta else t)
    for (first, first_name), *others in (group for group in places.values() if len(group) > 1):
        for module, name in others:
            module._parameters[name] = first._parameters[first_name]


@torch.no_grad()
def load_checkpoint_shards(model: nn.Module, path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu",
                           strict: bool = True) -> list[str]:
    """Fill `model` (parameters on the meta device, possibly `fully_shard`-ed) from the safetensors
    checkpoint at `path`, reading only the rows of this rank's shards. Adapters the checkpoint
    does not hold are initialised as new ones (B = 0), drawn whole, so seed every rank alike
    (`torch.manual_seed`); each rank keeps its rows. Tied tensors (embeddings) are found under
    either name. Returns the model keys the checkpoint
    lacks (an error when `strict` and a key other than an adapter's is missing).

    Each 4-bit layer's quant state in the checkpoint is checked against the layer's layout
    (format, shape, blocksize, nesting), as `load_state_dict` checks it.
    """
    files = checkpoint_files(path)
    device = torch.device(device)
    _materialize(model, device)
    targets = model.state_dict()
    layers = {name: layer for name, layer in model.named_modules() if isinstance(layer, LoRALinear)}
    readers = [_SafetensorsReader(file) for file in files]
    try:
        # every layout check before any read, so a mismatched checkpoint fills nothing
        stored = {}
        for reader in readers:
            for key in reader.entries:
                if key in stored:
                    raise ValueError(f"checkpoint key {key!r} is in both {stored[key].path} and {reader.path}")
                if key in targets:
                    stored[key] = reader
        states = {key: reader for key, reader in stored.items() if _QUANT_STATE in key}
        for key, reader in states.items():
            _check_quant_state(layers[key.split(_QUANT_STATE)[0]], key, reader.read_whole(key))
        tensors = {key: reader for key, reader in stored.items() if key not in states}
        for key, reader in tensors.items():
            _check_entry(reader, key, targets[key])
        for key, reader in tensors.items():
            _read_part(reader, key, targets[key])
    finally:
        for reader in readers:
            reader.close()
    aliases = _aliases(targets)
    missing = [key for key in targets if not any(alias in stored for alias in aliases[key])]
    adapters = {}  # layer name -> its missing adapter keys, in the model's order (the same on every rank)
    for key in missing:
        if ".lora_" in key:
            adapters.setdefault(key.rsplit(".lora_", 1)[0], []).append(key)
    for name, keys in adapters.items():
        if len(keys) == 2:  # a new adapter; one factor alone is an incomplete checkpoint
            layers[name].reset_lora_parameters()
    others = [key for key in missing if ".lora_" not in key or len(adapters[key.rsplit(".lora_", 1)[0]]) < 2]
    if strict and others:
        raise KeyError(f"the checkpoint at {str(path)!r} lacks {len(others)} of the model's keys: {others[:8]}"
                       f"{' ...' if len(others) > 8 else ''}")
    return missing


def _check_quant_state(layer: LoRALinear, key: str, stored: Tensor) -> None:
    """Refuse a checkpoint's 4-bit quant state that does not match `layer`'s layout; take its
    nested offset (a scalar the layer holds whole)."""
    state = json.loads(bytes(stored.tolist()).decode())
    layout = layer._weight_layout
    expected = {"quant_type": layout.fmt, "blocksize": layout.blocksize, "shape": list(layout.shape)}
    if {name: state.get(name) for name in expected} != expected or ("nested_offset" in state) != layout.nested:
        raise ValueError(f"checkpoint key {key!r} describes {state}; the model's layer is {layout.describe()} "
                         f"of shape {tuple(layout.shape)}")
    if layout.nested:
        layer.frozen_nested_offset.view(torch.float32).fill_(float(state["nested_offset"]))


LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_INDEX = "model.safetensors.index.json"


def quantize_checkpoint(source: Union[str, os.PathLike], destination: Union[str, os.PathLike], quant: str = "nf4",
                        targets: tuple[str, ...] = LLAMA_PROJECTIONS, blocksize: int = 64,
                        double_quant: bool = True) -> int:
    """Write the checkpoint folder `source` (e.g. a Hugging Face model's: safetensors files, an
    optional index, config and tokenizer files) to the new folder `destination` with the 2-D
    weights of the layers whose names end in one of `targets` stored as `quant`, under
    bitsandbytes' key names, so that `load_checkpoint_shards` reads each rank's rows of it. One
    source file is in memory at a time. Returns the number of weights quantized."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from .checks import check_quant
    from .formats import quantize

    check_quant(quant)
    source, destination = Path(source), Path(destination)
    if not source.is_dir():
        raise FileNotFoundError(f"source must be a checkpoint folder, got {str(source)!r}")
    if destination.exists():
        raise FileExistsError(f"destination must not exist yet (nothing is overwritten), got {str(destination)!r}")
    files = checkpoint_files(source)
    destination.mkdir(parents=True)
    renamed, count = {}, 0
    for file in files:
        written = {}
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            metadata = handle.metadata()
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                module = key.removesuffix(".weight")
                if key.endswith(".weight") and module.rsplit(".", 1)[-1] in targets and tensor.dim() == 2:
                    weight = quantize(tensor, quant or "dense", blocksize, double_quant)
                    parts = {f"{module}.{name}": value.contiguous() for name, value in weight.state_dict().items()}
                    count += 1
                else:
                    parts = {key: tensor}
                written.update(parts)
                renamed.update((name, file.name) for name in parts)
        save_file(written, str(destination / file.name), metadata=metadata)
    for other in source.iterdir():
        if other.is_file() and other.suffix != ".safetensors" and other.name != _INDEX:
            shutil.copy2(other, destination / other.name)
    if (source / _INDEX).is_file():
        index = json.loads((source / _INDEX).read_text())
        index["weight_map"] = renamed
        (destination / _INDEX).write_text(json.dumps(index, indent=2))
    return count
