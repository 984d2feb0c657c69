// The small-M forward (M <= kSmallMMaxRows, as in generation), bound by the weight bytes: one warp per output
// column n streams row n of W once, 16 bytes per lane per step where the row is aligned (4-bit,
// int8, fp8), dequantizing in registers; the lanes then reduce, and lane m writes y[m, n] with
// the row scale, the bias and the LoRA term s·u[m]·B[n]. No tensor cores: at M <= 4 the FMAs
// are far from the limit, the memory system is the limit.

#include "common.cuh"
#include "dispatch.cuh"
#include "kernels.h"

namespace fusedlora {
namespace {

constexpr int kWarps = 8;

__device__ __forceinline__ uint32_t byte_of(const uint32_t (&words)[4], int b) {
  return (words[b / 4] >> (8 * (b % 4))) & 0xFFu;
}

template <typename T>
__device__ __forceinline__ void accumulate(float (&acc)[kSmallMMaxRows], float weight, const T* __restrict__ x,
                                           int64_t ld_x, int64_t k, int rows) {
#pragma unroll
  for (int m = 0; m < kSmallMMaxRows; ++m)
    if (m < rows) acc[m] = fmaf(weight, to_float(x[m * ld_x + k]), acc[m]);
}

template <typename T, int FMT>
__global__ void __launch_bounds__(kWarps * 32)
    small_m_kernel(const T* __restrict__ x, int64_t ld_x, WeightView w, bool vectorized, const float* __restrict__ u,
                   int64_t ld_u, const float* __restrict__ lora_b, int64_t ld_b, int rank,
                   const float* __restrict__ bias, float scaling, T* __restrict__ y, int64_t ld_y, int rows,
                   int64_t columns, int64_t k) {
  float* code = shared_array<float[16], __LINE__>();  // the 4-bit table: divergent lookups are cheap in shared memory
  if constexpr (FMT == kNf4 || FMT == kFp4) {
    if (threadIdx.x < 16) code[threadIdx.x] = FMT == kNf4 ? kNf4Code[threadIdx.x] : kFp4Code[threadIdx.x];
    block_sync();
  }
  const int lane = threadIdx.x % 32;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (n >= columns) return;
  float acc[kSmallMMaxRows] = {};
  if ((FMT == kNf4 || FMT == kFp4) && vectorized) {  // 32 weights per 16 bytes, one absmax block per chunk
    const uint8_t* row = static_cast<const uint8_t*>(w.data) + n * k / 2;
    for (int64_t chunk = lane; chunk < k / 32; chunk += 32) {
      const uint4 packed = *reinterpret_cast<const uint4*>(row + chunk * 16);
      const uint32_t words[4] = {packed.x, packed.y, packed.z, packed.w};
      const int64_t k0 = chunk * 32;
      const float absmax = block_absmax(w, block_of(w, n * k + k0));
#pragma unroll
      for (int b = 0; b < 16; ++b) {
        const uint32_t byte = byte_of(words, b);
        accumulate(acc, code[byte >> 4] * absmax, x, ld_x, k0 + 2 * b, rows);
        accumulate(acc, code[byte & 0xF] * absmax, x, ld_x, k0 + 2 * b + 1, rows);
      }
    }
  } else if ((FMT == kInt8 || FMT == kFp8) && vectorized) {  // 16 weights per 16 bytes
    const uint8_t* row = static_cast<const uint8_t*>(w.data) + n * w.stride_n;
    for (int64_t chunk = lane; chunk < k / 16; chunk += 32) {
      const uint4 packed = *reinterpret_cast<const uint4*>(row + chunk * 16);
      const uint32_t words[4] = {packed.x, packed.y, packed.z, packed.w};
#pragma unroll
      for (int b = 0; b < 16; ++b) {
        const uint32_t byte = byte_of(words, b);
        float weight;
        if constexpr (FMT == kInt8) {
          weight = static_cast<float>(static_cast<int8_t>(byte));
        } else {
          __nv_fp8_e4m3 value;
          value.__x = static_cast<__nv_fp8_storage_t>(byte);
          weight = static_cast<float>(value);
        }
        accumulate(acc, weight, x, ld_x, chunk * 16 + b, rows);
      }
    }
  } else {  // any layout: lanes take consecutive elements (coalesced), dequantized one by one
    for (int64_t kk = lane; kk < k; kk += 32) accumulate(acc, weight_value<FMT>(w, n, kk), x, ld_x, kk, rows);
  }
#pragma unroll
  for (int m = 0; m < kSmallMMaxRows; ++m)
    for (int offset = 16; offset > 0; offset /= 2) acc[m] += warp_shfl_xor(acc[m], offset);
  float mine = 0.0f;  // lane m keeps row m (constant indices keep acc in registers)
#pragma unroll
  for (int m = 0; m < kSmallMMaxRows; ++m)
    if (lane == m) mine = acc[m];
  if (lane < rows) {
    float value = mine * row_scale<FMT>(w, n) + (bias ? bias[n] : 0.0f);
    float lora = 0.0f;
    for (int j = 0; u != nullptr && j < rank; ++j) lora = fmaf(u[lane * ld_u + j], lora_b[n * ld_b + j], lora);
    y[lane * ld_y + n] = from_float<T>(value + scaling * lora);
  }
}

bool aligned16(const void* pointer) { return reinterpret_cast<uintptr_t>(pointer) % 16 == 0; }

}  // namespace

void launch_forward_small_m(const at::Tensor& x, const WeightView& w, const at::Tensor& u,
                            const at::Tensor& lora_b, const at::Tensor& bias, double scaling, at::Tensor& y) {
  const int64_t rows = x.size(0), k = x.size(1), columns = y.size(1);
  TORCH_CHECK(rows <= kSmallMMaxRows, "fusedlora: the small-M kernel takes at most ", kSmallMMaxRows, " rows, got ", rows);
  if (rows == 0 || columns == 0) return;
  bool vectorized = aligned16(w.data);
  if (w.fmt == kNf4 || w.fmt == kFp4) {
    vectorized = vectorized && k % 32 == 0 && w.blocksize % 32 == 0;
  } else if (w.fmt == kInt8 || w.fmt == kFp8) {
    vectorized = vectorized && k % 16 == 0 && w.stride_n % 16 == 0;
  } else {
    vectorized = false;
  }
  const float* u_ptr = u.defined() ? u.data_ptr<float>() : nullptr;
  const float* b_ptr = u.defined() ? lora_b.data_ptr<float>() : nullptr;
  const int64_t ld_u = u.defined() ? u.stride(0) : 0, ld_b = u.defined() ? lora_b.stride(0) : 0;
  const int rank = u.defined() ? static_cast<int>(u.size(1)) : 0;
  const float* bias_ptr = bias.defined() ? bias.data_ptr<float>() : nullptr;
  const dim3 grid(static_cast<unsigned>((columns + kWarps - 1) / kWarps));
  FUSEDLORA_DISPATCH_ACTIVATION(x.scalar_type(), "fusedlora_small_m", [&] {
    using T = typename CudaType<scalar_t>::type;
    dispatch_format(w.fmt, [&](auto fmt) {
      launch(small_m_kernel<T, decltype(fmt)::value>, grid, dim3(kWarps * 32),
             reinterpret_cast<const T*>(x.data_ptr<scalar_t>()), x.stride(0), w, vectorized, u_ptr, ld_u, b_ptr, ld_b,
             rank, bias_ptr, static_cast<float>(scaling), reinterpret_cast<T*>(y.data_ptr<scalar_t>()), y.stride(0),
             static_cast<int>(rows), columns, k);
    });
  });
}

}  // namespace fusedlora
