// What the two GEMM kernels (csrc/gemm.cu, csrc/gemm_mma.cu) share: their modes and the last step
// of each output element, the LoRA product added once the base product is summed (docs/design.md §4).
#pragma once

#include <cstdint>

#include "common.cuh"

namespace fusedlora {

// forward: y = x · deq(W)ᵀ + ...; grad_x: dx = g · deq(W) + ... (the inspection reads these values).
enum Mode { kForward, kGradX };

// The right LoRA operand at (rank index j, output index o): Bᵀ forward (B is (N, r)), A grad_x.
template <int MODE>
__device__ __forceinline__ float lora_right_value(const float* __restrict__ right, int64_t ld_right, int64_t j,
                                                  int64_t o) {
  return MODE == kForward ? right[o * ld_right + j] : right[j * ld_right + o];
}

// out = base + bias (forward) + s · lora, or base + drop'(lora) (grad_x), for one element.
template <int MODE>
__device__ __forceinline__ float combine(float base, float lora, const float* __restrict__ bias, float scaling,
                                         const Dropout& dropout, int64_t m, int64_t o, int64_t outs) {
  if constexpr (MODE == kForward) {
    return base + (bias ? bias[o] : 0.0f) + scaling * lora;
  } else {
    return base + dropped(dropout, lora, m, o, outs);
  }
}

}  // namespace fusedlora
