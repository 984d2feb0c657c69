// Shared device code of the CUDA kernels: dtype conversions, the frozen weight's dequantization
// (docs/design.md §2) and the dropout hash (§3), bit-identical to fusedlora.dropout and to the
// Triton kernels. Torch builds with __CUDA_NO_{HALF,BFLOAT16}_CONVERSIONS__: convert explicitly.
#pragma once

#include <cstdint>

#include "device.cuh"
#include "types.h"

namespace fusedlora {

// ceil(p / q) for positive q.
__host__ __device__ inline int64_t cdiv(int64_t p, int64_t q) { return (p + q - 1) / q; }

// Whether `pointer` is a multiple of `bytes` (host and device: the launchers' rules, the kernels' paths).
__host__ __device__ inline bool aligned_to(const void* pointer, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(pointer) % bytes == 0;
}

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// operand[row, column] as fp32, by the operand's run-time dtype.
__device__ __forceinline__ float load_float(const Operand& operand, int64_t row, int64_t column) {
  const int64_t index = row * operand.stride + column;
  if (operand.type == kFloat16) return __half2float(static_cast<const __half*>(operand.data)[index]);
  if (operand.type == kBFloat16) return __bfloat162float(static_cast<const __nv_bfloat16*>(operand.data)[index]);
  return static_cast<const float*>(operand.data)[index];
}

// operand[row, column] = value, rounded to the operand's dtype.
__device__ __forceinline__ void store_float(const Operand& operand, int64_t row, int64_t column, float value) {
  const int64_t index = row * operand.stride + column;
  void* data = const_cast<void*>(operand.data);
  if (operand.type == kFloat16) {
    static_cast<__half*>(data)[index] = __float2half_rn(value);
  } else if (operand.type == kBFloat16) {
    static_cast<__nv_bfloat16*>(data)[index] = __float2bfloat16_rn(value);
  } else {
    static_cast<float*>(data)[index] = value;
  }
}

// The 16 values of the 4-bit codes (bitsandbytes' tables; FP4 code 8 is +0.0).
__constant__ float kNf4Code[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};
__constant__ float kFp4Code[16] = {
    0.0f, 0.0625f / 12.0f, 8.0f / 12.0f, 12.0f / 12.0f, 4.0f / 12.0f, 6.0f / 12.0f, 2.0f / 12.0f, 3.0f / 12.0f,
    0.0f, -0.0625f / 12.0f, -8.0f / 12.0f, -12.0f / 12.0f, -4.0f / 12.0f, -6.0f / 12.0f, -2.0f / 12.0f, -3.0f / 12.0f};

// The absmax block of 4-bit element `index`: a shift, the blocksize being a power of two (lora_ops.cpp checks).
__device__ __forceinline__ int64_t block_of(const WeightView& w, int64_t index) {
  return index >> (__ffsll(w.blocksize) - 1);
}

// The absmax of a block, stored as fp32 or NESTED (a uint8 code into nested_code per block, scaled
// per 256 blocks and offset).
template <bool NESTED>
__device__ __forceinline__ float block_absmax(const WeightView& w, int64_t block) {
  if constexpr (NESTED) {
    const uint8_t code = static_cast<const uint8_t*>(w.scale)[block];
    return w.nested_code[code] * w.nested_absmax[block / 256] + *w.nested_offset;
  }
  return static_cast<const float*>(w.scale)[block];
}

__device__ __forceinline__ float block_absmax(const WeightView& w, int64_t block) {
  return w.nested ? block_absmax<true>(w, block) : block_absmax<false>(w, block);
}

// W[n, k] as fp32 for weight format FMT; for int8 / fp8 without the per-row scale (see row_scale).
template <int FMT>
__device__ __forceinline__ float weight_value(const WeightView& w, int64_t n, int64_t k) {
  if constexpr (FMT == kNf4 || FMT == kFp4) {
    const int64_t index = n * w.k + k;
    const uint8_t byte = static_cast<const uint8_t*>(w.data)[index >> 1];
    const int code = (index & 1) ? (byte & 0xF) : (byte >> 4);
    const float value = FMT == kNf4 ? kNf4Code[code] : kFp4Code[code];
    return value * block_absmax(w, block_of(w, index));
  } else if constexpr (FMT == kInt8) {
    return static_cast<float>(static_cast<const int8_t*>(w.data)[n * w.stride_n + k]);
  } else if constexpr (FMT == kFp8) {
    return static_cast<float>(static_cast<const __nv_fp8_e4m3*>(w.data)[n * w.stride_n + k]);
  } else {
    return load_float(Operand{w.data, w.dense_type, w.stride_n}, n, k);
  }
}

// The per-row factor of int8 (SCB · (1/127)) and fp8 (scale); 1 for the other formats.
template <int FMT>
__device__ __forceinline__ float row_scale(const WeightView& w, int64_t n) {
  if constexpr (FMT == kInt8) return static_cast<const float*>(w.scale)[n] * (1.0f / 127.0f);
  if constexpr (FMT == kFp8) return static_cast<const float*>(w.scale)[n];
  return 1.0f;
}

// Dropout: keep(i) = fmix32((lo32(i)·0x9E3779B1) ^ (hi32(i)·0x85EBCA77) ^ seed) >= threshold.
__device__ __forceinline__ uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

__device__ __forceinline__ bool kept(const Dropout& d, int64_t row, int64_t col, int64_t cols) {
  if (!d.active) return true;
  const uint64_t index = static_cast<uint64_t>(row * cols + col);
  const uint32_t h = fmix32((static_cast<uint32_t>(index) * 0x9E3779B1u) ^
                            (static_cast<uint32_t>(index >> 32) * 0x85EBCA77u) ^ d.seed);
  return static_cast<uint64_t>(h) >= d.threshold;
}

__device__ __forceinline__ float dropped(const Dropout& d, float value, int64_t row, int64_t col, int64_t cols) {
  if (!d.active) return value;
  return kept(d, row, col, cols) ? value * d.keep_scale : 0.0f;
}

}  // namespace fusedlora
