// A row's weights in chunks of 16 consecutive elements, as the tensor-core kernels and the
// dequantization into a workspace read them (csrc/small_m_mma.cu, csrc/gemm_mma.cu,
// csrc/dequantize.cu): loaded whole (4-bit: 8 bytes, 8-bit: 16, 16-bit: 32), then turned into 8
// pairs of 16-bit values, the layout of mma.sync's operands (docs/design.md §4).
#pragma once

#include <cstdint>

#include "common.cuh"

namespace fusedlora {

constexpr int kChunkElements = 16;

// Whether an int8, fp8 or dense W can be read in whole chunks (load_codes' 16-byte loads) against
// 16-bit x of DenseType `x_type`: rows 16-byte aligned, a dense W in x's dtype. 4-bit W: each
// kernel's own rule (its chunks' alignment, its absmax blocks).
inline bool byte_chunks_readable(const WeightView& w, int x_type) {
  if (w.fmt == kInt8 || w.fmt == kFp8) return aligned_to(w.data, 16) && w.stride_n % 16 == 0;
  return w.fmt == kDense && w.dense_type == x_type && aligned_to(w.data, 16) && w.stride_n % 8 == 0;
}

template <int FMT>
constexpr bool four_bit() {
  return FMT == kNf4 || FMT == kFp4;
}

// Bytes of `elements` consecutive weights of a row (dense: 16-bit values).
template <int FMT>
__device__ __forceinline__ int64_t weight_bytes(int64_t elements) {
  return four_bit<FMT>() ? elements / 2 : FMT == kDense ? elements * 2 : elements;
}

// 16 weights of a row as loaded: 8, 16 or 32 bytes.
template <int FMT>
struct Codes {
  uint32_t words[four_bit<FMT>() ? 2 : FMT == kDense ? 8 : 4];
};

template <int FMT>
__device__ __forceinline__ Codes<FMT> load_codes(const uint8_t* at) {
  Codes<FMT> codes;
  if constexpr (four_bit<FMT>()) {
    const uint2 packed = *reinterpret_cast<const uint2*>(at);
    codes.words[0] = packed.x;
    codes.words[1] = packed.y;
  } else {
#pragma unroll
    for (int i = 0; i < static_cast<int>(sizeof(codes.words)) / 16; ++i) {
      const uint4 packed = reinterpret_cast<const uint4*>(at)[i];
      codes.words[4 * i] = packed.x;
      codes.words[4 * i + 1] = packed.y;
      codes.words[4 * i + 2] = packed.z;
      codes.words[4 * i + 3] = packed.w;
    }
  }
  return codes;
}

// The 16 weights as 8 pairs of T (weights 2p and 2p + 1 in pairs[p]), without the chunk's factor.
template <int FMT, typename T>
__device__ __forceinline__ void to_pairs(const Codes<FMT>& codes, const uint32_t (&table)[256], uint32_t (&pairs)[8]) {
#pragma unroll
  for (int p = 0; p < 8; ++p) {
    if constexpr (four_bit<FMT>()) {  // byte p holds weights 2p (high nibble) and 2p + 1
      pairs[p] = table[(codes.words[p / 4] >> (8 * (p % 4))) & 0xFFu];
    } else if constexpr (FMT == kDense) {
      pairs[p] = codes.words[p];
    } else {
      const uint32_t two = (codes.words[p / 2] >> (16 * (p % 2))) & 0xFFFFu;
      if constexpr (FMT == kInt8) {
        pairs[p] = pack_pair<T>(static_cast<float>(static_cast<int8_t>(two & 0xFFu)),
                                static_cast<float>(static_cast<int8_t>(two >> 8)));
      } else {
        __nv_fp8x2_e4m3 fp8;
        fp8.__x = static_cast<__nv_fp8x2_storage_t>(two);
        const float2 values = static_cast<float2>(fp8);
        pairs[p] = pack_pair<T>(values.x, values.y);
      }
    }
  }
}

// The 256-entry pair table of a 4-bit format: byte b's two codes (high nibble first) as a pair
// of T. Filled by the block's `threads` threads; the caller synchronizes before reading it.
template <int FMT, typename T>
__device__ __forceinline__ void fill_pair_table(uint32_t (&table)[256], int threads) {
  const float* code = FMT == kNf4 ? kNf4Code : kFp4Code;
  for (int byte = threadIdx.x; byte < 256; byte += threads) table[byte] = pack_pair<T>(code[byte >> 4], code[byte & 0xF]);
}

// A run: 32 consecutive weights of a row (two chunks; 4-bit: one 16-byte load), as loaded, and
// their factor (absmax or row scale).
constexpr int kRunChunks = 2;
constexpr int kRunElements = kRunChunks * kChunkElements;

template <int FMT>
struct WeightRun {
  Codes<FMT> chunks[kRunChunks];
  float factor;
};

// The run at `at` (16-byte aligned) and its factor.
template <int FMT>
__device__ __forceinline__ WeightRun<FMT> load_run(const uint8_t* at, float factor) {
  WeightRun<FMT> run;
  if constexpr (four_bit<FMT>()) {  // both chunks in one 16-byte load
    const uint4 packed = *reinterpret_cast<const uint4*>(at);
    run.chunks[0] = Codes<FMT>{{packed.x, packed.y}};
    run.chunks[1] = Codes<FMT>{{packed.z, packed.w}};
  } else {
#pragma unroll
    for (int c = 0; c < kRunChunks; ++c) run.chunks[c] = load_codes<FMT>(at + weight_bytes<FMT>(c * kChunkElements));
  }
  run.factor = factor;
  return run;
}

// The run as 16 pairs of T times its factor, into `destination` (shared or global, 16-byte
// aligned) in four 16-byte stores.
template <typename T, int FMT>
__device__ __forceinline__ void store_run(const WeightRun<FMT>& run, const uint32_t (&table)[256], T* destination) {
  const uint32_t factor = pack_pair<T>(run.factor, run.factor);
#pragma unroll
  for (int c = 0; c < kRunChunks; ++c) {
    uint32_t pairs[8];
    to_pairs<FMT, T>(run.chunks[c], table, pairs);
#pragma unroll
    for (int p = 0; p < 8 && FMT != kDense; ++p) pairs[p] = mul_pairs<T>(pairs[p], factor);
    auto* out = reinterpret_cast<uint4*>(destination + c * kChunkElements);
    out[0] = uint4{pairs[0], pairs[1], pairs[2], pairs[3]};
    out[1] = uint4{pairs[4], pairs[5], pairs[6], pairs[7]};
  }
}

}  // namespace fusedlora
