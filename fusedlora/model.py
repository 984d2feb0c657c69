"""Putting LoRA into an existing model: `apply_lora`, `merge_and_unload`, and what is trainable."""

import logging
import re
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
import torch.nn as nn

from .checks import check_quant
from .module import LoRALinear, LoRAFactor, is_bnb_linear, is_conv1d
from .storage import STORAGE_PREFIX

Targets = Union[str, list, tuple, set]
log = logging.getLogger("fusedlora")
# PEFT's task types by the model class's suffix: (task_type, the heads it trains fully and leaves
# out of "all-linear": its default modules_to_save)
TASKS = {"ForSequenceClassification": ("SEQ_CLS", ("classifier", "score")),
         "ForTokenClassification": ("TOKEN_CLS", ("classifier", "score")),
         "ForQuestionAnswering": ("QUESTION_ANS", ("qa_outputs",))}
TRAINED_FULLY = "fusedlora_trained_fully"  # set on a module apply_lora trains whole (modules_to_save)


def _name_matcher(patterns: Targets, argument: str) -> Callable[[str], bool]:
    """PEFT's rules: a string is a regex matched against the whole module name; a list holds
    names or name suffixes (`"q_proj"` matches `"layers.0.attn.q_proj"`)."""
    if isinstance(patterns, str):
        try:
            regex = re.compile(patterns)
        except re.error as err:
            raise ValueError(f"{argument} is not a valid regular expression: {patterns!r} ({err})") from err
        return lambda name: regex.fullmatch(name) is not None
    if isinstance(patterns, (list, tuple, set)) and all(isinstance(p, str) for p in patterns):
        suffixes = tuple(patterns)
        return lambda name: any(name == s or name.endswith("." + s) for s in suffixes)
    raise TypeError(f"{argument} must be a regex string, a list of module-name suffixes or 'all-linear', got {patterns!r}")


def _output_head(model: nn.Module) -> Optional[nn.Module]:
    get_output_embeddings = getattr(model, "get_output_embeddings", None)
    return get_output_embeddings() if callable(get_output_embeddings) else None


