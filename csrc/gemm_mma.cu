// The GEMMs on tensor cores for fp16 / bf16 activations (docs/design.md §4, "GEMM"):
//   forward: y  (M, N) = x (M, K) · deq(W)ᵀ + bias + s · u · Bᵀ      (reduction over K)
//   grad_x:  dx (M, K) = g (M, N) · deq(W) + drop'(du · A)             (reduction over N)
// A block of 4 warps computes a 64×64 tile of the output, each warp 32×32 with mma.sync m16n8k16
// (fp32 accumulation). Per step of 64 along the reduction, the left operand's 64×64 tile comes into
// shared memory by cp.async (16-byte copies), and each thread reads 32 consecutive weights of one
// row of W (4-bit: 16 bytes), turns them into pairs of T (4-bit: a 256-entry pair table in shared
// memory) times their factor (the block's absmax, the row's int8 / fp8 scale) in one paired
// multiply, and stores them into the weight tile. Both tiles are double buffered: the next step's
// copies and weight loads are in flight while the tensor cores work on this step; one barrier a
// step. Fragments come through ldmatrix, the weight tile transposed for grad_x (W's rows are its
// reduction). The LoRA product runs on the same instructions after the main loop, 16 ranks at a
// time, into a second accumulator. Shapes and storage this kernel takes: gemm_on_tensor_cores.

#include <type_traits>

#include "dispatch.cuh"
#include "gemm_epilogue.cuh"
#include "kernels.h"
#include "weight_chunks.cuh"

