// The small-M forward on tensor cores: M <= kTensorSmallMMaxRows rows of fp16 or bf16 x against a
// weight read in whole chunks of 64 elements per row, in one launch (docs/design.md §4, "small M"):
//   y (M, N) = x · deq(W)ᵀ · row_scale + bias + s · u · Bᵀ,   u (M, r) = drop(x) · Aᵀ.
// Each warp computes a 16-column tile of yᵀ with mma.sync m16n8k16, W as the A operand (its 16
// rows are 16 columns of y) and x as the B operand (its 8 columns are rows of x: one instruction
// for M <= 8, two for M <= 16), so M = 1 wastes the least. The instruction's order along K is
// free, so each lane takes 16 consecutive weights of its two rows (4-bit: 8 bytes, 8-bit: 16,
// 16-bit: 32) and the matching 16 values of x from shared memory: no shuffles, no ldmatrix. The 4
// lanes of a row span 64 consecutive weights, within one absmax block (4-bit blocksize a multiple
// of 64), so the block's absmax scales the sum of the chunk's 4 instructions instead of each
// weight; 4-bit bytes become pairs of 16-bit values through a 256-entry table in shared memory.
// u's rank tiles are computed the same way, A in place of W (an A of another dtype split into a
// 16-bit value and its remainder, two instructions, so that fp32 factors keep their precision).
// Split over K as the FMA kernel is (csrc/small_m.cu): the last block of a column group adds up
// the slices.

#include <ATen/ops/empty.h>

#include <algorithm>
#include <type_traits>

#include "common.cuh"
#include "dispatch.cuh"
#include "kernels.h"
#include "small_m.cuh"
#include "weight_chunks.cuh"

namespace fusedlora {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kTile = 16;                    // columns of y per warp: the instruction's M
constexpr int kColumns = kWarps * kTile;     // 128 per block
constexpr int kLaneElements = 16;            // consecutive weights of a row per lane and chunk
static_assert(kLaneElements == kChunkElements, "a lane reads one chunk of each row");
constexpr int kChunk = 4 * kLaneElements;    // 64: the 4 lanes of a row
constexpr int kChunksPerStep = 4;            // loaded before any is decoded
constexpr int kStep = kChunksPerStep * kChunk;
constexpr int kMaxSliceSteps = 8;  // for 8 rows of x; 4 for 16 (x's slice in shared memory, 33 KB)
constexpr int kMaxRank = 128;
constexpr int kURowsAtATime = kThreads / kMaxRank;  // u's rows a block copies at a time
static_assert(kThreads % kMaxRank == 0, "each thread copies one rank of u's rows");
constexpr int kRowPad = 8;  // 16 bytes after each row of x: rows g and g + 1 fall in other banks

// d += (rows g and g + 8 of the tile: `upper` and `lower`) · (x's 16 values: `x`), over the 4
// instructions of one chunk: instruction j takes each lane's weights 4j..4j+3.
template <typename T>
__device__ __forceinline__ void chunk_mma(float (&d)[4], const uint32_t (&upper)[8], const uint32_t (&lower)[8],
                                          const uint32_t (&x)[8]) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t a[4] = {upper[2 * j], lower[2 * j], upper[2 * j + 1], lower[2 * j + 1]};
    const uint32_t b[2] = {x[2 * j], x[2 * j + 1]};
    mma_m16n8k16<T>(d, a, b, d);
  }
}

// The 16 values of x's row `m` from `column` of the slice, as 8 pairs (two 16-byte shared loads).
template <typename T, int ROW_LENGTH>
__device__ __forceinline__ void x_pairs(const T (&row)[ROW_LENGTH], int column, uint32_t (&pairs)[8]) {
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const uint4 packed = reinterpret_cast<const uint4*>(&row[column])[i];
    pairs[4 * i] = packed.x;
    pairs[4 * i + 1] = packed.y;
    pairs[4 * i + 2] = packed.z;
    pairs[4 * i + 3] = packed.w;
  }
}

