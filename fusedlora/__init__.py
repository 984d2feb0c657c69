"""fusedlora: fused LoRA linear layers on a frozen, quantized base weight.

    y = x·Wᵀ + scaling·(drop(x)·Aᵀ)·Bᵀ (+ bias), W stored as nf4 / fp4 / int8 / fp8 / dense
"""

from .adapters import AdapterFileError, load_adapter, save_adapter
from .checkpoint import load_training_state, save_training_state
from .formats import FORMATS, QuantizedWeight, from_bnb_module, quantize
from .model import TrainableSummary, apply_lora, lora_layers, lora_state_dict, merge_and_unload, trainable_summary
from .module import LoRALinear
from .ops import fused_lora_linear

__version__ = "0.1.0"

__all__ = [
    "AdapterFileError",
    "FORMATS",
    "LoRALinear",
    "QuantizedWeight",
    "TrainableSummary",
    "apply_lora",
    "from_bnb_module",
    "fused_lora_linear",
    "load_adapter",
    "load_training_state",
    "lora_layers",
    "lora_state_dict",
    "merge_and_unload",
    "quantize",
    "save_adapter",
    "save_training_state",
    "trainable_summary",
]
