// The CUDA backend's host logic: the weight view and the dropout of a call, the checks of its
// inputs, and the order of the launches in each regime (docs/design.md §4). csrc/ops.cpp registers
// it as the ops fusedlora::cuda_lora_fwd / cuda_lora_bwd; the CPU execution harness
// (tests/emulation/) calls it with the kernels emulated.

#include <ATen/ATen.h>

#include <cmath>
#include <string>
#include <tuple>

#include "kernels.h"

namespace fusedlora {

// The tensors arrive in WeightSlot order (fusedlora/contract.py's WEIGHT_SLOTS); the format says
// how many there are and what they hold.
WeightView weight_view(at::TensorList tensors, c10::string_view format, at::IntArrayRef shape, int64_t blocksize) {
  TORCH_CHECK(shape.size() == 2, "fusedlora: w_shape must be (N, K), got ", shape);
  const std::string fmt(format);
  const bool four_bit = fmt == "nf4" || fmt == "fp4";
  const size_t count = tensors.size();
  if (four_bit) {
    TORCH_CHECK(count == kNestedAbsmax || count == kNestedOffset + 1, "fusedlora: a 4-bit weight has 2 or 5 tensors, got ", count);
  } else {
    TORCH_CHECK(fmt == "dense" || fmt == "int8" || fmt == "fp8", "fusedlora: unknown weight format ", fmt);
    TORCH_CHECK(count == (fmt == "dense" ? kScale : kNestedAbsmax), "fusedlora: a ", fmt, " weight has ",
                fmt == "dense" ? 1 : 2, " tensors, got ", count);
  }
  WeightView view{};
  view.fmt = fmt == "dense" ? kDense : fmt == "int8" ? kInt8 : fmt == "fp8" ? kFp8 : fmt == "nf4" ? kNf4 : kFp4;
  view.k = shape[1];
  view.blocksize = four_bit ? blocksize : 1;
  const at::Tensor& data = tensors[kData];
  view.data = data.data_ptr();
  if (count > kScale) {
    TORCH_CHECK(tensors[kScale].scalar_type() == (count > kNestedAbsmax ? at::kByte : at::kFloat),
                "fusedlora: the weight's scale has the wrong dtype");
    view.scale = tensors[kScale].data_ptr();
  }
  view.nested = count > kNestedAbsmax;
  if (view.nested) {
    view.nested_absmax = tensors[kNestedAbsmax].data_ptr<float>();
    view.nested_code = tensors[kNestedCode].data_ptr<float>();
    view.nested_offset = tensors[kNestedOffset].data_ptr<float>();
  }
  if (four_bit) {
    TORCH_CHECK(blocksize > 0 && (blocksize & (blocksize - 1)) == 0,
                "fusedlora: a 4-bit weight's blocksize must be a power of two, got ", blocksize);
    TORCH_CHECK(data.scalar_type() == at::kByte && data.is_contiguous(), "fusedlora: packed codes must be contiguous uint8");
    return view;
  }
  TORCH_CHECK(data.dim() == 2 && data.stride(1) == 1, "fusedlora: the weight must be (N, K) with unit stride along K");
  view.stride_n = data.stride(0);
  if (view.fmt == kDense) {
    const auto type = data.scalar_type();
    TORCH_CHECK(type == at::kFloat || type == at::kHalf || type == at::kBFloat16, "fusedlora: dense weights must be fp32/fp16/bf16");
    view.dense_type = type == at::kHalf ? kFloat16 : type == at::kBFloat16 ? kBFloat16 : kFloat32;
  }
  return view;
}

namespace {

using at::Tensor;

Dropout dropout_of(double p, const Tensor& seed) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, "fusedlora: dropout_p must be in [0, 1), got ", p);
  const int64_t value = seed.item<int64_t>();  // a CPU scalar: no device synchronisation
  return Dropout{p > 0.0, static_cast<uint32_t>(value), static_cast<uint64_t>(std::floor(p * 4294967296.0)),
                 static_cast<float>(1.0 / (1.0 - p))};
}

void check_inputs(const Tensor& x, const Tensor& lora_a, const Tensor& lora_b, at::IntArrayRef shape) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == shape[1], "fusedlora: x must be (M, K)");
  const auto type = x.scalar_type();
  TORCH_CHECK(type == at::kFloat || type == at::kHalf || type == at::kBFloat16, "fusedlora: x must be fp32/fp16/bf16");
  TORCH_CHECK(lora_a.dim() == 2 && lora_a.size(1) == shape[1] && lora_b.dim() == 2 && lora_b.size(0) == shape[0] &&
                  lora_b.size(1) == lora_a.size(0),
              "fusedlora: lora_A must be (r, K) and lora_B (N, r)");
}

at::ScalarType lora_dtype(const Tensor& x, const Tensor& lora_a, const Tensor& lora_b) {
  return at::promote_types(at::promote_types(x.scalar_type(), lora_a.scalar_type()), lora_b.scalar_type());
}

