// The skinny LoRA kernels (rank <= 256), fp32 accumulation, the dropout mask regenerated:
//   shrink:  u  (M, r) = drop(x) · Aᵀ                 one read of x (and x copied, on request)
//   grad_u:  du (M, r) = s · g · B,  dB = s · gᵀ · u  one read of g; dB as per-block partials
//   grad_a:  dA (r, K) = duᵀ · drop(x)                 per row-slice partials
//   dx:      dx (M, K) = drop'(du · A)                 in x's dtype (the workspace regime's first term)
// Partials are summed on the host in a fixed order: the results are bitwise reproducible.

#include "common.cuh"
#include "dispatch.cuh"
#include "kernels.h"

namespace fusedlora {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxRank = 256;

// shrink: a block takes 32 rows and every rank, stepping through K 32 columns at a time.
constexpr int kShrinkRows = 32;
constexpr int kShrinkStep = 32;
constexpr int kShrinkSlots = kShrinkRows * kMaxRank / kThreads;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    shrink_kernel(const T* __restrict__ x, int64_t ld_x, const float* __restrict__ a, int64_t ld_a, Dropout dropout,
                  float* __restrict__ u, int64_t ld_u, T* __restrict__ x_copy, int64_t ld_copy, int64_t rows,
                  int64_t k, int rank) {
  auto& x_tile = shared_array<float[kShrinkRows][kShrinkStep + 1], __LINE__>();
  auto& a_tile = shared_array<float[kMaxRank][kShrinkStep + 1], __LINE__>();
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kShrinkRows;
  float acc[kShrinkSlots] = {};
  for (int64_t k0 = 0; k0 < k; k0 += kShrinkStep) {
    for (int i = threadIdx.x; i < kShrinkRows * kShrinkStep; i += kThreads) {
      const int row = i / kShrinkStep, col = i % kShrinkStep;
      const int64_t m = m0 + row, kk = k0 + col;
      const bool in = m < rows && kk < k;
      const T value = in ? x[m * ld_x + kk] : from_float<T>(0.0f);
      if (x_copy != nullptr && in) x_copy[m * ld_copy + kk] = value;
      x_tile[row][col] = in ? dropped(dropout, to_float(value), m, kk, k) : 0.0f;
    }
    for (int i = threadIdx.x; i < rank * kShrinkStep; i += kThreads) {
      const int j = i / kShrinkStep, col = i % kShrinkStep;
      a_tile[j][col] = k0 + col < k ? a[j * ld_a + k0 + col] : 0.0f;
    }
    block_sync();
#pragma unroll
    for (int slot = 0; slot < kShrinkSlots; ++slot) {
      const int o = threadIdx.x + slot * kThreads;
      if (o < kShrinkRows * rank) {
        const int row = o / rank, j = o % rank;
        float sum = 0.0f;
        for (int col = 0; col < kShrinkStep; ++col) sum = fmaf(x_tile[row][col], a_tile[j][col], sum);
        acc[slot] += sum;
      }
    }
    block_sync();
  }
#pragma unroll
  for (int slot = 0; slot < kShrinkSlots; ++slot) {
    const int o = threadIdx.x + slot * kThreads;
    const int64_t m = m0 + o / max(rank, 1);
    if (o < kShrinkRows * rank && m < rows) u[m * ld_u + o % rank] = acc[slot];
  }
}

// grad_u: a block walks row tiles of 16 (blockIdx.x, + gridDim.x, ...) and, for each, all of N
// in steps of 16; its share of dB accumulates in its own partial (read-modify-write, reproducible)
// or, when `atomic`, into one shared fp32 buffer with atomic_add (far less memory, not bitwise
// reproducible).
constexpr int kGradURows = 16;
constexpr int kGradUStep = 16;
constexpr int kGradUSlots = kGradURows * kMaxRank / kThreads;
constexpr int kGradUMaxBlocks = 64;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    grad_u_kernel(const T* __restrict__ g, int64_t ld_g, const float* __restrict__ u, int64_t ld_u,
                  const float* __restrict__ b, int64_t ld_b, float scaling, float* __restrict__ du, int64_t ld_du,
                  float* __restrict__ db_partials, bool atomic, int64_t rows, int64_t columns, int rank) {
  auto& g_tile = shared_array<float[kGradURows][kGradUStep + 1], __LINE__>();
  auto& u_tile = shared_array<float[kGradURows][kMaxRank + 1], __LINE__>();
  auto& b_tile = shared_array<float[kGradUStep][kMaxRank + 1], __LINE__>();
  float* db = db_partials + (atomic ? 0 : static_cast<int64_t>(blockIdx.x) * columns * rank);
  const int64_t tiles = (rows + kGradURows - 1) / kGradURows;
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t m0 = tile * kGradURows;
    for (int i = threadIdx.x; i < kGradURows * rank; i += kThreads) {
      const int row = i / rank, j = i % rank;
      u_tile[row][j] = m0 + row < rows ? u[(m0 + row) * ld_u + j] : 0.0f;
    }
    float acc[kGradUSlots] = {};
    for (int64_t n0 = 0; n0 < columns; n0 += kGradUStep) {
      for (int i = threadIdx.x; i < kGradURows * kGradUStep; i += kThreads) {
        const int row = i / kGradUStep, col = i % kGradUStep;
        const int64_t m = m0 + row, n = n0 + col;
        g_tile[row][col] = (m < rows && n < columns) ? to_float(g[m * ld_g + n]) : 0.0f;
      }
      for (int i = threadIdx.x; i < kGradUStep * rank; i += kThreads) {
        const int col = i / rank, j = i % rank;
        b_tile[col][j] = n0 + col < columns ? b[(n0 + col) * ld_b + j] : 0.0f;
      }
      block_sync();
#pragma unroll
      for (int slot = 0; slot < kGradUSlots; ++slot) {
        const int o = threadIdx.x + slot * kThreads;
        if (o < kGradURows * rank) {
          const int row = o / rank, j = o % rank;
          float sum = 0.0f;
          for (int col = 0; col < kGradUStep; ++col) sum = fmaf(g_tile[row][col], b_tile[col][j], sum);
          acc[slot] += sum;
          // the transposed product for dB: (column n0 + row) of this step, rank j
          const int64_t n = n0 + row;
          if (n < columns) {
            float share = 0.0f;
            for (int r = 0; r < kGradURows; ++r) share = fmaf(g_tile[r][row], u_tile[r][j], share);
            if (atomic) {
              atomic_add(db + n * rank + j, scaling * share);
            } else {
              db[n * rank + j] += scaling * share;
            }
          }
        }
      }
      block_sync();
    }
#pragma unroll
    for (int slot = 0; slot < kGradUSlots; ++slot) {
      const int o = threadIdx.x + slot * kThreads;
      const int64_t m = m0 + o / max(rank, 1);
      if (o < kGradURows * rank && m < rows) du[m * ld_du + o % rank] = scaling * acc[slot];
    }
    block_sync();
  }
}

