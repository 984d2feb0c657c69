"""Adapter files in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`, keys
`base_model.model.<module>.lora_A.weight` / `.lora_B.weight`. PEFT loads what `save_adapter`
writes, and `load_adapter` loads what PEFT saves. safetensors only: nothing is unpickled. A load
checks every key, shape and dtype before it touches the model; a save is atomic (a folder written
beside the target, then swapped in), so an interrupted save leaves the previous adapter intact,
and checksums saved with the tensors catch a file corrupted since (see `fusedlora.safefiles`).
"""

import contextlib
import json
import logging
import math
import os
import re
import shutil
import warnings
from collections import Counter
from pathlib import Path
from typing import Optional

import torch
from .checks import check_probability, check_quant
from .formats.fourbit import check_blocksize
from .model import (adapter_state_dict, apply_lora, fully_trained_modules, load_adapter_tensors, lora_layers,
                    pattern_value, replace_submodule, resolve_modules_to_save, select_targets, task_of, train_whole)
from .module import linear_features
from .named_adapters import add_adapter, adapter_names, delete_adapter, using_adapter
from .safefiles import AdapterFileError, fsync_file, partial_name, read_safetensors, write_safetensors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# The frozen weights' formats the adapter was trained over, per layer, in the safetensors metadata
# (PEFT ignores it): JSON {layer name: {"quant": format, "blocksize": int, "double_quant": bool}}.
BASE_FORMAT_KEY = "fusedlora_base_formats"
log = logging.getLogger("fusedlora")
_UNSUPPORTED = {  # PEFT options this package does not implement: refused, never silently ignored
    "use_dora": False, "layers_to_transform": None,
    "layer_replication": None, "lora_bias": False, "trainable_token_indices": None,
}
_WITH_PEFT = "load it with PEFT (peft.PeftModel.from_pretrained)"
# What a user can do about each refused option (the README's compatibility table lists them).
REFUSAL_HINTS = {
    "use_dora": f"DoRA's magnitude vectors are not implemented: {_WITH_PEFT}, or train with use_dora=False",
    "layers_to_transform": "name the layers in target_modules instead (the adapter file holds only those)",
    "layer_replication": f"replicated layers are not supported: {_WITH_PEFT}",
    "lora_bias": f"trainable LoRA biases are not supported: {_WITH_PEFT}, or train with lora_bias=False",
    "trainable_token_indices": f"trainable tokens are not supported: {_WITH_PEFT}",
    "bias": f"trained base biases are not supported: {_WITH_PEFT}, or train with bias='none'",
}


def _most_common(values: list):
    return Counter(values).most_common(1)[0][0]


