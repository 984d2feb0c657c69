"""torchtune interop. torchtune's `LoRALinear(in_dim, out_dim, rank, alpha, dropout)` computes
what `fusedlora.LoRALinear.from_linear(nn.Linear(in_dim, out_dim), r=rank, alpha=alpha,
dropout=dropout, quant=...)` computes (scaling alpha / rank); only its adapter keys differ:
`lora_a.weight` / `lora_b.weight` there, `lora_A.weight` / `lora_B.weight` here (PEFT's names).
"""

import re

_TO_FUSEDLORA = {"lora_a": "lora_A", "lora_b": "lora_B"}
_TO_TORCHTUNE = {value: key for key, value in _TO_FUSEDLORA.items()}


def _rename(state_dict: dict, names: dict) -> dict:
    pattern = re.compile(r"(^|\.)(" + "|".join(names) + r")(\.weight)$")
    return {pattern.sub(lambda m: f"{m.group(1)}{names[m.group(2)]}{m.group(3)}", key): value
            for key, value in state_dict.items()}


def from_torchtune(state_dict: dict) -> dict:
    """A torchtune state dict with fusedlora's adapter key names (other keys untouched)."""
    return _rename(state_dict, _TO_FUSEDLORA)


def to_torchtune(state_dict: dict) -> dict:
    """A fusedlora state dict with torchtune's adapter key names (other keys untouched)."""
    return _rename(state_dict, _TO_TORCHTUNE)
