"""The backends of the fused op, one module each with the same shape (`why_not(problem)`,
`forward`, `backward` with the signatures of `reference.forward` / `reference.backward`):

    reference   PyTorch, any device: the oracle and the fallback
    triton      the Triton kernels of kernels/ (launchers in triton_launch)
    cuda        the CUDA C++ kernels of csrc/ (the extension fusedlora._C)

and the registry (registry.py) that chooses among them, explains every refusal and scopes forcing
(regimes.py: the same for the GPU backends' two large-M regimes).
Preference: Triton, then CUDA C++ (for CUDA tensors Triton cannot take, or when forced), then the
reference; the benchmark times both GPU families side by side, so that measurements decide it.
"""

from . import cuda, reference, triton
from .regimes import REGIME_ENV, REGIMES, force_regime, forced_regime
from .registry import (BACKEND_ENV, Backend, Problem, backend_id, backend_named, backend_with_id, backends,
                       force_backend, forced_backend, register_backend, select_backend)

register_backend(Backend("reference", reference.why_not, reference.forward, reference.backward, priority=0))
register_backend(Backend("cuda", cuda.why_not, cuda.forward, cuda.backward, priority=5))
register_backend(Backend("triton", triton.why_not, triton.forward, triton.backward, priority=10))

__all__ = ["BACKEND_ENV", "Backend", "Problem", "REGIMES", "REGIME_ENV", "backend_id", "backend_named",
           "backend_with_id", "backends", "force_backend", "force_regime", "forced_backend", "forced_regime",
           "register_backend", "select_backend"]
