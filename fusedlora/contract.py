"""What the backends, the custom ops' fake implementations, both kernel families and the
ahead-of-time compiler agree on (docs/design.md §4, §5), kept in one place: the weight formats'
ids (csrc/types.h's `WeightFormat` enum repeats them for the CUDA C++ kernels), the dtypes and the
largest LoRA rank the kernels take (csrc/lora.cu's `kMaxRank` repeats it), the order of a weight's
storage tensors (csrc/types.h's `WeightSlot`) and the weight as the kernels take it (`WeightArgs`;
csrc/types.h's `WeightView`), the dtype the LoRA branch runs in, and the ops' output shapes.
tests/test_contract.py holds the C++ copies to these. It imports torch alone, so the device code
in kernels/ may read it.
"""

from typing import NamedTuple, Optional

import torch

# The `FMT` constexpr of the Triton kernels and `WeightView::fmt` of the CUDA kernels.
FORMAT_IDS = {"dense": 0, "int8": 1, "fp8": 2, "nf4": 3, "fp4": 4}
# Where each part of the 4-bit code table (`formats.codebooks.device_code_table`) starts, in
# 32-bit words: the 16 codes, then the 256 byte pairs in fp32 (two words each), bf16 and fp16.
PAIRS_FP32, PAIRS_BF16, PAIRS_FP16, CODE_TABLE_WORDS = 16, 16 + 512, 16 + 768, 16 + 1024

# The kernels keep a LoRA row of this many values per thread block; the reference takes any rank.
MAX_RANK = 256

# A weight's storage tensors in the order the ops take them (`FrozenWeight.tensors()`); each
# format holds a prefix: dense the values; int8 / fp8 the values and the per-row scale; nf4 / fp4
# the packed codes and the block absmax, plus the three tensors that decode a nested absmax.
WEIGHT_SLOTS = ("data", "scale", "nested_absmax", "nested_code", "nested_offset")


class WeightArgs(NamedTuple):
    """The frozen (N, K) weight as the kernels take it, filled by each format's `kernel_args()`.

    `data`: the dense values, the int8 / fp8 values, or the packed 4-bit codes, unit stride along
    K; `scale`: SCB (int8), the row scale (fp8) or the block absmax (4-bit: fp32, or uint8 codes
    into `nested_code` when nested); `code`: the 16 values of the 4-bit codes, then their 256 byte
    pairs in fp32, bf16 and fp16 (`formats.codebooks.device_code_table`; csrc/ keeps its own copy
    of the 16). A field a format does not have is None (the Triton kernels see None as a
    compile-time constant).
    """

    fmt: int
    data: torch.Tensor
    scale: Optional[torch.Tensor]
    code: Optional[torch.Tensor]
    nested_absmax: Optional[torch.Tensor]
    nested_code: Optional[torch.Tensor]
    nested_offset: Optional[torch.Tensor]
    stride_n: int  # 0 for the 4-bit formats, whose codes are indexed as one flat (N·K) array
    blocksize: int  # 1 for the per-row formats

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    @property
    def pointers(self) -> tuple:
        """The six weight arguments of every Triton kernel that reads W, in their order."""
        return self.data, self.scale, self.code, self.nested_absmax, self.nested_code, self.nested_offset


# The dtypes both kernel families take for x and the adapters; the reference takes float64 too.
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def lora_dtype(x_dtype: torch.dtype, a_dtype: torch.dtype, b_dtype: torch.dtype) -> torch.dtype:
    """The dtype the LoRA branch (and the saved u) is computed in: the promotion of x's, A's and
    B's dtypes (PEFT casts x to fp32 adapters)."""
    return torch.promote_types(torch.promote_types(x_dtype, a_dtype), b_dtype)


def fake_forward(x, w_tensors, w_format, w_shape, w_blocksize, lora_A, lora_B, scaling, bias, dropout_p, seed,
                 regime=None):
    """The forward ops' outputs (the fake implementation of `fusedlora::lora_linear_fwd` and of the
    CUDA extension's `cuda_lora_fwd`, whose last argument is `regime`): y (M, N) in x's dtype, u
    (M, r) in the LoRA dtype."""
    u_dtype = lora_dtype(x.dtype, lora_A.dtype, lora_B.dtype)
    return x.new_empty((x.shape[0], w_shape[0])), x.new_empty((x.shape[0], lora_A.shape[0]), dtype=u_dtype)


def fake_backward(grad_y, x, u, w_tensors, w_format, w_shape, w_blocksize, lora_A, lora_B, scaling, dropout_p, seed,
                  need_dx, backend=None, regime=None):
    """The backward ops' outputs: dx (M, K), or an empty tensor without `need_dx`; dA, dB like A
    and B. `backend` is the dispatching op's own argument; the CUDA op's `regime` lands in that
    parameter when passed by position, in `regime` by name. Neither changes the outputs' shapes."""
    grad_x = x.new_empty(x.shape) if need_dx else x.new_empty((0,))
    return grad_x, lora_A.new_empty(lora_A.shape), lora_B.new_empty(lora_B.shape)
