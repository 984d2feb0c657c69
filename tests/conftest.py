"""Session setup: hypothesis profiles (tests/hypothesis_profiles.py). Without a GPU the Triton kernels run under
Triton's interpreter, which must be chosen before Triton compiles them (when fusedlora.kernels is first imported)."""

import os

import torch

from hypothesis_profiles import load_profile

load_profile()

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
