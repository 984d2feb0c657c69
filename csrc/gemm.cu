// Tiled GEMMs with the frozen weight dequantized into shared memory, tile by tile (docs/design.md §4):
//   forward: y  (M, N) = x (M, K) · deq(W)ᵀ + bias + s · u · Bᵀ      (reduction over K)
//   grad_x:  dx (M, K) = g (M, N) · deq(W) + drop'(du · A)             (reduction over N)
// A block of 4 warps computes a 64×64 output tile, each warp 32×32. 16-bit activations use the
// tensor cores through WMMA (16×16×16, fp32 accumulation; HMMA on sm_80 and sm_90); fp32
// activations use FMAs (IEEE fp32, like the reference). The kernels are compiled per weight format
// (no per-element switch). Per-row scales (int8, fp8) are applied
// while dequantizing, as the reference dequantizes. The LoRA product (rank <= 256) is a second,
// small GEMM in the epilogue, so the output is written once. int64 offsets; every tail masked.

#include <type_traits>

#include "common.cuh"
#include "dispatch.cuh"
#include "gemm_epilogue.cuh"
#include "kernels.h"

namespace fusedlora {
namespace {

constexpr int kTile = 64;                      // output rows and columns of a block
constexpr int kStep = 32;                      // reduction step
constexpr int kThreads = 128;                  // 4 warps
constexpr int kStepLd = kStep + 8;             // a-tile and forward w-tile rows (16-bit: WMMA wants ldm % 8 == 0)
constexpr int kGradLd = kTile + 8;             // grad_x w-tile rows
constexpr int kLoraLd = 16 + 8;                // LoRA operand rows
constexpr int kOutLd = kTile + 4;              // fp32 staging rows
constexpr int kTileElems = kTile * kStepLd;    // holds every staged operand (2560 >= 32·72, 64·24)
constexpr int kStageTrips = kTile * kStep / kThreads;  // elements of each staged tile per thread
constexpr int kStageUnroll = 4;  // the staging loops run kStageTrips / kStageUnroll times (the inspection reads both)
static_assert(kTile * kStep % kThreads == 0 && kStageTrips % kStageUnroll == 0, "counted staging loops, no remainder");
static_assert(2 * kTileElems >= kTile * kOutLd, "the fp32 path stages its output tile in the operand tiles");

using Accumulator = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// W at (reduction index r, output index o) with its row scale: W[o, r] forward, W[r, o] grad_x.
template <int FMT, int MODE>
__device__ __forceinline__ float scaled_weight(const WeightView& w, int64_t r, int64_t o) {
  const int64_t n = MODE == kForward ? o : r;
  return weight_value<FMT>(w, n, MODE == kForward ? r : o) * row_scale<FMT>(w, n);
}

// Stage reduction step [r0, r0 + kStep): the left operand's rows m0.. and the weight tile. Counted
// loops (kStageTrips per thread) unrolled kStageUnroll times: their trip count is known, so the
// inspection counts what one step executes (fully unrolled, they spill on sm_80).
template <typename T, int FMT, int MODE>
__device__ __forceinline__ void stage(T* a_tile, T* w_tile, const T* __restrict__ left, int64_t ld_left,
                                      const WeightView& w, int64_t m0, int64_t o0, int64_t r0, int64_t rows,
                                      int64_t outs, int64_t reduce) {
#pragma unroll kStageUnroll
  for (int t = 0; t < kStageTrips; ++t) {
    const int i = threadIdx.x + t * kThreads, row = i / kStep, col = i % kStep;
    const int64_t m = m0 + row, r = r0 + col;
    a_tile[row * kStepLd + col] = (m < rows && r < reduce) ? left[m * ld_left + r] : from_float<T>(0.0f);
  }
  if constexpr (MODE == kForward) {  // w_tile[o][r] = W[o0 + o, r0 + r]: Wᵀ stored column-major
#pragma unroll kStageUnroll
    for (int t = 0; t < kStageTrips; ++t) {
      const int i = threadIdx.x + t * kThreads, o = i / kStep, col = i % kStep;
      const int64_t n = o0 + o, r = r0 + col;
      w_tile[o * kStepLd + col] = from_float<T>((n < outs && r < reduce) ? scaled_weight<FMT, MODE>(w, r, n) : 0.0f);
    }
  } else {  // w_tile[r][o] = W[r0 + r, o0 + o]: row-major
#pragma unroll kStageUnroll
    for (int t = 0; t < kStageTrips; ++t) {
      const int i = threadIdx.x + t * kThreads, row = i / kTile, o = i % kTile;
      const int64_t r = r0 + row, k = o0 + o;
      w_tile[row * kGradLd + o] = from_float<T>((r < reduce && k < outs) ? scaled_weight<FMT, MODE>(w, r, k) : 0.0f);
    }
  }
}

template <typename T, int FMT, int MODE>
__device__ __forceinline__ void tensor_core_tile(const T* __restrict__ left, int64_t ld_left, const WeightView& w,
                                 const float* __restrict__ lora_left, int64_t ld_lora_left,
                                 const float* __restrict__ lora_right, int64_t ld_lora_right, int rank,
                                 const float* __restrict__ bias, float scaling, const Dropout& dropout,
                                 T* __restrict__ out, int64_t ld_out, int64_t rows, int64_t outs, int64_t reduce) {
  using BLayout = std::conditional_t<MODE == kForward, wmma::col_major, wmma::row_major>;
  T* a_tile = shared_array<T[kTileElems], __LINE__>();
  T* w_tile = shared_array<T[kTileElems], __LINE__>();
  float* base_out = shared_array<float[kTile * kOutLd], __LINE__>();
  float* lora_out = shared_array<float[kTile * kOutLd], __LINE__>();
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTile, o0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int warp = threadIdx.x / 32, warp_m = (warp / 2) * 32, warp_o = (warp % 2) * 32;

  Accumulator acc[2][2], lora[2][2];
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) {
      wmma::fill_fragment(acc[i][j], 0.0f);
      wmma::fill_fragment(lora[i][j], 0.0f);
    }
  for (int64_t r0 = 0; r0 < reduce; r0 += kStep) {
    stage<T, FMT, MODE>(a_tile, w_tile, left, ld_left, w, m0, o0, r0, rows, outs, reduce);
    block_sync();
#pragma unroll
    for (int kk = 0; kk < kStep; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> b[2];
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], a_tile + (warp_m + 16 * i) * kStepLd + kk, kStepLd);
      for (int j = 0; j < 2; ++j) {
        if constexpr (MODE == kForward) {
          wmma::load_matrix_sync(b[j], w_tile + (warp_o + 16 * j) * kStepLd + kk, kStepLd);
        } else {
          wmma::load_matrix_sync(b[j], w_tile + kk * kGradLd + warp_o + 16 * j, kGradLd);
        }
      }
      for (int i = 0; i < 2; ++i)
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
    block_sync();
  }

