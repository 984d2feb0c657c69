// The small-M forward (M <= kSmallMMaxRows, as in generation) in one launch, bound by the weight
// bytes (docs/design.md §4, "small M"):
//   y (M, N) = x · deq(W)ᵀ · row_scale + bias + s · u · Bᵀ,   u (M, r) = drop(x) · Aᵀ.
// Block (g, s) takes the kColumns columns of group g and the s-th slice of K (slice_steps steps
// of kLanesPerColumn 16-byte chunks): it stages its slice of x in shared memory as fp32, then each
// warp streams 32 columns, 8 lanes per column reading 128 contiguous bytes per step, each lane 8
// columns 4 apart with its x chunk held in registers for all 8 (one row) and the 8 loads issued
// before any is decoded. A 4-bit chunk is decoded through a 256-entry byte-pair table and its
// absmax scales its sum, not each weight. The 8 lanes of a column then meet in a transposed sum
// that leaves each lane one column. The block also sums its slice of u. With several slices, each
// block writes its sums to `partial` and `u_partial` and the last block of a group to arrive (a
// counter per group, left zero) adds them up in slice order, so the result does not depend on
// which block is last; that block writes y, and group 0's writes u in its dtype. No tensor cores:
// at M <= 4 the FMAs are far from the limit, the memory system is the limit.

#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <limits>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

#include "common.cuh"
#include "dispatch.cuh"
#include "kernels.h"
#include "small_m.cuh"

