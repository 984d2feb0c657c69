// The device primitives the kernels use, each behind a small inline function (WMMA behind the
// `wmma` namespace): compiled by nvcc they are CUDA's own; compiled as host C++ with
// FUSEDLORA_HOST_EMULATION they are the CPU execution harness's (tests/emulation/, docs/design.md
// §6), which runs the kernels' unchanged source on the CPU. Nothing else in csrc/ differs between
// the two builds, so a kernel may use a CUDA primitive only through this header.
#pragma once

#ifdef FUSEDLORA_HOST_EMULATION
#include "emulated_device.h"  // on the harness's include path only
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <mma.h>

#include <cstdint>
#include <type_traits>
#include <utility>

namespace fusedlora {

namespace wmma = nvcuda::wmma;

// __syncthreads().
__device__ __forceinline__ void block_sync() { __syncthreads(); }

// The value of lane (this lane ^ offset), every lane of the warp taking part.
__device__ __forceinline__ float warp_shfl_xor(float value, int offset) {
  return __shfl_xor_sync(0xFFFFFFFFu, value, offset);
}

__device__ __forceinline__ void atomic_add(float* address, float value) { atomicAdd(address, value); }

// *address += value, atomically; the value before.
__device__ __forceinline__ int atomic_add(int* address, int value) { return atomicAdd(address, value); }

// __threadfence(): this thread's writes are seen by the whole device before any write it makes after.
__device__ __forceinline__ void thread_fence() { __threadfence(); }

// A load through L2 only (ld.global.cg): sees what other blocks wrote before their fence, however
// this SM's L1 was filled.
__device__ __forceinline__ float load_coherent(const float* address) { return __ldcg(address); }

// A statically allocated shared-memory object of type T (an array type, say), one per block.
// `Tag` makes each declaration its own variable: pass __LINE__.
template <typename T, int Tag>
__device__ __forceinline__ T& shared_array() {
  __shared__ __align__(32) T storage;  // 32 bytes: WMMA's pointer alignment
  return storage;
}

// Two floats as one 32-bit pair of T (__half or __nv_bfloat16), each rounded to nearest even,
// `low` in the low half: the register layout of mma.sync's 16-bit operands (F2FP.PACK_AB).
template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float low, float high) {
  uint32_t bits;
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    const __nv_bfloat162 pair = __floats2bfloat162_rn(low, high);
    memcpy(&bits, &pair, sizeof(bits));
  } else {
    const __half2 pair = __floats2half2_rn(low, high);
    memcpy(&bits, &pair, sizeof(bits));
  }
  return bits;
}

// `value`, hidden from the optimizer: a loop invariant it would otherwise recompute from threadIdx
// in every trip (rematerialize) stays in a register.
__device__ __forceinline__ int opaque(int value) {
  asm volatile("" : "+r"(value));
  return value;
}

// The two T values of `a` times those of `b`, each product rounded to nearest even (HMUL2): a
// pair of dequantized weights times their scale.
template <typename T>
__device__ __forceinline__ uint32_t mul_pairs(uint32_t a, uint32_t b) {
  uint32_t bits;
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    __nv_bfloat162 x, y;
    memcpy(&x, &a, sizeof(a));
    memcpy(&y, &b, sizeof(b));
    const __nv_bfloat162 product = __hmul2(x, y);
    memcpy(&bits, &product, sizeof(bits));
  } else {
    __half2 x, y;
    memcpy(&x, &a, sizeof(a));
    memcpy(&y, &b, sizeof(b));
    const __half2 product = __hmul2(x, y);
    memcpy(&bits, &product, sizeof(bits));
  }
  return bits;
}

// ---- The primitives of the tensor-core kernels (PTX, sm_80+), in PTX's documented layouts ----

// mma.sync.aligned.m16n8k16.row.col.f32.T.T.f32, T = __nv_bfloat16 or __half: d = a·b + c for the
// warp. With g = lane / 4 and t = lane % 4, a holds A (16x16) at rows {g, g+8} x columns
// {2t, 2t+1, 2t+8, 2t+9} (registers: (g, 2t..), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..)), b holds
// B (16x8) at rows {2t, 2t+1} and {2t+8, 2t+9} of column g, c and d hold C (16x8) at (g, 2t..) and
// (g+8, 2t..); each 32-bit register packs two 16-bit values, the lower-numbered one in its low half.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                             const float (&c)[4]) {
  if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%10,%11,%12,%13};\n"
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
                   "f"(c[3]));
  } else {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%10,%11,%12,%13};\n"
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
                   "f"(c[3]));
  }
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: four 8x8 matrices of 16-bit values from shared
// memory; lane l gives the (16-byte aligned) address of row l % 8 of matrix l / 8. Register j of
// lane l receives matrix j's (row l / 4, columns 2(l % 4), 2(l % 4) + 1), transposed with `Trans`.
template <bool Trans>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  const auto address = static_cast<uint32_t>(__cvta_generic_to_shared(row));
  if constexpr (Trans) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address) : "memory");
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(address) : "memory");
  }
}

// cp.async.cg.shared.global: 16 bytes from global to shared memory (both 16-byte aligned), or 16
// zero bytes without reading global memory when `source_bytes` is 0 (PTX's src-size; 16 or 0);
// complete only after a later cp_async_wait<N> leaves at most N younger committed groups pending.
// The "memory" clobbers keep the compiler from moving shared-memory accesses across them.
__device__ __forceinline__ void cp_async_16(void* shared_destination, const void* global_source,
                                            uint32_t source_bytes = 16) {
  const auto address = static_cast<uint32_t>(__cvta_generic_to_shared(shared_destination));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(global_source),
               "r"(source_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// ---- Host side ----

// The current device's SM count.
inline int multiprocessor_count() {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  return count;
}

// Whether the current stream is being captured into a CUDA graph.
inline bool stream_capturing() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

// The current stream's identity on the current device.
inline int64_t current_stream_id() { return c10::cuda::getCurrentCUDAStream().id(); }

// kernel<<<grid, block>>>(args...) on the current stream, the launch checked.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, Args&&... args) {
  kernel<<<grid, block, 0, c10::cuda::getCurrentCUDAStream()>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace fusedlora
#endif