def replace_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` in place of `model`'s submodule `name` (a dotted path)."""
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, new)


def pattern_value(pattern: Optional[dict], name: str, default):
    """PEFT's rank/alpha patterns: the value of the first key that matches the end of `name`
    (as the regex `(.*\\.)?(key)$`), else `default`."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def select_targets(model: nn.Module, target_modules: Targets, exclude_modules: Optional[Targets] = None,
                   trained_fully: tuple = ()) -> list:
    """Names of the linear layers `apply_lora` would replace (layers already adapted, and the
    modules named in `trained_fully` with what they hold, excluded)."""
    if target_modules == "all-linear":
        head = _output_head(model)
        wanted = lambda name, module: _adaptable(module) and module is not head  # noqa: E731
    else:
        matches = _name_matcher(target_modules, "target_modules")
        wanted = lambda name, module: matches(name)  # noqa: E731
    excluded = _exclusions(exclude_modules)
    chosen = []
    for name, module in model.named_modules():
        if not name or isinstance(module, (LoRALinear, LoRAFactor)) or excluded(name) or not wanted(name, module):
            continue
        if any(name == whole or name.startswith(whole + ".") for whole in trained_fully):
            continue
        if not _adaptable(module):
            raise ValueError(f"target {name!r} is a {type(module).__name__}; only nn.Linear, transformers' Conv1D "
                             "and bitsandbytes Linear4bit/Linear8bitLt layers can take a LoRA adapter")
        chosen.append(name)
    return chosen


def task_of(model: nn.Module) -> tuple[Optional[str], tuple]:
    """PEFT's task type of `model` (by its class name) and the heads that task trains fully."""
    for suffix, task in TASKS.items():
        if type(model).__name__.endswith(suffix):
            return task
    return None, ()


def resolve_modules_to_save(model: nn.Module, modules_to_save, every_name_matches: bool = True) -> list:
    """Names of the modules `modules_to_save` asks to train fully: names or name suffixes, or
    "auto" (the task's heads, see `TASKS`). With `every_name_matches`, an explicit name that
    matches no module is an error (PEFT's task defaults list heads a model may lack)."""
    if modules_to_save is None:
        return []
    auto = isinstance(modules_to_save, str) and modules_to_save == "auto"
    suffixes = task_of(model)[1] if auto else modules_to_save
    if isinstance(suffixes, str) or not all(isinstance(key, str) for key in suffixes):
        raise TypeError(f"modules_to_save must be 'auto', None or a list of module names, got {modules_to_save!r}")
    # PEFT's rule for modules_to_save: a plain suffix (so "classifier" also takes "pre_classifier")
    names = [name for name, module in model.named_modules() if name and any(name.endswith(key) for key in suffixes)
             and not isinstance(module, (LoRALinear, LoRAFactor))]
    names = [name for name in names if not any(name.startswith(outer + ".") for outer in names)]
    unmatched = [key for key in suffixes if not any(name.endswith(key) for name in names)]
    if unmatched and not auto and every_name_matches:
        raise ValueError(f"modules_to_save={list(modules_to_save)!r}: {unmatched} match no module of the model")
    for name in names:
        if lora_layers(model.get_submodule(name)):
            raise ValueError(f"modules_to_save: {name!r} holds LoRA layers; train it fully or adapt it, not both")
        outside = [key for key, p in model.named_parameters(remove_duplicate=False)
                   if not key.startswith(name + ".") and any(p is q for q in model.get_submodule(name).parameters())]
        if outside:
            raise ValueError(f"modules_to_save: {name!r} shares parameters with {outside[:4]} (tied weights), which "
                             "would train too; untie them first")
    return names


def train_whole(module: nn.Module) -> None:
    """Make every parameter of `module` trainable and mark it trained whole (modules_to_save)."""
    module.requires_grad_(True)
    setattr(module, TRAINED_FULLY, True)


def fully_trained_modules(model: nn.Module) -> dict:
    """The modules `apply_lora` trains fully (PEFT's modules_to_save), by name."""
    return {name: module for name, module in model.named_modules() if getattr(module, TRAINED_FULLY, False)}


def _adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def _exclusions(exclude_modules: Optional[Targets]) -> Callable[[str], bool]:
    return _name_matcher(exclude_modules, "exclude_modules") if exclude_modules is not None else (lambda name: False)


def _already_adapted(existing: dict, target_modules: Targets, exclude_modules: Optional[Targets]) -> list:
    """Names of the `existing` LoRALinear layers that the targets name (and the exclusions do not)."""
    excluded = _exclusions(exclude_modules)
    matches = (lambda name: True) if target_modules == "all-linear" else _name_matcher(target_modules, "target_modules")
    return [name for name in existing if matches(name) and not excluded(name)]


def _listed(names: list) -> str:
    return f"{names[:20]}{' ...' if len(names) > 20 else ''}"


def apply_lora(model: nn.Module, target_modules: Targets, r: int = 16, alpha: float = 16, dropout: float = 0.0,
               quant: Optional[str] = "nf4", exclude_modules: Optional[Targets] = None, blocksize: int = 64,
               double_quant: bool = True, rslora: bool = False, init: str = "kaiming",
               rank_pattern: Optional[dict] = None, alpha_pattern: Optional[dict] = None,
               modules_to_save="auto") -> nn.Module:
    """Replace the targeted linear layers of `model` by `LoRALinear`, in place, and freeze
    everything but the adapters. Returns `model`.

    target_modules: a list of module names or name suffixes, a regex matched against whole
    names, or "all-linear" (every `nn.Linear` but the output head, as PEFT does).
    exclude_modules: the same forms, for layers to leave alone. quant: the frozen weight's
    format ("nf4", "fp4", "int8", "fp8", "dense" or None); bitsandbytes layers keep theirs.
    rank_pattern / alpha_pattern: per-layer r / alpha by name pattern, as in PEFT's LoraConfig.
    modules_to_save: modules trained whole instead of adapted (PEFT's option; names or name
    suffixes): they stay out of the targets and train in place (PEFT trains a copy). "auto", the
    default, is what PEFT's task type picks: a classification model's `classifier` / `score`
    head, a question-answering model's `qa_outputs`, nothing for other models. None: none.
    """
    check_quant(quant)
    named = {name for layer in lora_layers(model).values() for name in layer.adapter_names} - {"default"}
    if named:
        raise ValueError(f"apply_lora: the model has named adapters {sorted(named)}, which new layers would lack; "
                         "apply every layer first, then add named adapters")
    trained_fully = resolve_modules_to_save(model, modules_to_save)
    chosen = select_targets(model, target_modules, exclude_modules, tuple(trained_fully))
    existing = lora_layers(model)
    adapted = _already_adapted(existing, target_modules, exclude_modules)
    if not chosen and not adapted:
        linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
        regex = isinstance(target_modules, str) and target_modules != "all-linear"
        raise ValueError(f"target_modules={target_modules!r} matched no linear layer"
                         f"{' (a string is a regular expression matched against whole module names)' if regex else ''}"
                         f"; the model's linear layers are {_listed(linears)}"
                         f"{f' and its LoRA layers {_listed(list(existing))}' if existing else ''}")
    kept = {name: existing[name].r for name in adapted if existing[name].r != pattern_value(rank_pattern, name, r)}
    if kept:
        warnings.warn(f"apply_lora: {_listed(list(kept))} already have adapters, which keep their ranks "
                      f"({sorted(set(kept.values()))}, not r={r}); to change a rank, start from the base model",
                      stacklevel=2)
    # every layer is built before any is swapped in, so a failure leaves the model as it was
    layers = {name: LoRALinear.from_linear(model.get_submodule(name), r=pattern_value(rank_pattern, name, r),
                                           alpha=pattern_value(alpha_pattern, name, alpha), dropout=dropout,
                                           quant=quant, blocksize=blocksize, double_quant=double_quant,
                                           rslora=rslora, init=init)
              for name in chosen}
    for name, layer in layers.items():
        replace_submodule(model, name, layer)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.lora_A.weight.requires_grad_(True)
            module.lora_B.weight.requires_grad_(True)
    for module in [*fully_trained_modules(model).values(), *map(model.get_submodule, trained_fully)]:
        train_whole(module)
    _release_from_hf_quantizer(model)
    return model


def _release_from_hf_quantizer(model: nn.Module) -> None:
    """A Hugging Face model loaded with a bitsandbytes quantization config now has trainable
    adapters: clear `is_quantized`, which transformers' Trainer reads as "purely quantized, no
    adapters" (PEFT's adapters are the only ones it knows). Once every bitsandbytes layer is a
    LoRALinear the quantizer manages nothing, and it goes too, as transformers' own
    `remove_quantization_config` removes it. config.quantization_config stays, so that a saved
    checkpoint still loads with bitsandbytes."""
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is None or getattr(method, "value", method) != "bitsandbytes":
        return
    model.is_quantized = False
    if not any(is_bnb_linear(module) for module in model.modules()):
        del model.hf_quantizer
        if hasattr(model, "quantization_method"):
            del model.quantization_method
    log.info("apply_lora: the bitsandbytes model has trainable adapters now (is_quantized cleared for transformers' "
             "Trainer; config.quantization_config kept)")


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every `LoRALinear` of `model`, by module name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoRALinear)}


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every `LoRALinear` by a frozen `nn.Linear` holding its dense merged weight.

    Returns the model (a new `nn.Linear` when `model` itself is a `LoRALinear`)."""
    if isinstance(model, LoRALinear):
        return model.to_linear()
    for name, layer in lora_layers(model).items():
        replace_submodule(model, name, layer.to_linear())
    return model


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """`t` whole: a DTensor (FSDP2 sharding) is gathered, a collective every rank must join."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def adapter_state_dict(model: nn.Module) -> dict:
    """What an adapter file holds: `lora_state_dict` and the state of every module trained fully,
    whole (under FSDP2 every rank must call it)."""
    tensors = lora_state_dict(model)
    for name, module in fully_trained_modules(model).items():
        for key, value in module.state_dict().items():
            tensors[f"{name}.{key}"] = full_tensor(value.detach())
    return tensors


def adapter_shapes(model: nn.Module) -> dict:
    """The shape of each tensor of `adapter_state_dict` (without gathering anything)."""
    shapes = {f"{name}.lora_{ab}.weight": tuple(getattr(layer, f"lora_{ab}").weight.shape)
              for name, layer in lora_layers(model).items() for ab in "AB"}
    for name, module in fully_trained_modules(model).items():
        shapes.update((f"{name}.{key}", tuple(value.shape)) for key, value in module.state_dict().items())
    return shapes


@torch.no_grad()
def load_adapter_tensors(model: nn.Module, tensors: dict) -> None:
    """Copy `tensors` (keyed as `adapter_state_dict`, checked to fit) into the model."""
    for name, layer in lora_layers(model).items():
        layer.lora_A.weight.copy_(tensors[f"{name}.lora_A.weight"])
        layer.lora_B.weight.copy_(tensors[f"{name}.lora_B.weight"])
    for name, module in fully_trained_modules(model).items():
        for key, value in module.state_dict(keep_vars=True).items():
            value.copy_(tensors[f"{name}.{key}"])


def lora_state_dict(model: nn.Module) -> dict:
    """The adapter tensors only: `<module>.lora_A.weight` and `<module>.lora_B.weight`, whole
    (under FSDP2 every rank must call it: sharded adapters are gathered)."""
    tensors = {}
    for name, layer in lora_layers(model).items():
        tensors[f"{name}.lora_A.weight"] = full_tensor(layer.lora_A.weight.detach())
        tensors[f"{name}.lora_B.weight"] = full_tensor(layer.lora_B.weight.detach())
    return tensors


@dataclass(frozen=True)
class TrainableSummary:
    """Parameter counts and bytes; frozen quantized weights count as N·K parameters."""

    trainable_params: int
    total_params: int
    trainable_bytes: int
    total_bytes: int

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0

    def __str__(self) -> str:
        return (f"trainable params: {self.trainable_params:,} || all params: {self.total_params:,} || "
                f"trainable%: {100 * self.trainable_fraction:.4f} || "
                f"bytes: {self.trainable_bytes / 2**20:.2f} MiB trainable of {self.total_bytes / 2**20:.2f} MiB")


def trainable_summary(model: nn.Module) -> TrainableSummary:
    """How much of `model` trains: parameters and bytes, trainable and in all."""
    trainable = total = trainable_bytes = total_bytes = 0
    for name, parameter in model.named_parameters():
        if name.rsplit(".", 1)[-1].startswith(STORAGE_PREFIX):
            continue  # a frozen weight's storage, counted as weights below
        size = parameter.numel() * parameter.element_size()
        total += parameter.numel()
        total_bytes += size
        if parameter.requires_grad:
            trainable += parameter.numel()
            trainable_bytes += size
    for layer in lora_layers(model).values():
        total += layer.weight.shape.numel()
        total_bytes += layer.weight.nbytes
    return TrainableSummary(trainable, total, trainable_bytes, total_bytes)
