"""What the backends, the custom ops' fake implementations, both kernel families and the
ahead-of-time compiler agree on (docs/design.md §4, §5), kept in one place: the weight formats'
ids (csrc/types.h's `WeightFormat` enum repeats them for the CUDA C++ kernels), the dtypes and the
largest LoRA rank the kernels take (csrc/lora.cu's `kMaxRank` repeats it; tests/test_contract.py holds both
C++ copies to these), the dtype the LoRA branch runs in, and the ops' output shapes. It imports
torch alone, so the device code in kernels/ may read it.
"""

import torch

# The `FMT` constexpr of the Triton kernels and `WeightView::fmt` of the CUDA kernels.
FORMAT_IDS = {"dense": 0, "int8": 1, "fp8": 2, "nf4": 3, "fp4": 4}

# The kernels keep a LoRA row of this many values per thread block; the reference takes any rank.
MAX_RANK = 256

# The dtypes both kernel families take for x and the adapters; the reference takes float64 too.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def lora_dtype(x_dtype: torch.dtype, a_dtype: torch.dtype, b_dtype: torch.dtype) -> torch.dtype:
    """The dtype the LoRA branch (and the saved u) is computed in: the promotion of x's, A's and
    B's dtypes (PEFT casts x to fp32 adapters)."""
    return torch.promote_types(torch.promote_types(x_dtype, a_dtype), b_dtype)


def fake_forward(x, w_tensors, w_format, w_shape, w_blocksize, lora_A, lora_B, scaling, bias, dropout_p, seed):
    """The forward ops' outputs (the fake implementation of `fusedlora::lora_linear_fwd` and of the
    CUDA extension's `cuda_lora_fwd`): y (M, N) in x's dtype, u (M, r) in the LoRA dtype."""
    u_dtype = lora_dtype(x.dtype, lora_A.dtype, lora_B.dtype)
    return x.new_empty((x.shape[0], w_shape[0])), x.new_empty((x.shape[0], lora_A.shape[0]), dtype=u_dtype)


def fake_backward(grad_y, x, u, w_tensors, w_format, w_shape, w_blocksize, lora_A, lora_B, scaling, dropout_p, seed,
                  need_dx, backend=None):
    """The backward ops' outputs: dx (M, K), or an empty tensor without `need_dx`; dA, dB like A
    and B. `backend` is the dispatching op's own argument; a backend's op (`cuda_lora_bwd`) has none."""
    grad_x = x.new_empty(x.shape) if need_dx else x.new_empty((0,))
    return grad_x, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape)