// grad_a: a block takes 32 columns of K and one slice of the rows, stepping 16 rows at a time.
constexpr int kGradACols = 32;
constexpr int kGradARows = 16;
constexpr int kGradASlots = kMaxRank * kGradACols / kThreads;
constexpr int64_t kRowsPerSlice = 256;
constexpr int64_t kMaxSlices = 16;

// One CTA per SM at least, said outright: left to itself nvcc 13 caps this kernel at 128 registers on
// sm_80 and spills its accumulators to the stack (python -m fusedlora inspect --arch 80 --check).
template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    grad_a_kernel(const float* __restrict__ du, int64_t ld_du, const T* __restrict__ x, int64_t ld_x,
                  Dropout dropout, float* __restrict__ da_partials, int64_t rows, int64_t k, int rank,
                  int64_t rows_per_slice) {
  auto& du_tile = shared_array<float[kGradARows][kMaxRank + 1], __LINE__>();
  auto& x_tile = shared_array<float[kGradARows][kGradACols + 1], __LINE__>();
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * kGradACols;
  const int64_t first = static_cast<int64_t>(blockIdx.y) * rows_per_slice;
  const int64_t last = min(first + rows_per_slice, rows);
  float acc[kGradASlots] = {};
  for (int64_t m0 = first; m0 < last; m0 += kGradARows) {
    for (int i = threadIdx.x; i < kGradARows * rank; i += kThreads) {
      const int row = i / rank, j = i % rank;
      du_tile[row][j] = m0 + row < last ? du[(m0 + row) * ld_du + j] : 0.0f;
    }
    for (int i = threadIdx.x; i < kGradARows * kGradACols; i += kThreads) {
      const int row = i / kGradACols, col = i % kGradACols;
      const int64_t m = m0 + row, kk = k0 + col;
      x_tile[row][col] = (m < last && kk < k) ? dropped(dropout, to_float(x[m * ld_x + kk]), m, kk, k) : 0.0f;
    }
    block_sync();
#pragma unroll
    for (int slot = 0; slot < kGradASlots; ++slot) {
      const int o = threadIdx.x + slot * kThreads;
      if (o < rank * kGradACols) {
        const int j = o / kGradACols, col = o % kGradACols;
        float sum = 0.0f;
        for (int row = 0; row < kGradARows; ++row) sum = fmaf(du_tile[row][j], x_tile[row][col], sum);
        acc[slot] += sum;
      }
    }
    block_sync();
  }
  float* da = da_partials + static_cast<int64_t>(blockIdx.y) * rank * k;
#pragma unroll
  for (int slot = 0; slot < kGradASlots; ++slot) {
    const int o = threadIdx.x + slot * kThreads;
    const int64_t kk = k0 + o % kGradACols;
    if (o < rank * kGradACols && kk < k) da[(o / kGradACols) * k + kk] = acc[slot];
  }
}

