// The frozen weight dequantized into a 16-bit workspace, for the workspace regime's cuBLAS GEMMs
// (docs/design.md §4, "Regimes"):
//   out (N, K) = deq(W)   in T (fp16 / bf16), out's rows ld_out elements apart
// Each thread turns runs of 32 consecutive weights of a row (4-bit: one 16-byte load) into pairs
// of T times their factor in one paired multiply, as the tensor-core GEMM stages its weight tile
// (csrc/weight_chunks.cuh), and writes them with four 16-byte stores. A block covers kThreads runs
// of a row and walks the rows gridDim.y apart (one absmax or row scale a run). Shapes and storage:
// dequantize_takes; out 16-byte aligned.

#include <algorithm>

#include "dispatch.cuh"
#include "kernels.h"
#include "weight_chunks.cuh"

namespace fusedlora {
namespace {

constexpr int kThreads = 128;     // a block: 4096 weights of a row (Llama's K is a multiple)
constexpr int kBlocksPerSm = 16;  // enough rows in flight to cover the loads' latency

template <typename T, int FMT>
__global__ void __launch_bounds__(kThreads)
    dequantize_kernel(WeightView w, T* __restrict__ out, int64_t ld_out, int64_t rows) {
  auto& table = shared_array<uint32_t[256], __LINE__>();  // each byte's two 4-bit codes as a pair of T
  if constexpr (four_bit<FMT>()) {
    fill_pair_table<FMT, T>(table, kThreads);
    block_sync();
  }
  const int64_t column = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * kRunElements;
  if (column >= w.k) return;
  const int64_t row_length = four_bit<FMT>() ? w.k : w.stride_n;  // elements from a row of W to the next
  int64_t index = blockIdx.y * row_length + column;
  const int64_t advance = gridDim.y * row_length;
  T* destination = out + blockIdx.y * ld_out + column;
  const auto* data = static_cast<const uint8_t*>(w.data);
#pragma unroll 1  // one run per trip, as the cost model counts it (fusedlora/inspection/cuda.py)
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    // 4-bit: a run starts at a multiple of 32, so it lies in one absmax block (blocksize >= 32).
    const float factor = four_bit<FMT>() ? block_absmax(w, block_of(w, index)) : row_scale<FMT>(w, row);
    store_run<T, FMT>(load_run<FMT>(data + weight_bytes<FMT>(index), factor), table, destination);
    index += advance;
    destination += gridDim.y * ld_out;
  }
}

}  // namespace

bool dequantize_takes(at::ScalarType type, const WeightView& w) {
  if ((type != at::kHalf && type != at::kBFloat16) || w.k < kRunElements || w.k % kRunElements != 0) return false;
  if (w.fmt == kNf4 || w.fmt == kFp4) return aligned_to(w.data, 16) && w.blocksize >= kRunElements;
  return byte_chunks_readable(w, type == at::kHalf ? kFloat16 : kBFloat16);
}

void launch_dequantize(const WeightView& w, at::Tensor& out) {
  const int64_t rows = out.size(0);
  TORCH_CHECK(out.size(1) == w.k && out.stride(1) == 1 && out.stride(0) % 8 == 0 && aligned_to(out.data_ptr(), 16) &&
                  w.k % kRunElements == 0,
              "fusedlora: the workspace must be (N, K) with 16-byte aligned rows, K a multiple of ", kRunElements);
  if (rows == 0 || w.k == 0) return;
  const int64_t row_blocks = cdiv(w.k / kRunElements, kThreads);
  const int64_t wanted = cdiv(int64_t{kBlocksPerSm} * multiprocessor_count(), row_blocks);
  const int64_t row_groups = std::clamp<int64_t>(wanted, 1, std::min<int64_t>(rows, 65535));
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(row_groups));
  dispatch_format(w.fmt, [&](auto fmt) {
    if (out.scalar_type() == at::kHalf) {
      launch(dequantize_kernel<__half, decltype(fmt)::value>, grid, dim3(kThreads), w,
             static_cast<__half*>(out.data_ptr()), out.stride(0), rows);
    } else {
      TORCH_CHECK(out.scalar_type() == at::kBFloat16, "fusedlora: the workspace is fp16 or bf16");
      launch(dequantize_kernel<__nv_bfloat16, decltype(fmt)::value>, grid, dim3(kThreads), w,
             static_cast<__nv_bfloat16*>(out.data_ptr()), out.stride(0), rows);
    }
  });
}

}  // namespace fusedlora
