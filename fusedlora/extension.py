"""The optional CUDA extension `fusedlora._C` (csrc/): loading it and building it just in time
(the backend that calls its ops is `fusedlora.backends.cuda`).

`load()` imports `fusedlora._C` (built by `FUSEDLORA_BUILD_CUDA=1 pip install --no-build-isolation .`)
once. When it is missing or broken the CUDA backend says why, one warning is logged, and the other
backends carry on. Nothing is compiled on import: `build_jit()` compiles csrc/ with
`torch.utils.cpp_extension.load` into torch's extension cache (a source checkout is needed), and
`FUSEDLORA_JIT_BUILD=1` lets the first CUDA call do that, announcing it.
"""

import functools
import logging
import os
import threading
from pathlib import Path
from typing import Optional

import torch

from .contract import fake_backward, fake_forward
from .toolkit import NVCC_FLAGS, point_cuda_home

log = logging.getLogger("fusedlora")
CSRC = Path(__file__).resolve().parent.parent / "csrc"
JIT_ENV = "FUSEDLORA_JIT_BUILD"


def _register_fakes() -> None:
    torch.library.register_fake("fusedlora::cuda_lora_fwd")(fake_forward)
    torch.library.register_fake("fusedlora::cuda_lora_bwd")(fake_backward)


def build_jit(verbose: bool = False) -> None:
    """Compile csrc/ for the local GPU (or TORCH_CUDA_ARCH_LIST) and load it; cached by torch."""
    sources = sorted(CSRC.glob("*.cpp")) + sorted(CSRC.glob("*.cu"))
    if not sources:
        raise RuntimeError(f"no CUDA sources at {CSRC}: a just-in-time build needs a source checkout of fusedlora")
    point_cuda_home()
    from torch.utils.cpp_extension import load as load_extension

    log.warning("fusedlora: compiling the CUDA extension just in time (once; torch caches the build)")
    load_extension(name="fusedlora_C", sources=[str(s) for s in sources], extra_cuda_cflags=NVCC_FLAGS,
                   is_python_module=False, verbose=verbose)


def _unavailable(reason: str, level: int = logging.WARNING) -> str:
    log.log(level, "fusedlora: %s", reason)
    return reason


_LOAD_LOCK = threading.Lock()


def load() -> Optional[str]:
    """Load the extension once; None when its ops are there, else why not (also logged, once).
    Thread-safe: concurrent first calls wait for one load (fakes may be registered only once)."""
    with _LOAD_LOCK:
        return _load()


@functools.lru_cache(maxsize=None)
def _load() -> Optional[str]:
    try:
        import fusedlora._C  # noqa: F401  (registers the ops)
    except Exception as err:
        missing = isinstance(err, ModuleNotFoundError) and err.name == "fusedlora._C"
        if missing and os.environ.get(JIT_ENV) == "1":
            try:
                build_jit()
            except Exception as build_error:  # a failed build is reported like a missing extension
                return _unavailable(f"the just-in-time build of the CUDA extension failed: {build_error}")
        elif missing and not torch.cuda.is_available():  # nothing could use it here: a note, not a warning
            return _unavailable(f"fusedlora._C is not built ({err}); only CUDA tensors use it, and no CUDA GPU is "
                                "visible here", logging.INFO)
        elif missing:
            return _unavailable(f"fusedlora._C is not built ({err}); build it with FUSEDLORA_BUILD_CUDA=1 pip install "
                                f"--no-build-isolation ., or call fusedlora.extension.build_jit() (or set {JIT_ENV}=1)")
        else:  # a present but broken library: say so, never take the process down
            return _unavailable(f"fusedlora._C failed to load: {type(err).__name__}: {err}")
    _register_fakes()
    return None