namespace fusedlora {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kTile = 64;       // output rows and columns of a block (2 x 2 warps of 32 x 32)
constexpr int kStep = 64;       // the reduction's step
constexpr int kLd = kStep + 8;  // shared rows padded by 16 bytes: ldmatrix's 8 rows fall in distinct banks
constexpr int kThreadChunks = kTile * kStep / (kThreads * kChunkElements);  // 2: 32 weights of one row a thread
constexpr int kRankStep = 16;   // the LoRA product's ranks per instruction
static_assert(kTile == kStep, "a weight tile is kTile x kStep in both modes: each thread takes half a row");
static_assert(kThreadChunks * kChunkElements * 2 == kStep, "two threads a row of the weight tile");
static_assert(kThreadChunks == kRunChunks, "a thread's weights of a step are one run (weight_chunks.cuh)");

template <typename T>
using Tile = T[kTile][kLd];

// What one step reads from shared memory: the left operand's tile and the weight tile.
template <typename T>
struct Stage {
  Tile<T> left;
  Tile<T> weights;
};

// The left operand's 64 x 64 tile of a step in 16-byte chunks, kLeftChunks consecutive ones of a
// row a thread (one source pointer, the chunks at constant offsets).
constexpr int kLeftChunks = kTile * kStep / 8 / kThreads;  // 4

// This lane's ldmatrix rows in a stage (element offsets from the tile's start): lane l gives row
// l % 8 of matrix l / 8. Left: matrices rows +0 / +8 (matrix % 2) x columns +0 / +8 (matrix / 2);
// right: output columns +0 / +8 (matrix / 2) x reduction +0 / +8 (matrix % 2).
__device__ __forceinline__ int left_lane_offset() {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, matrix = lane / 8, row = lane % 8;
  return ((warp / 2) * 32 + (matrix % 2) * 8 + row) * kLd + (matrix / 2) * 8;
}
template <int MODE>
__device__ __forceinline__ int right_lane_offset() {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, matrix = lane / 8, row = lane % 8;
  const int o = (warp % 2) * 32 + (matrix / 2) * 8, k = (matrix % 2) * 8;
  return MODE == kForward ? (o + row) * kLd + k : (k + row) * kLd + o;
}

// acc += left · right over `length` (a multiple of 16) of the tiles' reduction, for this warp's
// 32 x 32; left_rows and right_rows: the tiles' starts plus this lane's offsets. left is [m][r];
// right is [o][r] forward (Wᵀ column-major), [r][o] grad_x (read transposed).
template <typename T, int MODE>
__device__ __forceinline__ void tile_mma(float (&acc)[2][4][4], const T* left_rows, const T* right_rows, int length) {
#pragma unroll
  for (int kk = 0; kk < length; kk += 16) {
    uint32_t a[2][4], b[4][2];
#pragma unroll
    for (int i = 0; i < 2; ++i) ldmatrix_x4<false>(a[i], left_rows + 16 * i * kLd + kk);
#pragma unroll
    for (int pair = 0; pair < 2; ++pair) {
      uint32_t r[4];
      if constexpr (MODE == kForward) {
        ldmatrix_x4<false>(r, right_rows + 16 * pair * kLd + kk);
      } else {
        ldmatrix_x4<true>(r, right_rows + kk * kLd + 16 * pair);
      }
      b[2 * pair][0] = r[0];
      b[2 * pair][1] = r[1];
      b[2 * pair + 1][0] = r[2];
      b[2 * pair + 1][1] = r[3];
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) mma_m16n8k16<T>(acc[i][j], a[i], b[j], acc[i][j]);
  }
}

// left: x (forward) or g (grad_x), (rows, reduce); out: (rows, outs). lora_left: u or du (rows,
// rank), null: no LoRA term; lora_right: B (outs, rank) or A (rank, outs). fp32 LoRA operands.
template <typename T, int FMT, int MODE>
__global__ void __launch_bounds__(kThreads)
    gemm_mma_kernel(const T* __restrict__ left, int64_t ld_left, WeightView w, const float* __restrict__ lora_left,
                    int64_t ld_lora_left, const float* __restrict__ lora_right, int64_t ld_lora_right, int rank,
                    const float* __restrict__ bias, float scaling, Dropout dropout, T* __restrict__ out,
                    int64_t ld_out, int64_t rows, int64_t outs, int64_t reduce) {
  auto& stages = shared_array<Stage<T>[2], __LINE__>();  // double buffered
  auto& table = shared_array<uint32_t[256], __LINE__>();   // each byte's two 4-bit codes as a pair of T
  if constexpr (four_bit<FMT>()) fill_pair_table<FMT, T>(table, kThreads);
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTile, o0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int steps = static_cast<int>(cdiv(reduce, kStep));
  // This thread's left chunks: row left_row of the tile, columns left_column..+31; its source
  // advances kStep columns a step. A row past M (clamped to M - 1) copies zeros, and so do grad_x's
  // columns past N (a multiple of 8) in its last step.
  const int left_row = threadIdx.x / 2, left_column = (threadIdx.x % 2) * kLeftChunks * 8;
  const int left_store = opaque(left_row * kLd + left_column);
  const uint32_t left_bytes = static_cast<uint32_t>(opaque(m0 + left_row < rows ? 16 : 0));
  const T* left_source = left + min(m0 + left_row, rows - 1) * ld_left + left_column;
  // `partial` (std::true_type / false_type): whether step r0 may end past the reduction (grad_x's
  // last step; forward, K is a multiple of kStep), so that only those copies of a trip check.
  auto stage_left = [&](T* tile, int64_t r0, auto partial) {  // left_source at column r0
#pragma unroll
    for (int i = 0; i < kLeftChunks; ++i) {
      const bool in = !decltype(partial)::value || r0 + left_column + 8 * i < reduce;
      cp_async_16(tile + left_store + 8 * i, in ? left_source + 8 * i : left, in ? left_bytes : 0u);
    }
  };
  // This thread's weights: row w_row of the weight tile, columns w_column..+31. Forward: W's row
  // o0 + w_row (past N: its last row, whose outputs are not stored), advancing kStep columns a
  // step; grad_x: W's rows from w_row at column o0 + w_column, advancing kStep rows a step (past N:
  // its last row, which meets g's zero columns). `index`: the first weight's (row · row_length + column).
  const int w_row = threadIdx.x / 2, w_column = (threadIdx.x % 2) * kThreadChunks * kChunkElements;
  const int64_t row_length = four_bit<FMT>() ? w.k : w.stride_n;  // elements from a row of W to the next
  const int64_t first_row = MODE == kForward ? min(o0 + w_row, outs - 1) : min(static_cast<int64_t>(w_row), reduce - 1);
  const int64_t advance = MODE == kForward ? kStep : kStep * row_length;  // elements a step
  int64_t index = first_row * row_length + (MODE == kForward ? 0 : o0) + w_column;
  const int64_t last_index = MODE == kGradX ? (reduce - 1) * row_length + o0 + w_column : index;  // grad_x: past N
  const uint8_t* weights_at = static_cast<const uint8_t*>(w.data) + weight_bytes<FMT>(index);
  const uint8_t* const last_at = static_cast<const uint8_t*>(w.data) + weight_bytes<FMT>(last_index);
  auto load_weights = [&](int64_t r0, auto partial) {  // index and weights_at at step r0
    const bool past = MODE == kGradX && decltype(partial)::value && r0 + w_row >= reduce;
    // 4-bit: 32 weights from a multiple of 32 lie in one absmax block (blocksize >= 32).
    const float factor = four_bit<FMT>() ? block_absmax(w, block_of(w, past ? last_index : index))
                                         : row_scale<FMT>(w, MODE == kForward ? first_row : min(r0 + w_row, reduce - 1));
    return load_run<FMT>(past ? last_at : weights_at, factor);
  };
  // ldmatrix's rows and this thread's weight row in stage 0; stage 1 is sizeof(Stage<T>) further.
  T* const stage0 = &stages[0].left[0][0];
  constexpr int kStageElements = sizeof(Stage<T>) / sizeof(T), kWeights = sizeof(Tile<T>) / sizeof(T);
  const int left_lane = opaque(left_lane_offset()), right_lane = opaque(kWeights + right_lane_offset<MODE>());
  const int w_store = opaque(kWeights + w_row * kLd + w_column);

  stage_left(stage0, 0, std::true_type{});
  cp_async_commit();
  WeightRun<FMT> next = load_weights(0, std::true_type{});
  block_sync();  // the table
  store_run<T, FMT>(next, table, stage0 + w_store);
  cp_async_wait<0>();
  block_sync();

  // A trip: the next step's copies and weight loads in flight while this step's instructions run.
  float acc[2][4][4] = {};
  auto trip = [&](int step, auto partial) {
    T* const now = stage0 + (step & 1) * kStageElements;
    T* const after = stage0 + ((step & 1) ^ 1) * kStageElements;
    const int64_t r_next = static_cast<int64_t>(step + 1) * kStep;
    left_source += kStep;
    stage_left(after, r_next, partial);
    cp_async_commit();
    index += advance;
    weights_at += weight_bytes<FMT>(advance);
    next = load_weights(r_next, partial);
    tile_mma<T, MODE>(acc, now + left_lane, now + right_lane, kStep);
    store_run<T, FMT>(next, table, after + w_store);
    cp_async_wait<0>();
    block_sync();
  };
  // grad_x's last step past N (steps >= 2) is prefetched by a trip of its own, after the loop.
  const bool peeled = MODE == kGradX && reduce % kStep != 0 && steps >= 2;
#pragma unroll 1  // one step per trip, as the cost model counts it (fusedlora/inspection/cuda.py)
  for (int step = 0; step < steps - 1 - peeled; ++step) trip(step, std::false_type{});
  if (peeled) trip(steps - 2, std::true_type{});
  T* const last = stage0 + ((steps - 1) & 1) * kStageElements;
  tile_mma<T, MODE>(acc, last + left_lane, last + right_lane, kStep);
  block_sync();

  // The LoRA product, kRankStep ranks a time, its operands rounded to T in the first tiles:
  // lora_left as the left tile's columns, lora_right as the weight tile in the mode's layout.
  float lora[2][4][4] = {};
  for (int j0 = 0; lora_left != nullptr && j0 < rank; j0 += kRankStep) {
    for (int i = threadIdx.x; i < kTile * kRankStep; i += kThreads) {
      const int row = i / kRankStep, j = i % kRankStep;
      const int64_t m = m0 + row, jj = j0 + j, o = o0 + row;
      stages[0].left[row][j] = from_float<T>(m < rows && jj < rank ? lora_left[m * ld_lora_left + jj] : 0.0f);
      const float right = o < outs && jj < rank ? lora_right_value<MODE>(lora_right, ld_lora_right, jj, o) : 0.0f;
      (MODE == kForward ? stages[0].weights[row][j] : stages[0].weights[j][row]) = from_float<T>(right);
    }
    block_sync();
    tile_mma<T, MODE>(lora, stage0 + left_lane, stage0 + right_lane, kRankStep);
    block_sync();
  }

  // acc[i][j][e]: row warp_m + 16i + g + 8(e / 2), column warp_o + 8j + 2t + e % 2.
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t first_m = m0 + (warp / 2) * 32 + g, first_o = o0 + (warp % 2) * 32 + 2 * t;
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t m = first_m + 16 * i + 8 * (e / 2), o = first_o + 8 * j + e % 2;
        if (m < rows && o < outs)
          out[m * ld_out + o] = from_float<T>(combine<MODE>(acc[i][j][e], lora[i][j][e], bias, scaling, dropout, m,
                                                            o, outs));
      }
}

}  // namespace

