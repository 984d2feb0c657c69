// A test kernel of csrc/device.cuh's tensor-core primitives, for one warp: D (16x8, fp32) = A · B + C
// with A (16x16), Bᵀ (8x16) and C row-major in global memory, staged into shared memory by cp_async_16,
// its fragments read by ldmatrix_x4 and multiplied by mma_m16n8k16, in PTX's lane layouts. The
// harness runs it emulated (tests/test_cuda_emulated.py), nvcc compiles it for sm_80 / sm_90; the
// test's own mistakes: `lane_shift` != 0 gives ldmatrix the wrong lanes' rows, `skip_wait` reads
// the shared tiles before the copies are waited for.
#pragma once

#include <cstdint>

#include "device.cuh"

namespace fusedlora {

template <typename T>
__global__ void mma_tile_kernel(const T* a, const T* bt, const float* c, float* d, int lane_shift, bool skip_wait) {
  T* a_tile = shared_array<T[16 * 16], __LINE__>();
  T* bt_tile = shared_array<T[8 * 16], __LINE__>();
  const int lane = threadIdx.x;
  cp_async_16(a_tile + 8 * lane, a + 8 * lane);  // 32 chunks of 8 values: one per lane
  if (lane < 16) cp_async_16(bt_tile + 8 * lane, bt + 8 * lane);
  cp_async_commit();
  if (!skip_wait) cp_async_wait<0>();
  block_sync();
  const int source = lane ^ lane_shift, matrix = source / 8, row = source % 8;
  uint32_t a_fragment[4], bt_rows[4], b_fragment[2];
  // A's matrices: rows 0-7 / 8-15 (matrix % 2) x columns 0-7 / 8-15 (matrix / 2).
  ldmatrix_x4<false>(a_fragment, a_tile + ((matrix % 2) * 8 + row) * 16 + (matrix / 2) * 8);
  // Bᵀ's: columns 0-7 and 8-15 of its 8 rows (matrices 2 and 3 repeat them).
  ldmatrix_x4<false>(bt_rows, bt_tile + row * 16 + (matrix % 2) * 8);
  b_fragment[0] = bt_rows[0];
  b_fragment[1] = bt_rows[1];
  const int g = lane / 4, t = lane % 4;
  float c_fragment[4], d_fragment[4];  // (g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)
  for (int i = 0; i < 4; ++i) c_fragment[i] = c[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2];
  mma_m16n8k16<T>(d_fragment, a_fragment, b_fragment, c_fragment);
  for (int i = 0; i < 4; ++i) d[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2] = d_fragment[i];
}

}  // namespace fusedlora