// dx: a block takes kThreads columns (one a thread) and walks row tiles of kDxRows, gridDim.y
// apart; a tile's du rows sit in shared memory, A's elements are read once a tile.
constexpr int kDxRows = 32;

// One CTA per SM at least, said outright: left to itself nvcc 13 keeps this kernel at 48 registers on
// sm_90 and spills a 64-bit value to the stack (python -m fusedlora inspect --arch 90 --check).
template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    lora_dx_kernel(const float* __restrict__ du, int64_t ld_du, const float* __restrict__ a, int64_t ld_a,
                   Dropout dropout, T* __restrict__ dx, int64_t ld_dx, int64_t rows, int64_t k, int rank) {
  auto& du_tile = shared_array<float[kDxRows][kMaxRank], __LINE__>();
  const int64_t kk = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  for (int64_t m0 = static_cast<int64_t>(blockIdx.y) * kDxRows; m0 < rows; m0 += int64_t{gridDim.y} * kDxRows) {
    for (int i = threadIdx.x; i < kDxRows * rank; i += kThreads) {
      const int row = i / rank, j = i % rank;
      du_tile[row][j] = m0 + row < rows ? du[(m0 + row) * ld_du + j] : 0.0f;
    }
    block_sync();
    if (kk < k) {
      float acc[kDxRows] = {};
      for (int j = 0; j < rank; ++j) {
        const float a_value = a[j * ld_a + kk];
#pragma unroll
        for (int row = 0; row < kDxRows; ++row) acc[row] = fmaf(du_tile[row][j], a_value, acc[row]);
      }
#pragma unroll
      for (int row = 0; row < kDxRows; ++row) {
        const int64_t m = m0 + row;
        if (m < rows) dx[m * ld_dx + kk] = from_float<T>(dropped(dropout, acc[row], m, kk, k));
      }
    }
    block_sync();  // the tile is read before the next one is written
  }
}

void check_rank(int64_t rank) {
  TORCH_CHECK(rank >= 1 && rank <= kMaxRank, "fusedlora: the CUDA kernels take ranks 1..", kMaxRank, ", got ", rank);
}

}  // namespace

void launch_shrink(const at::Tensor& x, const at::Tensor& lora_a, const Dropout& dropout, at::Tensor& u,
                   const at::Tensor& x_copy) {
  const int64_t rows = x.size(0), k = x.size(1), rank = lora_a.size(0);
  check_rank(rank);
  const bool copy = x_copy.defined();
  TORCH_CHECK(!copy || (x_copy.scalar_type() == x.scalar_type() && x_copy.size(0) == rows && x_copy.size(1) >= k &&
                        x_copy.stride(1) == 1),
              "fusedlora: x's copy must be (M, >= K) in x's dtype with unit column stride");
  if (rows == 0) return;
  const dim3 grid(static_cast<unsigned>((rows + kShrinkRows - 1) / kShrinkRows));
  FUSEDLORA_DISPATCH_ACTIVATION(x.scalar_type(), "fusedlora_shrink", [&] {
    using T = typename CudaType<scalar_t>::type;
    launch(shrink_kernel<T>, grid, dim3(kThreads), reinterpret_cast<const T*>(x.data_ptr<scalar_t>()), x.stride(0),
           lora_a.data_ptr<float>(), lora_a.stride(0), dropout, u.data_ptr<float>(), u.stride(0),
           copy ? reinterpret_cast<T*>(x_copy.data_ptr<scalar_t>()) : nullptr, copy ? x_copy.stride(0) : int64_t{0},
           rows, k, static_cast<int>(rank));
  });
}