// HALVES: x's 8-row halves, 1 (M <= 8) or 2 (M <= 16). NESTED: 4-bit absmax stored as codes.
// lora_a.data null: no LoRA term (u written as zeros). Grid: (column groups, slices of K), slices
// of slice_steps steps; K a multiple of kStep.
template <int FMT, typename T, int HALVES, bool NESTED>
__global__ void __launch_bounds__(kThreads, 3 - HALVES)  // M <= 8: two blocks per SM, at most 128 registers
    small_m_mma_kernel(Operand x, WeightView w, Operand lora_a, Operand lora_b, Operand bias, float scaling,
                       Dropout dropout, Operand y, Operand u, float* __restrict__ partial,
                       float* __restrict__ u_partial, int* __restrict__ counters, int rows, int64_t columns, int64_t k,
                       int rank, int slice_steps) {
  constexpr int kRows = 8 * HALVES;
  auto& xs = shared_array<T[kRows][kMaxSliceSteps / HALVES * kStep + kRowPad], __LINE__>();  // rows past M: zeros
  auto& u_sums = shared_array<float[kRows][kMaxRank], __LINE__>();
  auto& table = shared_array<uint32_t[256], __LINE__>();  // each byte's two 4-bit codes as a pair of T
  auto& last_block = shared_array<int[1], __LINE__>();
  const int64_t group = blockIdx.x, slice = blockIdx.y;
  const int slices = static_cast<int>(gridDim.y);
  const int64_t k_begin = slice * slice_steps * kStep;
  const int length = static_cast<int>(min(static_cast<int64_t>(slice_steps) * kStep, k - k_begin));  // whole steps
  const T* x_rows = static_cast<const T*>(x.data) + k_begin;
  if (aligned_to(x_rows, 16) && x.stride % 8 == 0) {  // 16-byte copies (the padding keeps xs's rows 16-byte aligned)
#pragma unroll 1
    for (int m = 0; m < kRows; ++m)
      for (int column = 8 * threadIdx.x; column < length; column += 8 * kThreads)
        *reinterpret_cast<uint4*>(&xs[m][column]) =
            m < rows ? *reinterpret_cast<const uint4*>(x_rows + m * x.stride + column) : uint4{0u, 0u, 0u, 0u};
  } else {
#pragma unroll 1
    for (int m = 0; m < kRows; ++m)
      for (int column = threadIdx.x; column < length; column += kThreads)
        xs[m][column] = m < rows ? x_rows[m * x.stride + column] : from_float<T>(0.0f);
  }
  if constexpr (four_bit<FMT>()) fill_pair_table<FMT, T>(table, kThreads);
  block_sync();

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t tile_first = group * kColumns + warp * kTile;
  // This lane's two rows of W (tile rows g and g + 8), from its first weight in the slice; columns
  // past N reread the last row, their sums unused. 4-bit: the index in W of the row's chunk t in
  // the slice's first step (a chunk lies in one absmax block: blocksize a multiple of kChunk).
  const uint8_t* row_at[2];
  int64_t chunk_t_index[2];
  const int shift = __ffsll(w.blocksize) - 1;
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t n = min(tile_first + g + 8 * h, columns - 1);
    const auto* data = static_cast<const uint8_t*>(w.data);
    row_at[h] = data + (four_bit<FMT>() ? weight_bytes<FMT>(n * k) : weight_bytes<FMT>(n * w.stride_n)) +
                weight_bytes<FMT>(k_begin + t * kLaneElements);
    chunk_t_index[h] = n * k + k_begin + t * kChunk;
  }
  float acc[HALVES][4] = {};
