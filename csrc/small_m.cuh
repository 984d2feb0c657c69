// What the two small-M forwards share (csrc/small_m.cu: fp32 FMAs, any layout; csrc/small_m_mma.cu:
// tensor cores): their operands, their split over K and the last block's turn to add the slices up.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#include "common.cuh"

namespace fusedlora {

// `t` as an Operand: fp32, fp16 or bf16 with unit stride along its last dimension (else a copy kept in `keep`).
Operand operand(const at::Tensor& t, at::Tensor& keep);

// A small-M launch's operands: x, A, B and the bias as Operands (a copy kept where their dtype or
// stride needs one; A undefined: no LoRA term, A and B null), y and u, which the kernels write,
// as they are (checked to need no copy).
struct SmallMOperands {
  Operand x, lora_a, lora_b, bias, y, u;
  at::Tensor kept[6];
};
SmallMOperands small_m_operands(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                                const at::Tensor& bias, const at::Tensor& y, const at::Tensor& u);

// The split over K's scratch: fp32 partial sums (no initial values needed) and int32 counters
// (zero, and left zero by the kernels). See split_k_scratch in csrc/small_m.cu.
struct Scratch {
  at::Tensor partials, counters;
};
Scratch split_k_scratch(const at::Tensor& like, int64_t floats, int64_t counters);

// A launch's split over K into `slices` of slice_steps steps each, and where its slices write their
// partial sums of y (slices, M, N) and of u (groups, slices, M, r); null pointers with one slice.
struct SplitK {
  int64_t slices;
  Scratch scratch;  // keeps the pointers' storage alive until the launch
  float* partial;
  float* u_partial;
  int* counters;
};
SplitK split_k(const at::Tensor& like, int64_t steps, int64_t slice_steps, int64_t rows, int64_t columns,
               int64_t groups, int64_t rank);

// Called by every thread of a block after it wrote its slice's partial sums: whether this block is
// the last of its group's `slices` to arrive (it then resets the group's counter for the next
// launch and may read every slice's partials). `flag`: one int of shared memory.
__device__ __forceinline__ bool arrived_last(int* counters, int64_t group, int slices, int& flag) {
  thread_fence();
  block_sync();
  if (threadIdx.x == 0) {
    const bool last = atomic_add(&counters[group], 1) == slices - 1;
    if (last) counters[group] = 0;
    flag = last;
  }
  block_sync();
  const bool last = flag;
  if (last) thread_fence();
  return last;
}

}  // namespace fusedlora