void check_regime(c10::string_view regime) {
  TORCH_CHECK(regime == "fused" || regime == "workspace", "fusedlora: regime must be 'fused' or 'workspace', got '",
              std::string(regime), "'");
}

// Whether a large-M call runs in the workspace regime: asked for (the Python backend chooses by M,
// fusedlora/backends/regimes.py) and possible, W one the dequantization reads for activations of
// `type` (dequantize_takes); else it stays fused. The activations need no layout: the shrink
// copies x, ATen's matmuls take any strides.
bool in_workspace(c10::string_view regime, at::ScalarType type, const WeightView& w) {
  return regime == "workspace" && dequantize_takes(type, w);
}

// An uninitialised (rows, columns) matrix whose rows start 16 bytes apart, as cuBLAS's fast paths
// want: a column slice of a buffer padded to a multiple of 8 columns. On the CPU (the harness) the
// padding is zeroed: ATen's oneDNN matmul may read a view's padding there (seen on AMX machines: a
// NaN in it, multiplied by zero, poisons the row).
Tensor cublas_operand(int64_t rows, int64_t columns, const at::TensorOptions& options) {
  Tensor buffer = at::empty({rows, (columns + 7) / 8 * 8}, options);
  if (!options.device().is_cuda()) buffer.narrow(1, columns, buffer.size(1) - columns).zero_();
  return buffer.narrow(1, 0, columns);
}

// deq(W) (N, K) in `type` with `extra` more columns after K, left to the caller: W's own storage
// when it is dense in `type` and no columns are asked for, else a workspace the dequantization fills.
Tensor weight_matrix(const WeightView& w, const Tensor& stored, int64_t n, int64_t extra, at::ScalarType type) {
  if (w.fmt == kDense && stored.scalar_type() == type && extra == 0) return stored;
  Tensor workspace = cublas_operand(n, w.k + extra, stored.options().dtype(type));
  Tensor weights = workspace.narrow(1, 0, w.k);
  launch_dequantize(w, weights);
  return workspace;
}

// The workspace regime's forward: y = [x | u] · [deq(W) | s·B]ᵀ + bias, one cuBLAS GEMM over K + r;
// the shrink copies x into [x | u] from the read that forms u.
std::tuple<Tensor, Tensor> forward_in_workspace(const Tensor& x, const WeightView& w, const Tensor& stored,
                                                int64_t columns, const Tensor& lora_a, const Tensor& lora_b,
                                                double scaling, const std::optional<Tensor>& bias,
                                                const Dropout& dropout) {
  const int64_t rows = x.size(0), k = x.size(1), rank = lora_a.size(0);
  auto product = [&](const Tensor& left, const Tensor& right) {  // left · rightᵀ + bias
    return bias.has_value() ? at::addmm(bias->to(x.scalar_type()), left, right.t()) : at::mm(left, right.t());
  };
  const auto u_type = lora_dtype(x, lora_a, lora_b);
  if (scaling == 0.0) {
    return {product(x, weight_matrix(w, stored, columns, 0, x.scalar_type())),
            at::zeros({rows, rank}, x.options().dtype(u_type))};
  }
  Tensor weight_ext = weight_matrix(w, stored, columns, rank, x.scalar_type());
  weight_ext.narrow(1, k, rank).copy_(lora_b * scaling);
  Tensor x_ext = cublas_operand(rows, k + rank, x.options());
  Tensor u = at::empty({rows, rank}, x.options().dtype(at::kFloat));
  launch_shrink(x, lora_a.to(at::kFloat).contiguous(), dropout, u, x_ext);
  x_ext.narrow(1, k, rank).copy_(u);
  return {product(x_ext, weight_ext), u.to(u_type)};
}

// The workspace regime's dx = drop'(du · A) + g · deq(W): the LoRA term written first, the cuBLAS
// GEMM accumulating onto it; du undefined: no LoRA term.
Tensor grad_x_in_workspace(const Tensor& grad_y, const WeightView& w, const Tensor& stored, const Tensor& du,
                           const Tensor& a32, const Dropout& dropout) {
  const Tensor weights = weight_matrix(w, stored, grad_y.size(1), 0, grad_y.scalar_type());
  if (!du.defined()) return at::mm(grad_y, weights);
  Tensor grad_x = at::empty({grad_y.size(0), w.k}, grad_y.options());
  launch_lora_dx(du, a32, dropout, grad_x);
  return grad_x.addmm_(grad_y, weights);
}

}  // namespace