#pragma unroll 1  // one step per trip, as the cost model counts it (fusedlora/inspection/cuda.py)
  for (int step = 0; step < length / kStep; ++step) {  // the last slice may be shorter
    Codes<FMT> codes[kChunksPerStep][2];
#pragma unroll
    for (int c = 0; c < kChunksPerStep; ++c)  // all loads first
#pragma unroll
      for (int h = 0; h < 2; ++h) codes[c][h] = load_codes<FMT>(row_at[h] + weight_bytes<FMT>(c * kChunk));
    // 4-bit: lane t loads the absmax of chunk t; the row's 4 lanes trade them (lane t ^ c holds chunk c's).
    float chunk_t_factor[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      row_at[h] += weight_bytes<FMT>(kStep);  // carried, not recomputed from n each step
      chunk_t_factor[h] = four_bit<FMT>() ? block_absmax<NESTED>(w, chunk_t_index[h] >> shift) : 1.0f;
      chunk_t_index[h] += kStep;
    }
#pragma unroll
    for (int c = 0; c < kChunksPerStep; ++c) {
      const int offset = step * kStep + c * kChunk;
      uint32_t upper[8], lower[8];
      to_pairs<FMT, T>(codes[c][0], table, upper);
      to_pairs<FMT, T>(codes[c][1], table, lower);
      float factor[2];
#pragma unroll
      for (int h = 0; h < 2 && four_bit<FMT>(); ++h) factor[h] = warp_shfl_xor(chunk_t_factor[h], t ^ c);
#pragma unroll
      for (int half = 0; half < HALVES; ++half) {
        uint32_t x_chunk[8];
        x_pairs(xs[8 * half + g], offset + t * kLaneElements, x_chunk);
        if constexpr (four_bit<FMT>()) {
          float sums[4] = {};
          chunk_mma<T>(sums, upper, lower, x_chunk);
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[half][i] = fmaf(sums[i], factor[i / 2], acc[half][i]);
        } else {
          chunk_mma<T>(acc[half], upper, lower, x_chunk);
        }
      }
    }
  }

  // u's rank tiles (ranks 16·tile + g and + 8 per lane), a warp each: A's values and remainders
  // against drop(x) without the keep scale (x or 0: exact in T, masked in place once the weight
  // tiles are done with x), which scales the sum.
  const bool has_lora = lora_a.data != nullptr;
  if (has_lora && dropout.active) {
    block_sync();
#pragma unroll 1
    for (int m = 0; m < rows; ++m)
      for (int column = threadIdx.x; column < length; column += kThreads)
        if (!kept(dropout, m, k_begin + column, k)) xs[m][column] = from_float<T>(0.0f);
    block_sync();
  }
  // A in x's dtype with 16-byte aligned rows (the usual case) is loaded as it is, 16 bytes at a
  // time, with no remainder.
  const bool a_as_is = has_lora && lora_a.type == (std::is_same<T, __half>::value ? kFloat16 : kBFloat16) &&
                       aligned_to(lora_a.data, 16) && lora_a.stride % 8 == 0;
  for (int tile = warp; has_lora && tile * kTile < rank; tile += kWarps) {
    float sums[HALVES][4] = {};
#pragma unroll 1  // off the weight's path: kept rolled, so that the main loop is the one with the most HMMAs
    for (int offset = 0; offset < length; offset += kChunk) {
      const int64_t column = k_begin + offset + t * kLaneElements;
      uint32_t values[2][8], remainders[2][8];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int j = tile * kTile + g + 8 * h;
        if (a_as_is) {
          const T* a_row = static_cast<const T*>(lora_a.data) + j * lora_a.stride;
          const auto* row = reinterpret_cast<const uint4*>(a_row + column);
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            const uint4 packed = j < rank ? row[i] : uint4{0u, 0u, 0u, 0u};
            values[h][4 * i] = packed.x;
            values[h][4 * i + 1] = packed.y;
            values[h][4 * i + 2] = packed.z;
            values[h][4 * i + 3] = packed.w;
          }
          continue;
        }
#pragma unroll
        for (int p = 0; p < 8; ++p) {
          const float a0 = j < rank ? load_float(lora_a, j, column + 2 * p) : 0.0f;
          const float a1 = j < rank ? load_float(lora_a, j, column + 2 * p + 1) : 0.0f;
          const float r0 = to_float(from_float<T>(a0)), r1 = to_float(from_float<T>(a1));
          values[h][p] = pack_pair<T>(r0, r1);
          remainders[h][p] = pack_pair<T>(a0 - r0, a1 - r1);
        }
      }
