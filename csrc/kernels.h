// The CUDA backend's host functions (lora_ops.cpp), and the launchers of its kernels that they call.
// Every tensor is on the current CUDA device, row-major with unit stride along its last dimension;
// the LoRA tensors (u, du, A, B, bias) are fp32 unless a launcher says otherwise. Each launcher
// checks its launch (device.cuh).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

#include "types.h"

namespace fusedlora {

// The ops' computations (their schemas: csrc/ops.cpp): (y, u) and (dx, dA, dB). `regime`: "fused"
// or "workspace", how a call past the small-M kernels runs where it can (docs/design.md §4).
std::tuple<at::Tensor, at::Tensor> lora_forward(const at::Tensor& x, at::TensorList w_tensors, c10::string_view w_format,
                                                at::IntArrayRef w_shape, int64_t w_blocksize, const at::Tensor& lora_a,
                                                const at::Tensor& lora_b, double scaling,
                                                const std::optional<at::Tensor>& bias, double dropout_p,
                                                const at::Tensor& seed, c10::string_view regime);
std::tuple<at::Tensor, at::Tensor, at::Tensor> lora_backward(const at::Tensor& grad_y, const at::Tensor& x,
                                                             const at::Tensor& u, at::TensorList w_tensors,
                                                             c10::string_view w_format, at::IntArrayRef w_shape,
                                                             int64_t w_blocksize, const at::Tensor& lora_a,
                                                             const at::Tensor& lora_b, double scaling, double dropout_p,
                                                             const at::Tensor& seed, bool need_dx,
                                                             c10::string_view regime);

// The (N, K) weight of a call as the kernels see it, from the ops' tensors (WeightSlot order),
// format name, shape and blocksize; checks them.
WeightView weight_view(at::TensorList tensors, c10::string_view format, at::IntArrayRef shape, int64_t blocksize);

// u (M, r) = drop(x) · Aᵀ; x_copy defined: x also copied into x_copy[:, :K] (x's dtype).
void launch_shrink(const at::Tensor& x, const at::Tensor& lora_a, const Dropout& dropout, at::Tensor& u,
                   const at::Tensor& x_copy = at::Tensor());

// dx (M, K) = drop'(du · A) in dx's dtype (fp32, fp16 or bf16).
void launch_lora_dx(const at::Tensor& du, const at::Tensor& lora_a, const Dropout& dropout, at::Tensor& dx);

// out (N, K) = deq(W) in out's dtype (fp16 or bf16; csrc/dequantize.cu), where dequantize_takes holds
// for that dtype: K a positive multiple of 32 and W read in 16-byte chunks (4-bit: 16-byte aligned
// codes, blocksize >= 32; int8 / fp8: rows 16-byte aligned; dense: that dtype, rows 16-byte aligned);
// out's rows 16-byte aligned.
bool dequantize_takes(at::ScalarType type, const WeightView& w);
void launch_dequantize(const WeightView& w, at::Tensor& out);

// y (M, N) = x · deq(W)ᵀ + bias + scaling · u · Bᵀ; u undefined: no LoRA term. Tensor cores for
// 16-bit x (mma.sync where gemm_on_tensor_cores holds, else WMMA; fp32 accumulate), fp32 FMAs for fp32 x.
void launch_forward_gemm(const at::Tensor& x, const WeightView& w, const at::Tensor& u, const at::Tensor& lora_b,
                         const at::Tensor& bias, double scaling, at::Tensor& y);

// The same for M <= kSmallMMaxRows in one launch, u (M, r) = drop(x) · Aᵀ included: A, B, the
// bias and u in their own dtypes (fp32, fp16 or bf16), u written whole; lora_a undefined: no LoRA
// term (u written as zeros). Split over K into slices of small_m_slice_steps(N, K steps, SMs) steps.
constexpr int64_t kSmallMMaxRows = 4;
void launch_forward_small_m(const at::Tensor& x, const WeightView& w, const at::Tensor& lora_a,
                            const at::Tensor& lora_b, const at::Tensor& bias, double scaling, const Dropout& dropout,
                            at::Tensor& y, at::Tensor& u);
int64_t small_m_slice_steps(int64_t columns, int64_t steps, int64_t sm_count);

// The same on tensor cores for M <= kTensorSmallMMaxRows (csrc/small_m_mma.cu), where
// small_m_on_tensor_cores holds: fp16 or bf16 x, K a positive multiple of 256, r <= 128, and W
// read in aligned chunks (4-bit: 8-byte aligned codes, blocksize a multiple of 64; int8 / fp8:
// rows 16-byte aligned; dense: x's dtype, rows 16-byte aligned); y in x's dtype.
constexpr int64_t kTensorSmallMMaxRows = 16;
bool small_m_on_tensor_cores(const at::Tensor& x, const WeightView& w, int64_t columns, int64_t rank);
void launch_forward_small_m_mma(const at::Tensor& x, const WeightView& w, const at::Tensor& lora_a,
                                const at::Tensor& lora_b, const at::Tensor& bias, double scaling,
                                const Dropout& dropout, at::Tensor& y, at::Tensor& u);

// du (M, r) = scaling · g · B and dB = scaling · gᵀ · u, one pass over g; dB as per-block
// partials (grad_u_blocks(M), N, r) to be summed (deterministic), or one (1, N, r) buffer that
// the blocks add into with atomics. The partials must start zeroed.
void launch_grad_u(const at::Tensor& g, const at::Tensor& u, const at::Tensor& lora_b, double scaling, at::Tensor& du,
                   at::Tensor& db_partials);
int64_t grad_u_blocks(int64_t m);

// dA partials (S, r, K): slice s of the rows of duᵀ · drop(x), to be summed.
void launch_grad_a(const at::Tensor& du, const at::Tensor& x, const Dropout& dropout, at::Tensor& da_partials);
int64_t grad_a_slices(int64_t m);

// The GEMMs on tensor cores (csrc/gemm_mma.cu), which launch_forward_gemm and launch_grad_x_gemm
// run where gemm_on_tensor_cores holds for the left operand (x forward, g grad_x) and the weight
// (N, K): fp16 or bf16 with 16-byte aligned rows, K a positive multiple of 64, N a multiple of 8,
// and W read in 16-byte chunks (4-bit: 16-byte aligned codes, blocksize >= 32; int8 / fp8: rows
// 16-byte aligned; dense: the left operand's dtype, rows 16-byte aligned); the output in the left
// operand's dtype. MODE: csrc/gemm_epilogue.cuh's (forward 0, grad_x 1).
bool gemm_on_tensor_cores(const at::Tensor& left, const WeightView& w, int64_t n, int64_t k);
template <int MODE>
void launch_gemm_mma(const at::Tensor& left, const WeightView& w, const at::Tensor& lora_left,
                     const at::Tensor& lora_right, const at::Tensor& bias, double scaling, const Dropout& dropout,
                     at::Tensor& out, int64_t reduce);

// dx (M, K) = g · deq(W) + drop'(du · A); du undefined: no LoRA term.
void launch_grad_x_gemm(const at::Tensor& g, const WeightView& w, const at::Tensor& du, const at::Tensor& lora_a,
                        const Dropout& dropout, at::Tensor& dx);

}  // namespace fusedlora