namespace fusedlora {
namespace {

constexpr int kWarps = 8;
constexpr int kLanesPerColumn = 8;  // 8 x 16 bytes: a column's step is four whole 32-byte sectors
constexpr int kColumnsPerLane = 8;  // one per lane of its column, for the transposed sum
constexpr int kMaxSliceSteps = 4;
constexpr int kMaxRank = 256;
constexpr int kChunkBytes = 16;
constexpr int kSkew = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kColumnStride = 32 / kLanesPerColumn;                // a lane's columns are this far apart
constexpr int kColumns = kWarps * kColumnStride * kColumnsPerLane;  // 256 per block
static_assert(kColumnsPerLane == kLanesPerColumn, "the transposed sum leaves each lane of a column one column");

template <int FMT>
constexpr int chunk_elements() {  // weights per 16 bytes
  return FMT == kNf4 || FMT == kFp4 ? 32 : 16;
}

// Where x's slice element i lives in shared memory: kSkew floats after each chunk.
template <int CHUNK>
__device__ __forceinline__ int skewed(int i) {
  return i / CHUNK * (CHUNK + kSkew) + i % CHUNK;
}

__device__ __forceinline__ uint32_t byte_of(const uint4& packed, int b) {
  const uint32_t word = b < 4 ? packed.x : b < 8 ? packed.y : b < 12 ? packed.z : packed.w;
  return (word >> (8 * (b % 4))) & 0xFFu;
}

// A chunk's 16 bytes of W as fp32 weights, without the chunk's factor.
template <int FMT>
__device__ __forceinline__ void decode_chunk(const uint4& packed, const float (&pairs)[256][2],
                                             float (&weights)[chunk_elements<FMT>()]) {
  if constexpr (FMT == kFp8) {  // two at a time: one unpacking conversion per pair on sm_89+
#pragma unroll
    for (int h = 0; h < 8; ++h) {
      __nv_fp8x2_e4m3 pair;
      pair.__x = static_cast<__nv_fp8x2_storage_t>(byte_of(packed, 2 * h) | byte_of(packed, 2 * h + 1) << 8);
      const float2 values = static_cast<float2>(pair);
      weights[2 * h] = values.x;
      weights[2 * h + 1] = values.y;
    }
  } else {
#pragma unroll
    for (int b = 0; b < 16; ++b) {
      const uint32_t byte = byte_of(packed, b);
      if constexpr (FMT == kNf4 || FMT == kFp4) {
        weights[2 * b] = pairs[byte][0];
        weights[2 * b + 1] = pairs[byte][1];
      } else {
        weights[b] = static_cast<float>(static_cast<int8_t>(byte));
      }
    }
  }
}

template <int FMT>
__device__ __forceinline__ const uint4* chunk_address(const WeightView& w, int64_t n, int64_t k) {
  const auto* data = static_cast<const uint8_t*>(w.data);
  if constexpr (FMT == kNf4 || FMT == kFp4) return reinterpret_cast<const uint4*>(data + (n * w.k + k) / 2);
  return reinterpret_cast<const uint4*>(data + n * w.stride_n + k);
}

// The factor of a chunk in absmax block `block` of W: a 4-bit chunk's absmax (the launcher checked
// that a chunk lies in one block), else 1.
template <int FMT>
__device__ __forceinline__ float chunk_factor(const WeightView& w, uint32_t block) {
  if constexpr (FMT == kNf4 || FMT == kFp4) return block_absmax(w, block);
  return 1.0f;
}

// Σ_i weights[i] · x[i] (x in shared memory).
template <int COUNT>
__device__ __forceinline__ float dot(const float (&weights)[COUNT], const float* x) {
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < COUNT; ++i) sum = fmaf(weights[i], x[i], sum);
  return sum;
}

// Sums v over the COUNT lanes of a column (lanes xor 1, 2, .. COUNT / 2), transposed: afterwards lane
// `part` of them holds the sum of their v[part]. Each step keeps half the values and trades the other half.
template <int COUNT>
__device__ __forceinline__ float transposed_sum(float (&v)[COUNT], int part) {
#pragma unroll
  for (int half = COUNT / 2; half >= 1; half /= 2) {
    const bool upper = part & half;
#pragma unroll
    for (int i = 0; i < half; ++i) {
      const float kept = upper ? v[i + half] : v[i];
      const float given = upper ? v[i] : v[i + half];
      v[i] = kept + warp_shfl_xor(given, half);
    }
  }
  return v[0];
}

// ROWS: the rows the loops are unrolled for (1, or kSmallMMaxRows for 2..4), so that one row
// keeps its x chunk in registers and does not issue the other rows' predicated-off work.
// VECTORIZED: W is read in 16-byte chunks (the launcher checked the layout), else weight by weight.
// lora_a.data null: no LoRA term (u is written as zeros). Grid: (groups, slices).
template <int FMT, int ROWS, bool VECTORIZED>
__global__ void __launch_bounds__(kThreads)
    small_m_kernel(Operand x, WeightView w, Operand lora_a, Operand lora_b, Operand bias, float scaling,
                   Dropout dropout, Operand y, Operand u, float* __restrict__ partial, float* __restrict__ u_partial,
                   int* __restrict__ counters, int rows, int64_t columns, int64_t k, int rank, int slice_steps) {
  constexpr int kChunk = chunk_elements<FMT>();
  constexpr int kStep = kLanesPerColumn * kChunk;
  // x's slice, each chunk followed by 4 unused floats: the 8 lanes of a column read chunks that
  // are then 16 bytes apart in the banks, not 128 (one bank group, 8 ways conflicted).
  constexpr int kSkewedLength = kMaxSliceSteps * kStep / kChunk * (kChunk + kSkew);
  auto& xs = shared_array<float[ROWS][kSkewedLength], __LINE__>();
  auto& u_sums = shared_array<float[ROWS][kMaxRank], __LINE__>();
  auto& pairs = shared_array<float[256][2], __LINE__>();  // each byte's two 4-bit codes: one 8-byte lookup
  auto& last_block = shared_array<int[1], __LINE__>();
  const int64_t group = blockIdx.x, slice = blockIdx.y;
  const int slices = static_cast<int>(gridDim.y);
  const int64_t k_begin = slice * slice_steps * kStep;
  const int length = static_cast<int>(min(static_cast<int64_t>(slice_steps) * kStep, k - k_begin));
  for (int i = threadIdx.x; i < rows * length; i += kThreads) {
    const int m = i / length, column = i % length;
    xs[m][skewed<kChunk>(column)] = load_float(x, m, k_begin + column);
  }
  if constexpr (FMT == kNf4 || FMT == kFp4) {
    const float* table = FMT == kNf4 ? kNf4Code : kFp4Code;
    for (int byte = threadIdx.x; byte < 256; byte += kThreads) {
      pairs[byte][0] = table[byte >> 4];
      pairs[byte][1] = table[byte & 0xF];
    }
  }
  block_sync();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int part = lane % kLanesPerColumn;  // which 16 bytes of a column's step
  const int64_t first = group * kColumns + warp * (kColumnStride * kColumnsPerLane) + lane / kLanesPerColumn;
  float acc[ROWS][kColumnsPerLane] = {};
  if constexpr (VECTORIZED) {
    // Each column's first chunk as a byte pointer into W, and (4-bit) its row's first absmax block:
    // rows hold whole blocks and the blocks are counted in 32 bits (the launcher checked both). A
    // ragged group's columns past N reread its last row, their sums unused.
    const uint8_t* chunk_of[kColumnsPerLane];
    uint32_t row_block_of[kColumnsPerLane];
    const int shift = __ffsll(w.blocksize) - 1;
#pragma unroll
    for (int c = 0; c < kColumnsPerLane; ++c) {
      const int64_t n = min(first + c * kColumnStride, columns - 1);
      chunk_of[c] = reinterpret_cast<const uint8_t*>(chunk_address<FMT>(w, n, k_begin + part * kChunk));
      row_block_of[c] = static_cast<uint32_t>((n * k) >> shift);
    }
#pragma unroll 1  // one step per trip, as the cost model counts it (fusedlora/inspection/cuda.py)
    for (int step = 0; step < slice_steps; ++step) {
      const int offset = step * kStep + part * kChunk;  // in the slice
      if (offset >= length) break;                      // K is a multiple of the chunk: a chunk is whole or absent
      const int x_at = (step * kLanesPerColumn + part) * (kChunk + kSkew);  // skewed(offset), visibly 16-byte aligned
      uint4 packed[kColumnsPerLane];
      float factor[kColumnsPerLane];
#pragma unroll
      for (int c = 0; c < kColumnsPerLane; ++c) {  // all loads first
        packed[c] = *reinterpret_cast<const uint4*>(chunk_of[c]);
        chunk_of[c] += kChunkBytes * kLanesPerColumn;  // carried, not recomputed from n each step
        factor[c] = chunk_factor<FMT>(w, row_block_of[c] + (static_cast<uint32_t>(k_begin + offset) >> shift));
      }
      float x_chunk[ROWS == 1 ? kChunk : 1];
      if constexpr (ROWS == 1) {
#pragma unroll
        for (int i = 0; i < kChunk; ++i) x_chunk[i] = xs[0][x_at + i];
      }
#pragma unroll
      for (int c = 0; c < kColumnsPerLane; ++c) {
        float weights[kChunk];
        decode_chunk<FMT>(packed[c], pairs, weights);
        if constexpr (ROWS == 1) {
          acc[0][c] = fmaf(dot(weights, x_chunk), factor[c], acc[0][c]);
        } else {
#pragma unroll
          for (int m = 0; m < ROWS; ++m)
            if (m < rows) acc[m][c] = fmaf(dot(weights, &xs[m][x_at]), factor[c], acc[m][c]);
        }
      }
    }
  } else {  // any layout: each weight dequantized on its own, the columns not unrolled (code size)
    for (int step = 0; step < slice_steps; ++step) {
      const int offset = step * kStep + part * kChunk;
#pragma unroll 1
      for (int c = 0; c < kColumnsPerLane; ++c) {
        const int64_t n = first + c * kColumnStride;
        float sums[ROWS] = {};
        for (int i = offset; n < columns && i < min(offset + kChunk, length); ++i) {
          const float weight = weight_value<FMT>(w, n, k_begin + i);
#pragma unroll
          for (int m = 0; m < ROWS; ++m)
            if (m < rows) sums[m] = fmaf(weight, xs[m][skewed<kChunk>(i)], sums[m]);
        }
#pragma unroll
        for (int slot = 0; slot < kColumnsPerLane; ++slot)  // constant indices keep acc in registers
#pragma unroll
          for (int m = 0; m < ROWS; ++m)
            if (slot == c) acc[m][slot] += sums[m];
      }
    }
  }
  const int64_t n = first + part * kColumnStride;  // this lane's column after the transposed sum
  float value[ROWS];
#pragma unroll
  for (int m = 0; m < ROWS; ++m) value[m] = transposed_sum(acc[m], part);

  const bool has_lora = lora_a.data != nullptr;
  if (has_lora) {  // this slice's u: a warp per rank, the lanes along K
    for (int j = warp; j < rank; j += kWarps) {
      float sums[ROWS] = {};
      for (int i = lane; i < length; i += 32) {
        const float a = load_float(lora_a, j, k_begin + i);
#pragma unroll
        for (int m = 0; m < ROWS; ++m)
          if (m < rows) sums[m] = fmaf(dropped(dropout, xs[m][skewed<kChunk>(i)], m, k_begin + i, k), a, sums[m]);
      }
#pragma unroll
      for (int m = 0; m < ROWS; ++m) {
        for (int offset = 16; offset > 0; offset /= 2) sums[m] += warp_shfl_xor(sums[m], offset);
        if (lane == 0 && m < rows) u_sums[m][j] = sums[m];
      }
    }
  }
  block_sync();

  if (slices > 1) {
    float* u_part = u_partial + (group * slices + slice) * rows * rank;
#pragma unroll
    for (int m = 0; m < ROWS; ++m)
      if (m < rows && n < columns) partial[(slice * rows + m) * columns + n] = value[m];
    for (int i = threadIdx.x; has_lora && i < rows * rank; i += kThreads) u_part[i] = u_sums[i / rank][i % rank];
    if (!arrived_last(counters, group, slices, last_block[0])) return;
#pragma unroll
    for (int m = 0; m < ROWS; ++m) {
      value[m] = 0.0f;
      for (int s = 0; m < rows && n < columns && s < slices; ++s)
        value[m] += load_coherent(&partial[(s * rows + m) * columns + n]);
    }
    for (int i = threadIdx.x; has_lora && i < rows * rank; i += kThreads) {
      float sum = 0.0f;
      for (int s = 0; s < slices; ++s) sum += load_coherent(&u_partial[(group * slices + s) * rows * rank + i]);
      u_sums[i / rank][i % rank] = sum;
    }
    block_sync();
  }

  if (n < columns) {
    float lora[ROWS] = {};
    for (int j = 0; has_lora && j < rank; ++j) {
      const float b = load_float(lora_b, n, j);
#pragma unroll
      for (int m = 0; m < ROWS; ++m)
        if (m < rows) lora[m] = fmaf(u_sums[m][j], b, lora[m]);
    }
    const float scale = row_scale<FMT>(w, n), shift = bias.data ? load_float(bias, 0, n) : 0.0f;
#pragma unroll
    for (int m = 0; m < ROWS; ++m)
      if (m < rows) store_float(y, m, n, fmaf(value[m], scale, shift) + scaling * lora[m]);
  }
  for (int i = threadIdx.x; group == 0 && i < rows * rank; i += kThreads)
    store_float(u, i / rank, i % rank, has_lora ? u_sums[i / rank][i % rank] : 0.0f);
}

}  // namespace

