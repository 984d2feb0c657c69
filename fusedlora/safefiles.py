"""Reading and writing the package's safetensors files safely.

A write goes to a partial file beside the target, is flushed to disk (fsync), and only then
takes the target's name, so an interrupted write never damages what was there. Each write stores
a BLAKE2b digest of every tensor's bytes in the file's metadata; a read checks them and names
the first tensor whose bytes changed. Files written elsewhere (PEFT's) carry no digests: they are
read as they are. Every failure is an `AdapterFileError` naming the file.
"""

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

DIGESTS_KEY = "fusedlora_blake2b"


class AdapterFileError(ValueError):
    """An adapter or checkpoint file that cannot be loaded into this model; the message names the
    file and the keys."""


def tensor_digest(tensor: torch.Tensor) -> str:
    """BLAKE2b (128-bit) of the tensor's bytes in row-major order."""
    data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.blake2b(data.tobytes(), digest_size=16).hexdigest()


def fsync_file(file: Path) -> None:
    with open(file, "rb") as handle:
        os.fsync(handle.fileno())


def write_safetensors(tensors: dict, file, metadata: Optional[dict] = None, atomic: bool = True) -> None:
    """Save `tensors` (CPU, contiguous) to `file` with their digests; `atomic`: via a partial file
    and a rename (otherwise the caller's folder swap provides atomicity)."""
    file = Path(file)
    digests = json.dumps({key: tensor_digest(value) for key, value in tensors.items()}, sort_keys=True)
    metadata = {"format": "pt", **(metadata or {}), DIGESTS_KEY: digests}
    target = file.with_name(f".{file.name}.partial-{os.getpid()}") if atomic else file
    save_file(tensors, target, metadata=metadata)
    if atomic:
        fsync_file(target)
        os.replace(target, file)


def read_safetensors(file) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file, its digests checked when it has them."""
    file = Path(file)
    if not file.exists():
        raise AdapterFileError(f"{file}: no such file (only safetensors files are read; nothing is unpickled)")
    try:
        with safe_open(file, framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as err:  # safetensors raises its own error types for truncated or corrupt files
        raise AdapterFileError(f"{file}: unreadable safetensors file ({err})") from err
    if DIGESTS_KEY in metadata:
        try:
            digests = json.loads(metadata[DIGESTS_KEY])
        except json.JSONDecodeError as err:
            raise AdapterFileError(f"{file}: its {DIGESTS_KEY!r} metadata is damaged ({err})") from err
        if sorted(digests) != sorted(tensors):
            raise AdapterFileError(f"{file}: the tensors {sorted(set(digests) ^ set(tensors))} do not match the list "
                                   "saved with the file (the file is damaged)")
        changed = sorted(key for key, value in tensors.items() if tensor_digest(value) != digests[key])
        if changed:
            raise AdapterFileError(f"{file}: the bytes of {changed} do not match the checksums saved with them "
                                   "(the file is corrupted)")
    return tensors, metadata