#pragma unroll
      for (int half = 0; half < HALVES; ++half) {
        uint32_t x_chunk[8];
        x_pairs(xs[8 * half + g], offset + t * kLaneElements, x_chunk);
        chunk_mma<T>(sums[half], values[0], values[1], x_chunk);
        if (!a_as_is) chunk_mma<T>(sums[half], remainders[0], remainders[1], x_chunk);
      }
    }
    const float keep_scale = dropout.active ? dropout.keep_scale : 1.0f;
#pragma unroll
    for (int half = 0; half < HALVES; ++half) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int j = tile * kTile + g + 8 * (i / 2), m = 8 * half + 2 * t + i % 2;
        if (j < rank && m < rows) u_sums[m][j] = sums[half][i] * keep_scale;
      }
    }
  }
  block_sync();

  // u's elements (m, u_rank) for m = u_first_row, + kURowsAtATime, ...: this thread's to copy and sum.
  const int u_rank = threadIdx.x % kMaxRank, u_first_row = threadIdx.x / kMaxRank;
  // This lane's outputs: acc[half][i] is y's (row 8·half + 2t + i % 2, column tile_first + g + 8·(i / 2)).
  auto row_of = [&](int half, int i) { return 8 * half + 2 * t + i % 2; };
  auto column_of = [&](int i) { return tile_first + g + 8 * (i / 2); };
  if (slices > 1) {
#pragma unroll
    for (int half = 0; half < HALVES; ++half)
#pragma unroll
      for (int i = 0; i < 4; ++i)
        if (row_of(half, i) < rows && column_of(i) < columns)
          partial[(slice * rows + row_of(half, i)) * columns + column_of(i)] = acc[half][i];
    float* u_part = u_partial + (group * slices + slice) * rows * rank;
    for (int m = u_first_row; has_lora && u_rank < rank && m < rows; m += kURowsAtATime)
      u_part[m * rank + u_rank] = u_sums[m][u_rank];
    if (!arrived_last(counters, group, slices, last_block[0])) return;
#pragma unroll
    for (int half = 0; half < HALVES; ++half)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        acc[half][i] = 0.0f;
#pragma unroll 1
        for (int s = 0; row_of(half, i) < rows && column_of(i) < columns && s < slices; ++s)
          acc[half][i] += load_coherent(&partial[(s * rows + row_of(half, i)) * columns + column_of(i)]);
      }
    for (int m = u_first_row; has_lora && u_rank < rank && m < rows; m += kURowsAtATime) {
      float sum = 0.0f;
      for (int s = 0; s < slices; ++s)
        sum += load_coherent(&u_partial[(group * slices + s) * rows * rank + m * rank + u_rank]);
      u_sums[m][u_rank] = sum;
    }
    block_sync();
  }

  // Column g + 8h of the tile: rows 2t and 2t + 1 of each half (acc[half][2h], acc[half][2h + 1]).
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t n = tile_first + g + 8 * h;
    if (n >= columns) continue;
    float lora[HALVES][2] = {};
#pragma unroll 1
    for (int j = 0; has_lora && j < rank; ++j) {
      const float b = load_float(lora_b, n, j);
#pragma unroll
      for (int half = 0; half < HALVES; ++half)
#pragma unroll
        for (int e = 0; e < 2; ++e) lora[half][e] = fmaf(u_sums[min(row_of(half, e), rows - 1)][j], b, lora[half][e]);
    }
    const float scale = row_scale<FMT>(w, n), shift_by = bias.data ? load_float(bias, 0, n) : 0.0f;
#pragma unroll
    for (int half = 0; half < HALVES; ++half)
