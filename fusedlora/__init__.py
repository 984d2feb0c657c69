"""fusedlora: fused LoRA linear layers on a frozen, quantized base weight.

    y = x·Wᵀ + scaling·(drop(x)·Aᵀ)·Bᵀ (+ bias), W stored as nf4 / fp4 / int8 / fp8 / dense
"""

import importlib.machinery
import importlib.util
import os
import sys


def _kernels_from_checkout() -> None:
    """Make `fusedlora.kernels` the repository's top-level kernels/ folder when this package is
    imported from a source checkout (setup.py installs that folder as fusedlora/kernels/).

    kernels/ has no __init__.py, so from the repository root it never shadows another
    distribution's top-level `kernels`; here it becomes a namespace subpackage of fusedlora, as it
    is in an installed wheel.
    """
    package_dir = os.path.dirname(os.path.abspath(__file__))
    checkout = os.path.dirname(package_dir)
    checkout_kernels = os.path.join(checkout, "kernels")
    in_checkout = os.path.isfile(os.path.join(checkout, "setup.py")) and os.path.isfile(
        os.path.join(checkout_kernels, "forward.py"))
    if os.path.isdir(os.path.join(package_dir, "kernels")) or not in_checkout:
        return
    if __name__ + ".kernels" not in sys.modules:
        spec = importlib.machinery.ModuleSpec(__name__ + ".kernels", None, is_package=True)
        spec.submodule_search_locations = [checkout_kernels]
        sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    globals()["kernels"] = sys.modules[__name__ + ".kernels"]


_kernels_from_checkout()

from .adapters import AdapterFileError, load_adapter, save_adapter
from .checkpoint import load_training_state, save_training_state
from .formats import FORMATS, FrozenWeight, from_bnb_module, quantize
from .loading import load_checkpoint_shards, meta_parameters
from .model import TrainableSummary, apply_lora, lora_layers, lora_state_dict, merge_and_unload, trainable_summary
from .module import LoRALinear
from .named_adapters import active_adapter, adapter_names, add_adapter, delete_adapter, disable_adapter, set_adapter
from .ops import fused_lora_linear
from .torchtune import from_torchtune, to_torchtune

__version__ = "0.1.0"

__all__ = [
    "AdapterFileError",
    "active_adapter",
    "adapter_names",
    "add_adapter",
    "delete_adapter",
    "disable_adapter",
    "set_adapter",
    "FORMATS",
    "LoRALinear",
    "FrozenWeight",
    "TrainableSummary",
    "apply_lora",
    "from_bnb_module",
    "from_torchtune",
    "fused_lora_linear",
    "load_adapter",
    "load_checkpoint_shards",
    "load_training_state",
    "lora_layers",
    "meta_parameters",
    "lora_state_dict",
    "merge_and_unload",
    "quantize",
    "save_adapter",
    "save_training_state",
    "to_torchtune",
    "trainable_summary",
]
