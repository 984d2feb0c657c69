"""Reading and writing the package's safetensors files safely.

A write goes to a uniquely named partial file beside the target, is flushed to disk (fsync), and
only then takes the target's name, so an interrupted or failed write never damages what was
there. Each write stores in the file's metadata a BLAKE2b digest of every tensor (its name, dtype,
shape and bytes) and one of the rest of the metadata; a read checks them and names the tensors
that changed. Files written elsewhere (PEFT's) carry no digests: they are read as they are, unless
the caller requires digests. Every failure is an `AdapterFileError` naming the file.
"""

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

DIGESTS_KEY = "fusedlora_blake2b"
_METADATA_DIGEST = "__metadata__"  # the digest entry of the other metadata (no tensor has this name)


class AdapterFileError(ValueError):
    """An adapter or checkpoint file that cannot be loaded into this model; the message names the
    file and the keys."""


def tensor_digest(key: str, tensor: torch.Tensor) -> str:
    """BLAKE2b (128-bit) of the tensor's name, dtype, shape and bytes in row-major order."""
    digest = hashlib.blake2b(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode(), digest_size=16)
    digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _metadata_digest(metadata: dict) -> str:
    text = json.dumps({key: value for key, value in metadata.items() if key != DIGESTS_KEY}, sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def partial_name(path: Path, kind: str = "partial") -> Path:
    """A hidden name beside `path`, unique to this process and call."""
    return path.with_name(f".{path.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def fsync_file(file: Path) -> None:
    with open(file, "rb") as handle:
        os.fsync(handle.fileno())


def write_safetensors(tensors: dict, file, metadata: Optional[dict] = None, atomic: bool = True) -> None:
    """Save `tensors` (CPU, contiguous) to `file` with their digests; `atomic`: via a partial file
    and a rename (otherwise the caller's folder swap provides atomicity)."""
    file = Path(file)
    metadata = {"format": "pt", **(metadata or {})}
    digests = {key: tensor_digest(key, value) for key, value in tensors.items()}
    digests[_METADATA_DIGEST] = _metadata_digest(metadata)
    metadata[DIGESTS_KEY] = json.dumps(digests, sort_keys=True)
    target = partial_name(file) if atomic else file
    try:
        save_file(tensors, target, metadata=metadata)
        if atomic:
            fsync_file(target)
            os.replace(target, file)
    except BaseException:
        if atomic:
            target.unlink(missing_ok=True)
        raise


def read_safetensors(file, require_digests: bool = False) -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file, its digests checked when it has them (it must
    have them when `require_digests`: files only fusedlora writes)."""
    file = Path(file)
    if not file.exists():
        raise AdapterFileError(f"{file}: no such file (only safetensors files are read; nothing is unpickled)")
    try:
        with safe_open(file, framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as err:  # safetensors raises its own error types for truncated or corrupt files
        raise AdapterFileError(f"{file}: unreadable safetensors file ({err})") from err
    if DIGESTS_KEY not in metadata:
        if require_digests:
            raise AdapterFileError(f"{file}: the checksums fusedlora saves with this file are missing (the file is "
                                   "damaged, or was not written by fusedlora)")
        return tensors, metadata
    try:
        digests = json.loads(metadata[DIGESTS_KEY])
        metadata_digest = digests.pop(_METADATA_DIGEST)
    except (json.JSONDecodeError, AttributeError, KeyError) as err:
        raise AdapterFileError(f"{file}: its {DIGESTS_KEY!r} metadata is damaged ({err!r})") from err
    if sorted(digests) != sorted(tensors):
        raise AdapterFileError(f"{file}: the tensors {sorted(set(digests) ^ set(tensors))} do not match the list "
                               "saved with the file (the file is damaged)")
    changed = sorted(key for key, value in tensors.items() if tensor_digest(key, value) != digests[key])
    if changed:
        raise AdapterFileError(f"{file}: the bytes of {changed} do not match the checksums saved with them "
                               "(the file is corrupted)")
    if _metadata_digest(metadata) != metadata_digest:
        raise AdapterFileError(f"{file}: its metadata does not match the checksum saved with it (the file is corrupted)")
    return tensors, metadata
