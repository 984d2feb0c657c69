"""The CUDA C++ backend: the kernels of csrc/, compiled into the optional extension
`fusedlora._C`, which `fusedlora.extension` builds and loads. Its ops take the arguments of the
Python ops but `backend`, plus the large-M regime chosen here (`regimes.large_m_regime`; the
extension keeps a call fused where its workspace path cannot take it), and share their fake
implementations (`fusedlora.contract`)."""

from typing import Optional

import torch

from .. import extension
from .regimes import CUDA_WORKSPACE_MIN_M, large_m_regime, products_in_x_dtype
from .registry import Problem, gpu_refusal


def why_not(problem: Problem) -> Optional[str]:
    """Why the CUDA backend cannot run `problem`, or None when it can."""
    if problem.device.type != "cuda":
        return "takes CUDA tensors only"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    return extension.load() or gpu_refusal(problem)


def _regime(x, weight, lora_A, lora_B) -> str:
    possible = products_in_x_dtype(x.dtype, (lora_A.dtype, lora_B.dtype))
    return large_m_regime(x.shape[0], weight.fmt, torch.cuda.get_device_capability(x.device), possible,
                          CUDA_WORKSPACE_MIN_M)


def forward(x, weight, lora_A, lora_B, scaling, bias, dropout_p, seed):
    """`fusedlora.backends.reference.forward`'s signature."""
    return torch.ops.fusedlora.cuda_lora_fwd(x, weight.tensors(), weight.fmt, list(weight.shape), weight.blocksize,
                                             lora_A, lora_B, float(scaling), bias, float(dropout_p),
                                             torch.tensor(seed, dtype=torch.int64), _regime(x, weight, lora_A, lora_B))


def backward(grad_y, x, u, weight, lora_A, lora_B, scaling, dropout_p, seed, need_dx):
    """`fusedlora.backends.reference.backward`'s signature."""
    grad_x, grad_A, grad_B = torch.ops.fusedlora.cuda_lora_bwd(
        grad_y, x, u, weight.tensors(), weight.fmt, list(weight.shape), weight.blocksize, lora_A, lora_B,
        float(scaling), float(dropout_p), torch.tensor(seed, dtype=torch.int64), need_dx,
        _regime(x, weight, lora_A, lora_B))
    return (grad_x if need_dx else None), grad_A, grad_B