#pragma unroll
      for (int e = 0; e < 2; ++e)
        if (row_of(half, e) < rows)
          static_cast<T*>(const_cast<void*>(y.data))[row_of(half, e) * y.stride + n] =  // y has x's dtype
              from_float<T>(fmaf(acc[half][2 * h + e], scale, shift_by) + scaling * lora[half][e]);
  }
  for (int m = u_first_row; group == 0 && u_rank < rank && m < rows; m += kURowsAtATime)
    store_float(u, m, u_rank, has_lora ? u_sums[m][u_rank] : 0.0f);
}

// Steps per slice: enough slices for two blocks per SM, at most kMaxSliceSteps / halves steps each (x's
// slice in shared memory). More blocks would hide more latency but write more partial sums.
int64_t slice_steps_of(int64_t groups, int64_t steps, int64_t sm_count, int halves) {
  return std::clamp<int64_t>(cdiv(steps, cdiv(2 * sm_count, groups)), 1, kMaxSliceSteps / halves);
}

}  // namespace

bool small_m_on_tensor_cores(const at::Tensor& x, const WeightView& w, int64_t columns, int64_t rank) {
  const int64_t rows = x.size(0), k = x.size(1);
  const auto type = x.scalar_type();
  if (type != at::kHalf && type != at::kBFloat16) return false;
  if (rows < 1 || rows > kTensorSmallMMaxRows || columns < 1 || rank > kMaxRank || k < kStep || k % kStep != 0)
    return false;
  if (w.fmt == kNf4 || w.fmt == kFp4) return aligned_to(w.data, 8) && w.blocksize % kChunk == 0;
  return byte_chunks_readable(w, type == at::kHalf ? kFloat16 : kBFloat16);
}

void launch_forward_small_m_mma(const at::Tensor& x, const WeightView& w, const at::Tensor& lora_a,
                                const at::Tensor& lora_b, const at::Tensor& bias, double scaling,
                                const Dropout& dropout, at::Tensor& y, at::Tensor& u) {
  const int64_t rows = x.size(0), k = x.size(1), columns = y.size(1), rank = u.size(1);
  TORCH_CHECK(small_m_on_tensor_cores(x, w, columns, rank), "fusedlora: the tensor-core small-M kernel does not take "
              "this call (see small_m_on_tensor_cores in csrc/kernels.h)");
  const SmallMOperands operands = small_m_operands(x, lora_a, lora_b, bias, y, u);
  TORCH_CHECK(y.scalar_type() == x.scalar_type(), "fusedlora: the tensor-core small-M kernel writes y in x's dtype (",
              x.scalar_type(), "), got y of dtype ", y.scalar_type());
  const int64_t groups = cdiv(columns, kColumns), steps = cdiv(k, kStep);
  const int64_t slice_steps = slice_steps_of(groups, steps, multiprocessor_count(), rows <= 8 ? 1 : 2);
  const SplitK split = split_k(x, steps, slice_steps, rows, columns, groups, rank);
  const dim3 grid(static_cast<unsigned>(groups), static_cast<unsigned>(split.slices));
  auto launch_for = [&](auto fmt, auto type) {
    constexpr int kFmt = decltype(fmt)::value;
    using T = decltype(type);
    auto kernel = rows <= 8 ? small_m_mma_kernel<kFmt, T, 1, false> : small_m_mma_kernel<kFmt, T, 2, false>;
    if constexpr (kFmt == kNf4 || kFmt == kFp4) {
      if (w.nested) kernel = rows <= 8 ? small_m_mma_kernel<kFmt, T, 1, true> : small_m_mma_kernel<kFmt, T, 2, true>;
    }
    launch(kernel, grid, dim3(kThreads), operands.x, w, operands.lora_a, operands.lora_b, operands.bias,
           static_cast<float>(scaling), dropout, operands.y, operands.u, split.partial, split.u_partial,
           split.counters, static_cast<int>(rows), columns, k, static_cast<int>(rank), static_cast<int>(slice_steps));
  };
  dispatch_format(w.fmt, [&](auto fmt) {
    if (x.scalar_type() == at::kHalf) {
      launch_for(fmt, __half{});
    } else {
      launch_for(fmt, __nv_bfloat16{});
    }
  });
}

}  // namespace fusedlora
