"""Training checkpoints to resume from: the adapters, the optimizer's state and the step, in one
safetensors file. Tensors go into the file, everything else (step, param groups, scalar state,
the adapter config, `extra`) into its metadata as JSON: nothing is unpickled. The file is written
beside its final name, flushed to disk and renamed over it, so an interrupted save leaves the
previous checkpoint intact; checksums saved with it catch later corruption (`fusedlora.safefiles`).
"""

import json
from pathlib import Path
from typing import Optional

import torch

from .adapters import adapter_config, check_fit, is_writer
from .model import adapter_shapes, adapter_state_dict, load_adapter_tensors
from .named_adapters import active_adapter
from .safefiles import AdapterFileError, read_safetensors, write_safetensors

_META_KEY = "fusedlora_training_state"


def save_training_state(path, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                        step: int = 0, extra: Optional[dict] = None) -> None:
    """Write the model's active adapter (and the modules it trains whole), its name, the
    optimizer's state and `step` to the file `path`. Without
    sharding (single process, DDP) rank 0 writes; FSDP2-sharded optimizer state is not gathered,
    so with FSDP2 use torch.distributed.checkpoint for the optimizer."""
    tensors = {f"adapter.{key}": value.cpu().contiguous() for key, value in adapter_state_dict(model).items()}
    meta = {"step": int(step), "extra": extra or {}, "adapter": adapter_config(model), "optimizer": None,
            "adapter_name": active_adapter(model)}
    if optimizer is not None:
        state = optimizer.state_dict()
        scalars = {}
        for index, values in state["state"].items():
            for key, value in values.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars[f"{index}.{key}"] = value
        meta["optimizer"] = {"param_groups": state["param_groups"], "scalars": scalars}
    try:
        metadata = json.dumps(meta)
    except TypeError as err:
        raise ValueError(f"the training state holds a value JSON cannot store ({err}); pass plain numbers and strings "
                         "in `extra`") from err
    if not is_writer():
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(tensors, path, metadata={_META_KEY: metadata})


def load_training_state(path, model: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> dict:
    """Restore what `save_training_state` wrote into `model` (and `optimizer`); return
    {"step": ..., "extra": ...}. Checked before anything is assigned: on error, nothing changes."""
    path = Path(path)
    tensors, metadata = read_safetensors(path, require_digests=True)
    if _META_KEY not in metadata:
        raise AdapterFileError(f"{path}: not a fusedlora training state (no {_META_KEY!r} metadata)")
    try:
        meta = json.loads(metadata[_META_KEY])
    except json.JSONDecodeError as err:
        raise AdapterFileError(f"{path}: its {_META_KEY!r} metadata is damaged ({err})") from err
    if meta.get("adapter_name", "default") != active_adapter(model):
        raise AdapterFileError(f"{path}: holds adapter {meta['adapter_name']!r}, and the model computes with "
                               f"{active_adapter(model)!r}; call fusedlora.set_adapter(model, "
                               f"{meta['adapter_name']!r}) first")
    adapters = {key.removeprefix("adapter."): value for key, value in tensors.items() if key.startswith("adapter.")}
    check_fit(path, adapters, adapter_shapes(model))
    optimizer_state = None
    if optimizer is not None:
        if meta.get("optimizer") is None:
            raise AdapterFileError(f"{path}: holds no optimizer state")
        optimizer_state = {"state": {}, "param_groups": meta["optimizer"]["param_groups"]}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                index, name = key.removeprefix("optimizer.").split(".", 1)
                optimizer_state["state"].setdefault(int(index), {})[name] = value
        for key, value in meta["optimizer"]["scalars"].items():
            index, name = key.split(".", 1)
            optimizer_state["state"].setdefault(int(index), {})[name] = value
    if optimizer_state is not None:  # first: torch checks the state fits before it changes the optimizer
        try:
            optimizer.load_state_dict(optimizer_state)
        except (ValueError, KeyError, TypeError) as err:
            raise AdapterFileError(f"{path}: its optimizer state does not fit this optimizer ({err})") from err
    load_adapter_tensors(model, adapters)
    return {"step": meta["step"], "extra": meta["extra"]}