  // The LoRA product in steps of 16 ranks, its operands staged where the main loop's were.
  for (int j0 = 0; lora_left != nullptr && j0 < rank; j0 += 16) {
    for (int i = threadIdx.x; i < kTile * 16; i += kThreads) {
      const int row = i / 16, j = i % 16;
      const int64_t m = m0 + row, jj = j0 + j, o = o0 + row;
      a_tile[row * kLoraLd + j] = from_float<T>(m < rows && jj < rank ? lora_left[m * ld_lora_left + jj] : 0.0f);
      const float right = o < outs && jj < rank ? lora_right_value<MODE>(lora_right, ld_lora_right, jj, o) : 0.0f;
      if constexpr (MODE == kForward) {
        w_tile[row * kLoraLd + j] = from_float<T>(right);  // (j, o) at [o][j]: column-major
      } else {
        w_tile[j * kGradLd + row] = from_float<T>(right);  // (j, o) at [j][o]: row-major
      }
    }
    block_sync();
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[2];
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> b[2];
    for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], a_tile + (warp_m + 16 * i) * kLoraLd, kLoraLd);
    for (int j = 0; j < 2; ++j) {
      if constexpr (MODE == kForward) {
        wmma::load_matrix_sync(b[j], w_tile + (warp_o + 16 * j) * kLoraLd, kLoraLd);
      } else {
        wmma::load_matrix_sync(b[j], w_tile + warp_o + 16 * j, kGradLd);
      }
    }
    for (int i = 0; i < 2; ++i)
      for (int j = 0; j < 2; ++j) wmma::mma_sync(lora[i][j], a[i], b[j], lora[i][j]);
    block_sync();
  }

  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 2; ++j) {
      const int offset = (warp_m + 16 * i) * kOutLd + warp_o + 16 * j;
      wmma::store_matrix_sync(base_out + offset, acc[i][j], kOutLd, wmma::mem_row_major);
      wmma::store_matrix_sync(lora_out + offset, lora[i][j], kOutLd, wmma::mem_row_major);
    }
  block_sync();
  for (int i = threadIdx.x; i < kTile * kTile; i += kThreads) {
    const int row = i / kTile, col = i % kTile;
    const int64_t m = m0 + row, o = o0 + col;
    if (m < rows && o < outs) {
      const float value = combine<MODE>(base_out[row * kOutLd + col], lora_out[row * kOutLd + col], bias, scaling,
                                        dropout, m, o, outs);
      out[m * ld_out + o] = from_float<T>(value);
    }
  }
}

