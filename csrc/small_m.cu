// The small-M forward (M <= kSmallMMaxRows, as in generation), bound by the weight bytes: one warp per output
// column n streams row n of W once, 16 bytes per lane per step where the row is aligned (4-bit,
// int8, fp8; x aligned too), dequantizing a chunk in registers once for every row of x, whose
// chunk is read once by 16-byte loads; a 4-bit chunk's absmax scales its sum, not each weight.
// The lanes then reduce, and lane m writes y[m, n] with the row scale, the bias and the LoRA term
// s·u[m]·B[n]. No tensor cores: at M <= 4 the FMAs are far from the limit, the memory system is
// the limit.

#include "common.cuh"
#include "dispatch.cuh"
#include "kernels.h"

namespace fusedlora {
namespace {

constexpr int kWarps = 8;

__device__ __forceinline__ uint32_t byte_of(const uint32_t (&words)[4], int b) {
  return (words[b / 4] >> (8 * (b % 4))) & 0xFFu;
}

template <int ROWS, typename T>
__device__ __forceinline__ void accumulate(float (&acc)[kSmallMMaxRows], float weight, const T* __restrict__ x,
                                           int64_t ld_x, int64_t k, int rows) {
#pragma unroll
  for (int m = 0; m < ROWS; ++m)
    if (m < rows) acc[m] = fmaf(weight, to_float(x[m * ld_x + k]), acc[m]);
}

// x[k0 .. k0 + COUNT) of one row as fp32, by 16-byte loads (the launcher checked x's alignment).
template <int COUNT, typename T>
__device__ __forceinline__ void load_x(const T* __restrict__ row, float (&out)[COUNT]) {
  constexpr int kPerVector = 16 / sizeof(T);
#pragma unroll
  for (int v = 0; v < COUNT / kPerVector; ++v) {
    const uint4 bits = *reinterpret_cast<const uint4*>(row + v * kPerVector);
    const T* values = reinterpret_cast<const T*>(&bits);
#pragma unroll
    for (int i = 0; i < kPerVector; ++i) out[v * kPerVector + i] = to_float(values[i]);
  }
}

// acc[m] += factor · Σ_i weights[i] · x[m, k0 + i] for the rows m < rows: each row's x read once per
// chunk, the weights decoded once for every row; the chunk's factor (its absmax) scales the sum.
template <int COUNT, int ROWS, typename T>
__device__ __forceinline__ void accumulate_chunk(float (&acc)[kSmallMMaxRows], const float (&weights)[COUNT],
                                                 float factor, const T* __restrict__ x, int64_t ld_x, int64_t k0,
                                                 int rows) {
#pragma unroll
  for (int m = 0; m < ROWS; ++m) {
    if (m < rows) {
      float xs[COUNT];
      load_x(x + m * ld_x + k0, xs);
      float sum = 0.0f;
#pragma unroll
      for (int i = 0; i < COUNT; ++i) sum = fmaf(weights[i], xs[i], sum);
      acc[m] = fmaf(sum, factor, acc[m]);
    }
  }
}

// ROWS: the rows the loops are unrolled for (1, or kSmallMMaxRows for 2..4), so that one row does
// not issue the others' predicated-off loads and FMAs.
template <typename T, int FMT, int ROWS>
__global__ void __launch_bounds__(kWarps * 32)
    small_m_kernel(const T* __restrict__ x, int64_t ld_x, WeightView w, bool vectorized,
                   const float* __restrict__ u, int64_t ld_u, const float* __restrict__ lora_b, int64_t ld_b, int rank,
                   const float* __restrict__ bias, float scaling, T* __restrict__ y, int64_t ld_y, int rows,
                   int64_t columns, int64_t k) {
  // The 4-bit codes of every byte value, (high nibble, low nibble): one 8-byte shared-memory lookup
  // decodes a byte (divergent lookups are cheap in shared memory).
  auto& pairs = shared_array<float[256][2], __LINE__>();
  if constexpr (FMT == kNf4 || FMT == kFp4) {
    const float* table = FMT == kNf4 ? kNf4Code : kFp4Code;
    for (int byte = threadIdx.x; byte < 256; byte += kWarps * 32) {
      pairs[byte][0] = table[byte >> 4];
      pairs[byte][1] = table[byte & 0xF];
    }
    block_sync();
  }
  const int lane = threadIdx.x % 32;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (n >= columns) return;
  float acc[kSmallMMaxRows] = {};
  if ((FMT == kNf4 || FMT == kFp4) && vectorized) {  // 32 weights per 16 bytes, one absmax block per chunk
    const uint8_t* row = static_cast<const uint8_t*>(w.data) + n * k / 2;
#pragma unroll 1  // one chunk per trip, as the cost model counts it (fusedlora/inspection/cuda.py)
    for (int64_t chunk = lane; chunk < k / 32; chunk += 32) {
      const uint4 packed = *reinterpret_cast<const uint4*>(row + chunk * 16);
      const uint32_t words[4] = {packed.x, packed.y, packed.z, packed.w};
      float codes[32];
#pragma unroll
      for (int b = 0; b < 16; ++b) {
        const uint32_t byte = byte_of(words, b);
        codes[2 * b] = pairs[byte][0];
        codes[2 * b + 1] = pairs[byte][1];
      }
      const int64_t k0 = chunk * 32;
      accumulate_chunk<32, ROWS>(acc, codes, block_absmax(w, block_of(w, n * k + k0)), x, ld_x, k0, rows);
    }
  } else if ((FMT == kInt8 || FMT == kFp8) && vectorized) {  // 16 weights per 16 bytes
    const uint8_t* row = static_cast<const uint8_t*>(w.data) + n * w.stride_n;
#pragma unroll 1
    for (int64_t chunk = lane; chunk < k / 16; chunk += 32) {
      const uint4 packed = *reinterpret_cast<const uint4*>(row + chunk * 16);
      const uint32_t words[4] = {packed.x, packed.y, packed.z, packed.w};
      float weights[16];
#pragma unroll
      for (int b = 0; b < 16; ++b) {
        const uint32_t byte = byte_of(words, b);
        if constexpr (FMT == kInt8) {
          weights[b] = static_cast<float>(static_cast<int8_t>(byte));
        } else {
          __nv_fp8_e4m3 value;
          value.__x = static_cast<__nv_fp8_storage_t>(byte);
          weights[b] = static_cast<float>(value);
        }
      }
      accumulate_chunk<16, ROWS>(acc, weights, 1.0f, x, ld_x, chunk * 16, rows);
    }
  } else {  // any layout: lanes take consecutive elements (coalesced), dequantized one by one
    for (int64_t kk = lane; kk < k; kk += 32) accumulate<ROWS>(acc, weight_value<FMT>(w, n, kk), x, ld_x, kk, rows);
  }
#pragma unroll
  for (int m = 0; m < ROWS; ++m)
    for (int offset = 16; offset > 0; offset /= 2) acc[m] += warp_shfl_xor(acc[m], offset);
  float mine = 0.0f;  // lane m keeps row m (constant indices keep acc in registers)
#pragma unroll
  for (int m = 0; m < ROWS; ++m)
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
  // The chunked paths read 16 bytes of W and of each row of x at a time (16 or 32 elements from
  // a multiple of 16): W, x and x's rows (when there are several) 16-byte aligned; otherwise the
  // any-layout path.
  bool vectorized = aligned16(w.data) && aligned16(x.data_ptr()) &&
                    (rows == 1 || (x.stride(0) * x.element_size()) % 16 == 0);
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
      constexpr int kFmt = decltype(fmt)::value;
      const auto kernel = rows == 1 ? small_m_kernel<T, kFmt, 1> : small_m_kernel<T, kFmt, kSmallMMaxRows>;
      launch(kernel, grid, dim3(kWarps * 32), reinterpret_cast<const T*>(x.data_ptr<scalar_t>()), x.stride(0),
             w, vectorized, u_ptr, ld_u, b_ptr, ld_b, rank, bias_ptr, static_cast<float>(scaling),
             reinterpret_cast<T*>(y.data_ptr<scalar_t>()), y.stride(0), static_cast<int>(rows), columns, k);
    });
  });
}

}  // namespace fusedlora