def adapter_config(model: torch.nn.Module, base_model_name_or_path: Optional[str] = None) -> dict:
    """The PEFT LoraConfig (as a dict) that describes the model's LoRALinear layers."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRALinear layers (see fusedlora.apply_lora)")
    r = _most_common([layer.r for layer in layers.values()])
    alpha = _most_common([layer.lora_alpha for layer in layers.values()])
    rslora = {layer.use_rslora for layer in layers.values()}
    if len(rslora) > 1:
        raise ValueError("layers mix rslora and plain scaling, which one PEFT config cannot describe")
    return {
        "peft_type": "LORA",
        "task_type": _task_type(model),
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": _most_common([layer.lora_dropout for layer in layers.values()]),
        "target_modules": sorted(layers),
        "use_rslora": rslora.pop(),
        "bias": "none",
        "rank_pattern": {name: layer.r for name, layer in layers.items() if layer.r != r},
        "alpha_pattern": {name: layer.lora_alpha for name, layer in layers.items() if layer.lora_alpha != alpha},
        "init_lora_weights": True,
        "fan_in_fan_out": any(layer.fan_in_fan_out for layer in layers.values()),  # Conv1D bases (GPT-2)
        "modules_to_save": sorted(fully_trained_modules(model)) or None,
        "inference_mode": True,
        **_UNSUPPORTED,
    }


def _task_type(model: torch.nn.Module) -> Optional[str]:
    """PEFT's task type, when the model trains its task's head whole (PEFT then expects the head
    in the file); None when the head is adapted or absent."""
    task, heads = task_of(model)
    trained = fully_trained_modules(model)
    return task if any(name.endswith(head) for name in trained for head in heads) else None


def _atomic_folder_swap(path: Path, write) -> None:
    """Write a folder's files with `write(tmp)` beside `path`, then swap it in with renames."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = partial_name(path), partial_name(path, "previous")
    tmp.mkdir()
    try:
        write(tmp)
        for folder, _, names in os.walk(tmp):
            for name in names:
                fsync_file(Path(folder) / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def is_writer() -> bool:
    """Whether this process writes files: always, except ranks other than 0 of a process group."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
        or torch.distributed.get_rank() == 0


def save_adapter(model: torch.nn.Module, path, base_model_name_or_path: Optional[str] = None,
                 adapter_name: Optional[str] = None) -> None:
    """Save the model's adapters in PEFT's format into the folder `path` (atomically): every
    adapter, or only `adapter_name`, in PEFT's multi-adapter layout ("default" in `path`, any
    other in `path/<name>`). Under DDP/FSDP2 call it on every rank (sharded adapters are
    gathered); rank 0 writes."""
    names = adapter_names(model) if adapter_name is None else [adapter_name]
    saved = {}
    for name in names:
        with using_adapter(model, name):
            config = adapter_config(model, base_model_name_or_path)
            tensors = {PEFT_PREFIX + key: value.contiguous().cpu() for key, value in adapter_state_dict(model).items()}
            formats = json.dumps({layer_name: _base_format(layer.base_weight)
                                  for layer_name, layer in lora_layers(model).items()}, sort_keys=True)
        saved["" if name == "default" else name] = (config, tensors, formats)
    if not is_writer():
        return

    def write(folder: Path) -> None:
        if Path(path).is_dir():  # what else the folder holds (other adapters, the user's files) stays
            shutil.copytree(path, folder, dirs_exist_ok=True)
        for subfolder, (config, tensors, formats) in saved.items():
            (folder / subfolder).mkdir(exist_ok=True)
            (folder / subfolder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
            write_safetensors(tensors, folder / subfolder / WEIGHTS_NAME, {BASE_FORMAT_KEY: formats}, atomic=False)

    _atomic_folder_swap(Path(path), write)


def _base_format(weight) -> dict:
    """How `apply_lora` rebuilds a layer's frozen weight: its format and 4-bit layout."""
    four_bit = weight.fmt in ("nf4", "fp4")
    return {"quant": weight.fmt, "blocksize": weight.blocksize if four_bit else 64,
            "double_quant": bool(weight.nested) if four_bit else True}


def _recorded_formats(file: Path, metadata: dict, layers: list) -> Optional[dict]:
    """The formats a fusedlora-saved adapter records for each of `layers`, checked whole (so that
    applying them cannot fail on the record); None for files without a record (PEFT's)."""
    if BASE_FORMAT_KEY not in metadata:
        return None
    try:
        recorded = json.loads(metadata[BASE_FORMAT_KEY])
        if not isinstance(recorded, dict) or not all(isinstance(entry, dict) for entry in recorded.values()):
            raise ValueError("expected an object of objects")
        missing = sorted(set(layers) - set(recorded))
        if missing:
            raise ValueError(f"no format recorded for {missing}")
        for entry in recorded.values():
            if set(entry) != {"quant", "blocksize", "double_quant"} or not isinstance(entry["double_quant"], bool):
                raise ValueError(f"an entry must hold quant, blocksize and a bool double_quant, got {entry}")
            check_quant(entry["quant"])
            check_blocksize(entry["blocksize"])
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise AdapterFileError(f"{file}: unreadable {BASE_FORMAT_KEY} metadata ({err})") from None
    return recorded


def resolve_adapter_folder(path) -> Path:
    """`path`, or, when a save was interrupted between its two renames, the previous folder it
    left beside it (with a warning)."""
    path = Path(path)
    if path.exists():
        return path
    previous = sorted(path.parent.glob(f".{path.name}.previous-*"), key=lambda p: p.stat().st_mtime)
    if previous:
        warnings.warn(f"{path} is missing; an interrupted save left the previous adapter at {previous[-1]}, "
                      "which is loaded instead", stacklevel=3)
        return previous[-1]
    return path