Operand operand(const at::Tensor& t, at::Tensor& keep) {
  const auto type = t.scalar_type();
  keep = type == at::kFloat || type == at::kHalf || type == at::kBFloat16 ? t : t.to(at::kFloat);
  if (keep.stride(-1) != 1) keep = keep.contiguous();
  return Operand{keep.data_ptr(), type == at::kHalf ? kFloat16 : type == at::kBFloat16 ? kBFloat16 : kFloat32,
                 keep.dim() == 2 ? keep.stride(0) : 0};
}

SmallMOperands small_m_operands(const at::Tensor& x, const at::Tensor& lora_a, const at::Tensor& lora_b,
                                const at::Tensor& bias, const at::Tensor& y, const at::Tensor& u) {
  SmallMOperands operands;
  at::Tensor* kept = operands.kept;
  operands.x = operand(x, kept[0]);
  operands.lora_a = lora_a.defined() ? operand(lora_a, kept[1]) : Operand{};
  operands.lora_b = lora_a.defined() ? operand(lora_b, kept[2]) : Operand{};
  operands.bias = bias.defined() ? operand(bias, kept[3]) : Operand{};
  operands.u = operand(u, kept[4]);
  TORCH_CHECK(kept[4].data_ptr() == u.data_ptr(), "fusedlora: the CUDA small-M path takes fp32, fp16 or bf16 LoRA "
              "factors (u is written in their dtype, with unit column stride), got u of dtype ", u.scalar_type());
  operands.y = operand(y, kept[5]);
  TORCH_CHECK(kept[5].data_ptr() == y.data_ptr(), "fusedlora: y must be fp32, fp16 or bf16 with unit column stride");
  return operands;
}

