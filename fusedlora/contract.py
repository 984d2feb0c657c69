"""What both kernel families, the backends and the ahead-of-time compiler agree on
(docs/design.md §4, §5), kept in one place: the weight formats' ids, which csrc/types.h's
`WeightFormat` enum repeats for the CUDA C++ kernels, and the largest LoRA rank the kernels take,
which csrc/lora.cu's `kMaxRank` repeats (tests/test_contract.py holds the C++ copies to these).
It imports nothing, so the device code in kernels/ may import it.
"""

# The `FMT` constexpr of the Triton kernels and `WeightView::fmt` of the CUDA kernels.
FORMAT_IDS = {"dense": 0, "int8": 1, "fp8": 2, "nf4": 3, "fp4": 4}

# The kernels keep a LoRA row of this many values per thread block; the reference takes any rank.
MAX_RANK = 256
