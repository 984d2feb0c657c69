"""Session setup: hypothesis profiles. Without a GPU the Triton kernels run under Triton's interpreter, which must be
chosen before Triton compiles them (when fusedlora.kernels is first imported)."""

import os

import torch
from hypothesis import HealthCheck, settings

# Property tests (tests/test_fuzz.py, each sets its own example budget). "ci", the default, draws
# the same examples every run, so CI is reproducible; HYPOTHESIS_PROFILE=fuzz draws fresh ones.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("fuzz", deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