int64_t grad_u_blocks(int64_t m) {
  return std::max<int64_t>(1, std::min<int64_t>(kGradUMaxBlocks, (m + kGradURows - 1) / kGradURows));
}

void launch_grad_u(const at::Tensor& g, const at::Tensor& u, const at::Tensor& lora_b, double scaling, at::Tensor& du,
                   at::Tensor& db_partials) {
  const int64_t rows = g.size(0), columns = g.size(1), rank = u.size(1);
  check_rank(rank);
  const bool atomic = db_partials.size(0) == 1 && grad_u_blocks(rows) > 1;
  TORCH_CHECK(atomic || db_partials.size(0) == grad_u_blocks(rows),
              "fusedlora: dB partials must have 1 (atomics) or grad_u_blocks(M) rows");
  if (rows == 0) return;
  FUSEDLORA_DISPATCH_ACTIVATION(g.scalar_type(), "fusedlora_grad_u", [&] {
    using T = typename CudaType<scalar_t>::type;
    launch(grad_u_kernel<T>, dim3(static_cast<unsigned>(grad_u_blocks(rows))), dim3(kThreads),
           reinterpret_cast<const T*>(g.data_ptr<scalar_t>()), g.stride(0), u.data_ptr<float>(), u.stride(0),
           lora_b.data_ptr<float>(), lora_b.stride(0), static_cast<float>(scaling), du.data_ptr<float>(), du.stride(0),
           db_partials.data_ptr<float>(), atomic, rows, columns, static_cast<int>(rank));
  });
}

int64_t grad_a_slices(int64_t m) {
  return std::max<int64_t>(1, std::min<int64_t>(kMaxSlices, (m + kRowsPerSlice - 1) / kRowsPerSlice));
}

void launch_grad_a(const at::Tensor& du, const at::Tensor& x, const Dropout& dropout, at::Tensor& da_partials) {
  const int64_t rows = x.size(0), k = x.size(1), rank = du.size(1);
  check_rank(rank);
  const int64_t slices = grad_a_slices(rows);
  TORCH_CHECK(da_partials.size(0) == slices, "fusedlora: dA partials must have grad_a_slices(M) rows");
  if (rows == 0 || k == 0) return;
  const int64_t rows_per_slice = ((rows + slices - 1) / slices + kGradARows - 1) / kGradARows * kGradARows;
  const dim3 grid(static_cast<unsigned>((k + kGradACols - 1) / kGradACols), static_cast<unsigned>(slices));
  FUSEDLORA_DISPATCH_ACTIVATION(x.scalar_type(), "fusedlora_grad_a", [&] {
    using T = typename CudaType<scalar_t>::type;
    launch(grad_a_kernel<T>, grid, dim3(kThreads), du.data_ptr<float>(), du.stride(0),
           reinterpret_cast<const T*>(x.data_ptr<scalar_t>()), x.stride(0), dropout, da_partials.data_ptr<float>(),
           rows, k, static_cast<int>(rank), rows_per_slice);
  });
}

void launch_lora_dx(const at::Tensor& du, const at::Tensor& lora_a, const Dropout& dropout, at::Tensor& dx) {
  const int64_t rows = dx.size(0), k = dx.size(1), rank = du.size(1);
  check_rank(rank);
  TORCH_CHECK(dx.stride(1) == 1 && lora_a.size(1) == k, "fusedlora: dx must be (M, K) with unit column stride");
  if (rows == 0 || k == 0) return;
  const int64_t row_groups = std::min<int64_t>(cdiv(rows, kDxRows), 65535);  // more rows: the blocks walk them
  const dim3 grid(static_cast<unsigned>(cdiv(k, kThreads)), static_cast<unsigned>(row_groups));
  FUSEDLORA_DISPATCH_ACTIVATION(dx.scalar_type(), "fusedlora_lora_dx", [&] {
    using T = typename CudaType<scalar_t>::type;
    launch(lora_dx_kernel<T>, grid, dim3(kThreads), du.data_ptr<float>(), du.stride(0), lora_a.data_ptr<float>(),
           lora_a.stride(0), dropout, reinterpret_cast<T*>(dx.data_ptr<scalar_t>()), dx.stride(0), rows, k,
           static_cast<int>(rank));
  });
}

}  // namespace fusedlora