bool gemm_on_tensor_cores(const at::Tensor& left, const WeightView& w, int64_t n, int64_t k) {
  const auto type = left.scalar_type();
  if (type != at::kHalf && type != at::kBFloat16) return false;
  if (k < kStep || k % kStep != 0 || n < 1 || n % 8 != 0) return false;
  if (!aligned_to(left.data_ptr(), 16) || left.stride(0) % 8 != 0 || left.stride(1) != 1) return false;
  if (w.fmt == kNf4 || w.fmt == kFp4) return aligned_to(w.data, 16) && w.blocksize >= kThreadChunks * kChunkElements;
  return byte_chunks_readable(w, type == at::kHalf ? kFloat16 : kBFloat16);
}

template <int MODE>
void launch_gemm_mma(const at::Tensor& left, const WeightView& w, const at::Tensor& lora_left,
                     const at::Tensor& lora_right, const at::Tensor& bias, double scaling, const Dropout& dropout,
                     at::Tensor& out, int64_t reduce) {
  const int64_t rows = left.size(0), outs = out.size(1);
  TORCH_CHECK(out.scalar_type() == left.scalar_type() && out.stride(1) == 1,
              "fusedlora: the tensor-core GEMM writes its output in its input's dtype with unit column stride");
  if (rows == 0 || outs == 0) return;
  const dim3 grid(static_cast<unsigned>(cdiv(outs, kTile)), static_cast<unsigned>(cdiv(rows, kTile)));
  TORCH_CHECK(grid.y <= 65535, "fusedlora: too many rows for one launch (", rows, ")");
  const bool has_lora = lora_left.defined();
  auto launch_for = [&](auto fmt, auto type) {
    using T = decltype(type);
    launch(gemm_mma_kernel<T, decltype(fmt)::value, MODE>, grid, dim3(kThreads),
           static_cast<const T*>(left.data_ptr()), left.stride(0), w,
           has_lora ? lora_left.data_ptr<float>() : nullptr, has_lora ? lora_left.stride(0) : int64_t{0},
           has_lora ? lora_right.data_ptr<float>() : nullptr, has_lora ? lora_right.stride(0) : int64_t{0},
           has_lora ? static_cast<int>(lora_left.size(1)) : 0, bias.defined() ? bias.data_ptr<float>() : nullptr,
           static_cast<float>(scaling), dropout, static_cast<T*>(out.data_ptr()), out.stride(0), rows, outs, reduce);
  };
  dispatch_format(w.fmt, [&](auto fmt) {
    if (left.scalar_type() == at::kHalf) {
      launch_for(fmt, __half{});
    } else {
      launch_for(fmt, __nv_bfloat16{});
    }
  });
}

template void launch_gemm_mma<kForward>(const at::Tensor&, const WeightView&, const at::Tensor&, const at::Tensor&,
                                        const at::Tensor&, double, const Dropout&, at::Tensor&, int64_t);
template void launch_gemm_mma<kGradX>(const at::Tensor&, const WeightView&, const at::Tensor&, const at::Tensor&,
                                      const at::Tensor&, double, const Dropout&, at::Tensor&, int64_t);

}  // namespace fusedlora
