"""Memory figures of one layer: the bytes autograd saves for backward (weights and adapters,
which stay resident anyway, are left out) and the peak memory a forward+backward allocates."""

from typing import Callable, Optional

import torch


def _storage_key(t: torch.Tensor) -> tuple:
    return t.untyped_storage().data_ptr(), t.device


def saved_activation_bytes(forward: Callable, x: torch.Tensor, resident: list) -> int:
    """Bytes of the distinct storages autograd saves during `forward(x)`, resident tensors excluded."""
    skip = {_storage_key(t) for t in resident}
    seen = {}

    def pack(t):
        key = _storage_key(t)
        if key not in skip:
            seen[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward(x)
    return sum(seen.values())


def peak_bytes(step: Callable, device: torch.device) -> Optional[int]:
    """Peak bytes allocated above the starting level while `step()` runs (GPU only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    start = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - start