// fp32 scratch for the partial sums (no initial values needed) and int32 counters (zero, and left
// zero by the kernel): one set per device and stream, grown on demand, so that a warm call
// allocates only its outputs (launches on one stream run in order). A call captured into a CUDA
// graph gets its own, zeroed inside the graph and kept for the life of the process: the graph's
// replays use them whatever eager calls do to the shared set.
Scratch split_k_scratch(const at::Tensor& like, int64_t floats, int64_t counters) {
  static std::mutex mutex;
  static std::map<std::pair<int64_t, int64_t>, Scratch> shared;
  static std::vector<Scratch> captured;
  const std::lock_guard<std::mutex> lock(mutex);
  const bool capturing = like.is_cuda() && stream_capturing();
  Scratch fresh;
  Scratch& scratch = capturing ? fresh : shared[{like.device().index(), like.is_cuda() ? current_stream_id() : 0}];
  if (!scratch.partials.defined() || scratch.partials.numel() < floats)
    scratch.partials = at::empty({floats}, like.options().dtype(at::kFloat));
  if (!scratch.counters.defined() || scratch.counters.numel() < counters)
    scratch.counters = at::zeros({counters}, like.options().dtype(at::kInt));
  if (capturing) captured.push_back(scratch);
  return scratch;  // the caller's references keep these alive until its launch, whatever another thread grows
}