// fp32: each thread owns a 4×8 patch of the tile, FMAs in IEEE fp32.
template <int FMT, int MODE>
__device__ __forceinline__ void fma_tile(const float* __restrict__ left, int64_t ld_left, const WeightView& w,
                                         const float* __restrict__ lora_left, int64_t ld_lora_left,
                                         const float* __restrict__ lora_right, int64_t ld_lora_right, int rank,
                                         const float* __restrict__ bias, float scaling, const Dropout& dropout,
                                         float* __restrict__ out, int64_t ld_out, int64_t rows, int64_t outs,
                                         int64_t reduce) {
  float* tiles = shared_array<float[2 * kTileElems], __LINE__>();  // a-tile and w-tile, then the staged output tile
  float* a_tile = tiles;
  float* w_tile = tiles + kTileElems;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kTile, o0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int row0 = (threadIdx.x / 8) * 4, col0 = (threadIdx.x % 8) * 8;
  float acc[4][8] = {};
  for (int64_t r0 = 0; r0 < reduce; r0 += kStep) {
    stage<float, FMT, MODE>(a_tile, w_tile, left, ld_left, w, m0, o0, r0, rows, outs, reduce);
    block_sync();
    for (int r = 0; r < kStep; ++r) {
      float a[4], b[8];
#pragma unroll
      for (int i = 0; i < 4; ++i) a[i] = a_tile[(row0 + i) * kStepLd + r];
#pragma unroll
      for (int j = 0; j < 8; ++j)
        b[j] = MODE == kForward ? w_tile[(col0 + j) * kStepLd + r] : w_tile[r * kGradLd + col0 + j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
    block_sync();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) tiles[(row0 + i) * kOutLd + col0 + j] = acc[i][j];
  block_sync();
  for (int i = threadIdx.x; i < kTile * kTile; i += kThreads) {
    const int row = i / kTile, col = i % kTile;
    const int64_t m = m0 + row, o = o0 + col;
    if (m >= rows || o >= outs) continue;
    float lora = 0.0f;
    for (int j = 0; lora_left != nullptr && j < rank; ++j)
      lora = fmaf(lora_left[m * ld_lora_left + j], lora_right_value<MODE>(lora_right, ld_lora_right, j, o), lora);
    out[m * ld_out + o] = combine<MODE>(tiles[row * kOutLd + col], lora, bias, scaling, dropout, m, o, outs);
  }
}

template <typename T, int FMT, int MODE>
__global__ void __launch_bounds__(kThreads)
    gemm_kernel(const T* __restrict__ left, int64_t ld_left, WeightView w, const float* __restrict__ lora_left,
                int64_t ld_lora_left, const float* __restrict__ lora_right, int64_t ld_lora_right, int rank,
                const float* __restrict__ bias, float scaling, Dropout dropout, T* __restrict__ out, int64_t ld_out,
                int64_t rows, int64_t outs, int64_t reduce) {
  if constexpr (std::is_same<T, float>::value) {
    fma_tile<FMT, MODE>(left, ld_left, w, lora_left, ld_lora_left, lora_right, ld_lora_right, rank, bias, scaling,
                   dropout, out, ld_out, rows, outs, reduce);
  } else {
    tensor_core_tile<T, FMT, MODE>(left, ld_left, w, lora_left, ld_lora_left, lora_right, ld_lora_right, rank, bias,
                              scaling, dropout, out, ld_out, rows, outs, reduce);
  }
}

template <int MODE>
void launch_gemm(const at::Tensor& left, const WeightView& w, const at::Tensor& lora_left,
                 const at::Tensor& lora_right, const at::Tensor& bias, double scaling, const Dropout& dropout,
                 at::Tensor& out, int64_t reduce) {
  const int64_t rows = left.size(0), outs = out.size(1);
  if (gemm_on_tensor_cores(left, w, MODE == kForward ? outs : reduce, MODE == kForward ? reduce : outs)) {
    launch_gemm_mma<MODE>(left, w, lora_left, lora_right, bias, scaling, dropout, out, reduce);
    return;
  }
  if (rows == 0 || outs == 0) return;
  const dim3 grid(static_cast<unsigned>((outs + kTile - 1) / kTile), static_cast<unsigned>((rows + kTile - 1) / kTile));
  TORCH_CHECK(grid.y <= 65535, "fusedlora: too many rows for one launch (", rows, ")");
  const float* lora_left_ptr = lora_left.defined() ? lora_left.data_ptr<float>() : nullptr;
  const float* lora_right_ptr = lora_left.defined() ? lora_right.data_ptr<float>() : nullptr;
  const int64_t ld_lora_left = lora_left.defined() ? lora_left.stride(0) : 0;
  const int64_t ld_lora_right = lora_left.defined() ? lora_right.stride(0) : 0;
  const int rank = lora_left.defined() ? static_cast<int>(lora_left.size(1)) : 0;
  const float* bias_ptr = bias.defined() ? bias.data_ptr<float>() : nullptr;
  FUSEDLORA_DISPATCH_ACTIVATION(left.scalar_type(), "fusedlora_gemm", [&] {
    using T = typename CudaType<scalar_t>::type;
    dispatch_format(w.fmt, [&](auto fmt) {
      launch(gemm_kernel<T, decltype(fmt)::value, MODE>, grid, dim3(kThreads),
             reinterpret_cast<const T*>(left.data_ptr<scalar_t>()), left.stride(0), w, lora_left_ptr, ld_lora_left,
             lora_right_ptr, ld_lora_right, rank, bias_ptr, static_cast<float>(scaling), dropout,
             reinterpret_cast<T*>(out.data_ptr<scalar_t>()), out.stride(0), rows, outs, reduce);
    });
  });
}

}  // namespace

void launch_forward_gemm(const at::Tensor& x, const WeightView& w, const at::Tensor& u, const at::Tensor& lora_b,
                         const at::Tensor& bias, double scaling, at::Tensor& y) {
  launch_gemm<kForward>(x, w, u, lora_b, bias, scaling, Dropout{false, 0, 0, 1.0f}, y, x.size(1));
}

void launch_grad_x_gemm(const at::Tensor& g, const WeightView& w, const at::Tensor& du, const at::Tensor& lora_a,
                        const Dropout& dropout, at::Tensor& dx) {
  launch_gemm<kGradX>(g, w, du, lora_a, at::Tensor(), 1.0, dropout, dx, g.size(1));
}

}  // namespace fusedlora