std::tuple<Tensor, Tensor> lora_forward(const Tensor& x_in, at::TensorList w_tensors, c10::string_view w_format,
                                         at::IntArrayRef w_shape, int64_t w_blocksize, const Tensor& lora_a,
                                         const Tensor& lora_b, double scaling, const std::optional<Tensor>& bias,
                                         double dropout_p, const Tensor& seed, c10::string_view regime) {
  check_inputs(x_in, lora_a, lora_b, w_shape);
  check_regime(regime);
  const Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  const WeightView weight = weight_view(w_tensors, w_format, w_shape, w_blocksize);
  const int64_t rows = x.size(0), columns = w_shape[0], rank = lora_a.size(0);
  Tensor y = at::empty({rows, columns}, x.options());
  const bool has_lora = scaling != 0.0;
  const bool tensor_cores = small_m_on_tensor_cores(x, weight, columns, rank);
  if (rows <= kSmallMMaxRows || tensor_cores) {  // one launch, nothing allocated but y and u
    Tensor u = at::empty({rows, rank}, x.options().dtype(lora_dtype(x, lora_a, lora_b)));
    (tensor_cores ? launch_forward_small_m_mma : launch_forward_small_m)(
        x, weight, has_lora ? lora_a : Tensor(), lora_b, bias.value_or(Tensor()), scaling, dropout_of(dropout_p, seed),
        y, u);
    return {y, u};
  }
  if (in_workspace(regime, x.scalar_type(), weight)) {
    return forward_in_workspace(x, weight, w_tensors[kData], columns, lora_a, lora_b, scaling, bias,
                                dropout_of(dropout_p, seed));
  }
  // The shrink writes every element of u; without the LoRA term u is returned as zeros.
  Tensor u = has_lora ? at::empty({rows, rank}, x.options().dtype(at::kFloat))
                      : at::zeros({rows, rank}, x.options().dtype(at::kFloat));
  const Tensor b32 = lora_b.to(at::kFloat).contiguous();
  const Tensor bias32 = bias.has_value() ? bias->to(at::kFloat).contiguous() : Tensor();
  if (has_lora) launch_shrink(x, lora_a.to(at::kFloat).contiguous(), dropout_of(dropout_p, seed), u);
  launch_forward_gemm(x, weight, has_lora ? u : Tensor(), b32, bias32, scaling, y);
  return {y, u.to(lora_dtype(x, lora_a, lora_b))};
}

std::tuple<Tensor, Tensor, Tensor> lora_backward(const Tensor& grad_y_in, const Tensor& x_in, const Tensor& u,
                                                 at::TensorList w_tensors, c10::string_view w_format,
                                                 at::IntArrayRef w_shape, int64_t w_blocksize, const Tensor& lora_a,
                                                 const Tensor& lora_b, double scaling, double dropout_p,
                                                 const Tensor& seed, bool need_dx, c10::string_view regime) {
  check_inputs(x_in, lora_a, lora_b, w_shape);
  check_regime(regime);
  const Tensor x = x_in.stride(1) == 1 ? x_in : x_in.contiguous();
  TORCH_CHECK(grad_y_in.dim() == 2 && grad_y_in.size(0) == x_in.size(0) && grad_y_in.size(1) == w_shape[0] &&
                  grad_y_in.scalar_type() == x_in.scalar_type(),
              "fusedlora: grad_y must be (M, N) in x's dtype, got ", grad_y_in.sizes(), " ", grad_y_in.scalar_type());
  const Tensor grad_y = grad_y_in.contiguous();
  const int64_t rows = x.size(0), columns = w_shape[0], k = w_shape[1], rank = lora_a.size(0);
  const Dropout dropout = dropout_of(dropout_p, seed);
  const bool has_lora = scaling != 0.0 && rows > 0;
  const auto f32 = x.options().dtype(at::kFloat);
  Tensor grad_a = at::zeros({rank, k}, f32), grad_b = at::zeros({columns, rank}, f32), du;
  const Tensor a32 = lora_a.to(at::kFloat).contiguous();
  if (has_lora) {
    du = at::empty({rows, rank}, f32);
    // Atomics unless torch asks for determinism: the per-block partials cost blocks·N·r floats.
    const int64_t partials = at::globalContext().deterministicAlgorithms() ? grad_u_blocks(rows) : 1;
    Tensor db_partials = at::zeros({partials, columns, rank}, f32);
    launch_grad_u(grad_y, u.to(at::kFloat).contiguous(), lora_b.to(at::kFloat).contiguous(), scaling, du, db_partials);
    grad_b = db_partials.sum(0);
    Tensor da_partials = at::empty({grad_a_slices(rows), rank, k}, f32);
    launch_grad_a(du, x, dropout, da_partials);
    grad_a = da_partials.sum(0);
  }
  Tensor grad_x = at::empty({0}, x.options());
  if (need_dx) {
    const WeightView weight = weight_view(w_tensors, w_format, w_shape, w_blocksize);
    if (rows > 0 && in_workspace(regime, grad_y.scalar_type(), weight)) {
      grad_x = grad_x_in_workspace(grad_y, weight, w_tensors[kData], du, a32, dropout);
    } else {
      grad_x = at::empty({rows, k}, x.options());
      launch_grad_x_gemm(grad_y, weight, du, a32, dropout, grad_x);
    }
  }
  return {grad_x, grad_a.to(lora_a.scalar_type()), grad_b.to(lora_b.scalar_type())};
}

}  // namespace fusedlora