SplitK split_k(const at::Tensor& like, int64_t steps, int64_t slice_steps, int64_t rows, int64_t columns,
               int64_t groups, int64_t rank) {
  SplitK split{cdiv(steps, slice_steps), Scratch{}, nullptr, nullptr, nullptr};
  TORCH_CHECK(split.slices <= 65535, "fusedlora: K is too long for the CUDA small-M kernels (", split.slices,
              " slices)");
  if (split.slices > 1) {
    split.scratch = split_k_scratch(like, split.slices * rows * (columns + groups * rank), groups);
    split.partial = split.scratch.partials.data_ptr<float>();
    split.u_partial = split.partial + split.slices * rows * columns;
    split.counters = split.scratch.counters.data_ptr<int>();
  }
  return split;
}

int64_t small_m_slice_steps(int64_t columns, int64_t steps, int64_t sm_count) {
  const int64_t wanted_slices = cdiv(4 * sm_count, std::max<int64_t>(1, cdiv(columns, kColumns)));
  return std::clamp<int64_t>(cdiv(steps, wanted_slices), 1, kMaxSliceSteps);
}

void launch_forward_small_m(const at::Tensor& x, const WeightView& w, const at::Tensor& lora_a,
                            const at::Tensor& lora_b, const at::Tensor& bias, double scaling, const Dropout& dropout,
                            at::Tensor& y, at::Tensor& u) {
  const int64_t rows = x.size(0), k = x.size(1), columns = y.size(1), rank = u.size(1);
  TORCH_CHECK(rows <= kSmallMMaxRows, "fusedlora: the small-M kernel takes at most ", kSmallMMaxRows, " rows, got ",
              rows);
  TORCH_CHECK(rank <= kMaxRank, "fusedlora: the CUDA backend takes a LoRA rank of at most ", kMaxRank, ", got ", rank);
  if (rows == 0) return;
  // The chunked paths read 16 bytes of W at a time from a multiple of 16 (32 four-bit weights, 16
  // eight-bit ones), 4-bit rows holding whole absmax blocks; otherwise the any-layout path.
  const bool four_bit = w.fmt == kNf4 || w.fmt == kFp4;
  const int64_t chunk = four_bit ? 32 : 16;
  const bool vectorized = w.fmt != kDense && columns > 0 && aligned_to(w.data, 16) && k % chunk == 0 &&
                          (four_bit ? w.blocksize % 32 == 0 && k % w.blocksize == 0 &&
                                          columns * k / w.blocksize <= std::numeric_limits<uint32_t>::max()
                                    : w.stride_n % 16 == 0);
  const SmallMOperands operands = small_m_operands(x, lora_a, lora_b, bias, y, u);
  const int64_t groups = std::max<int64_t>(1, cdiv(columns, kColumns));
  const int64_t steps = std::max<int64_t>(1, cdiv(k, chunk * kLanesPerColumn));
  const int64_t slice_steps = small_m_slice_steps(columns, steps, multiprocessor_count());
  const SplitK split = split_k(x, steps, slice_steps, rows, columns, groups, rank);
  const dim3 grid(static_cast<unsigned>(groups), static_cast<unsigned>(split.slices));
  dispatch_format(w.fmt, [&](auto fmt) {
    constexpr int kFmt = decltype(fmt)::value;
    auto kernel = rows == 1 ? small_m_kernel<kFmt, 1, false> : small_m_kernel<kFmt, kSmallMMaxRows, false>;
    if constexpr (kFmt != kDense) {
      if (vectorized) kernel = rows == 1 ? small_m_kernel<kFmt, 1, true> : small_m_kernel<kFmt, kSmallMMaxRows, true>;
    }
    launch(kernel, grid, dim3(kThreads), operands.x, w, operands.lora_a, operands.lora_b, operands.bias,
           static_cast<float>(scaling), dropout, operands.y, operands.u, split.partial, split.u_partial,
           split.counters, static_cast<int>(rows), columns, k, static_cast<int>(rank), static_cast<int>(slice_steps));
  });
}

}  // namespace fusedlora