def read_adapter_config(path) -> dict:
    """The adapter's config, validated: a clear error naming the file and the field otherwise."""
    file = Path(path) / CONFIG_NAME
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError as err:
        raise AdapterFileError(f"{file}: no such file") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AdapterFileError(f"{file}: not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise AdapterFileError(f"{file}: expected a JSON object, got {type(config).__name__}")

    def field(name, check, expected):
        if name not in config:
            raise AdapterFileError(f"{file}: the field {name!r} is missing")
        if not check(config[name]):
            raise AdapterFileError(f"{file}: {name!r} must be {expected}, got {config[name]!r}")

    field("peft_type", lambda v: v == "LORA", "'LORA'")
    field("r", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an int >= 1")
    field("lora_alpha", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
          "a finite number")
    for name, expected in (("rank_pattern", "an object"), ("alpha_pattern", "an object")):
        if not isinstance(config.get(name) or {}, dict):
            raise AdapterFileError(f"{file}: {name!r} must be {expected}, got {config[name]!r}")
    try:
        check_probability("'lora_dropout'", config.get("lora_dropout", 0.0))
    except ValueError as err:
        raise AdapterFileError(f"{file}: {err}") from None
    if config.get("bias", "none") != "none":
        raise AdapterFileError(f"{file}: bias={config['bias']!r} is not supported by fusedlora (only 'none'); "
                               f"{REFUSAL_HINTS['bias']}")
    for name, default in _UNSUPPORTED.items():
        if config.get(name, default) not in (default, [], {}):
            raise AdapterFileError(f"{file}: {name}={config[name]!r} is not supported by fusedlora; {REFUSAL_HINTS[name]}")
    return config


def _layer_key(key: str) -> str:
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


def load_adapter(model: torch.nn.Module, path, quant: Optional[str] = "auto",
                 adapter_name: str = "default") -> torch.nn.Module:
    """Load a PEFT-format adapter folder into `model` (in place) as adapter `adapter_name` and
    return it. A model with LoRA layers but no such adapter gets it (`add_adapter`, over the
    same layers; the active adapter stays active); one without LoRA layers gets them, their
    first adapter named `adapter_name`. In PEFT's multi-adapter layout, load each subfolder
    `path/<name>` with `adapter_name=<name>`.

    A model without LoRALinear layers first gets them from the config (`apply_lora` with its
    target modules, ranks and alphas), their frozen weights in the format `quant`: "auto" (the
    default) is each layer's format when fusedlora saved the adapter (its file records format,
    blocksize and nesting per layer), else the base kept as it is (dense, with a warning;
    bitsandbytes layers keep theirs), as PEFT runs it; a format name, or None for dense, chooses.
    The choice is logged (logger "fusedlora"). Every key, shape and dtype is checked before
    anything is assigned: on error the model is unchanged.
    """
    if quant != "auto":
        check_quant(quant)
    path = resolve_adapter_folder(path)
    config = read_adapter_config(path)
    stored, metadata = read_safetensors(path / WEIGHTS_NAME)
    tensors = {_layer_key(key): value for key, value in stored.items()}
    existing = lora_layers(model)
    if existing and adapter_name not in adapter_names(model):
        add_adapter(model, adapter_name, config["r"], config["lora_alpha"], config.get("lora_dropout", 0.0),
                    bool(config.get("use_rslora")), rank_pattern=config.get("rank_pattern"),
                    alpha_pattern=config.get("alpha_pattern"))
        try:
            with using_adapter(model, adapter_name):
                return _load_into(model, path, config, tensors, metadata, quant)
        except BaseException:
            delete_adapter(model, adapter_name)
            raise
    if existing:
        with using_adapter(model, adapter_name):
            return _load_into(model, path, config, tensors, metadata, quant)
    _load_into(model, path, config, tensors, metadata, quant)
    for layer in lora_layers(model).values():
        layer.active_adapter = adapter_name
    return model


def _load_into(model: torch.nn.Module, path: Path, config: dict, tensors: dict, metadata: dict,
               quant: Optional[str]) -> torch.nn.Module:
    """`load_adapter` into the active adapter, or into new LoRA layers when there are none."""
    existing = lora_layers(model)
    targets = config.get("target_modules") or "all-linear"
    trained_fully = resolve_modules_to_save(model, config.get("modules_to_save") or None, every_name_matches=False)
    shapes = {f"{name}.{key}": tuple(value.shape) for name in trained_fully
              for key, value in model.get_submodule(name).state_dict().items()}
    if existing:
        shapes.update((f"{name}.lora_{ab}.weight", tuple(getattr(layer, f"lora_{ab}").weight.shape))
                      for name, layer in existing.items() for ab in "AB")
    else:
        for name in select_targets(model, targets, trained_fully=tuple(trained_fully)):
            in_features, out_features = linear_features(model.get_submodule(name))
            r = pattern_value(config.get("rank_pattern"), name, config["r"])
            shapes[f"{name}.lora_A.weight"] = (r, in_features)
            shapes[f"{name}.lora_B.weight"] = (out_features, r)
    check_fit(path / WEIGHTS_NAME, tensors, shapes)
    if not existing:
        chosen = select_targets(model, targets, trained_fully=tuple(trained_fully))
        recorded = _recorded_formats(path / WEIGHTS_NAME, metadata, chosen) if quant == "auto" else None
        if recorded is not None:  # layers grouped by format, each group named by a whole-name regex
            groups: dict = {}
            for name in chosen:
                groups.setdefault(tuple(sorted(recorded[name].items())), []).append(name)
            with _restored_on_error(model, chosen):
                for layout, names in groups.items():
                    _add_layers(model, "|".join(re.escape(name) for name in names), config, trained_fully,
                                **dict(layout))
            log.info("load_adapter: %s's frozen weights in the formats the adapter was trained over: %s", path,
                     sorted({dict(layout)["quant"] for layout in groups}))
        else:
            if quant == "auto":
                quant = None
                warnings.warn(f"load_adapter: {path} records no base format (a PEFT adapter): the frozen weights are "
                              "kept as they are (dense; bitsandbytes layers keep theirs), as PEFT runs them; pass "
                              "quant='nf4' (or another format) to quantize them", stacklevel=2)
            _add_layers(model, targets, config, trained_fully, quant=quant)
            log.info("load_adapter: %s's frozen weights in %s", path, quant or "dense (as they are)")
    for name in trained_fully:
        train_whole(model.get_submodule(name))
    load_adapter_tensors(model, tensors)
    for name, layer in lora_layers(model).items():
        layer.set_hyperparameters(pattern_value(config.get("alpha_pattern"), name, config["lora_alpha"]),
                                  config.get("lora_dropout", 0.0), config.get("use_rslora"))
    return model


@contextlib.contextmanager
def _restored_on_error(model: torch.nn.Module, names: list):
    """Put `names`' modules and every parameter's requires_grad back if the block raises (several
    `apply_lora` calls, each atomic alone)."""
    modules = {name: model.get_submodule(name) for name in names}
    trainable = {parameter: parameter.requires_grad for parameter in model.parameters()}
    try:
        yield
    except BaseException:
        for name, module in modules.items():
            replace_submodule(model, name, module)
        for parameter, flag in trainable.items():
            parameter.requires_grad_(flag)
        raise


def _add_layers(model: torch.nn.Module, targets, config: dict, trained_fully: list, quant: Optional[str],
                blocksize: int = 64, double_quant: bool = True) -> None:
    apply_lora(model, targets, r=config["r"], alpha=config["lora_alpha"], dropout=config.get("lora_dropout", 0.0),
               quant=quant, blocksize=blocksize, double_quant=double_quant, rslora=bool(config.get("use_rslora")),
               rank_pattern=config.get("rank_pattern"), alpha_pattern=config.get("alpha_pattern"),
               modules_to_save=trained_fully)


def check_fit(file: Path, tensors: dict, shapes: dict) -> None:
    """Every expected key present with its shape, a float dtype and finite values, and no other key."""
    missing = sorted(set(shapes) - set(tensors))
    unexpected = sorted(set(tensors) - set(shapes))
    wrong = [f"{key}: {tuple(tensors[key].shape)} in the file, {shape} in the model"
             for key, shape in sorted(shapes.items()) if key in tensors and tuple(tensors[key].shape) != shape]
    not_float = [f"{key}: {tensors[key].dtype}" for key in sorted(shapes)
                 if key in tensors and not tensors[key].is_floating_point()]
    non_finite = [key for key in sorted(shapes) if key in tensors and tensors[key].is_floating_point()
                  and not torch.isfinite(tensors[key]).all()]
    problems = [f"missing keys {missing}" if missing else "", f"unexpected keys {unexpected}" if unexpected else "",
                f"mis-shaped {wrong}" if wrong else "", f"not floating point {not_float}" if not_float else "",
                f"holding NaN or Inf {non_finite}" if non_finite else ""]
    if not shapes:
        problems.append("the model has no layer this adapter's target_modules match")
    if any(problems):
        raise AdapterFileError(f"{file} does not fit this model: "
                               + "; ".join(p for p in problems if p))
