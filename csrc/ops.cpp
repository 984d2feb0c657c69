// The CUDA backend's ops, in the `fusedlora` namespace, with the schemas and argument order of
// the Python ops fusedlora::lora_linear_fwd / lora_linear_bwd (fusedlora/ops.py) but `backend`,
// and one more argument, `regime` ("fused" / "workspace": fusedlora/backends/regimes.py's choice):
//   cuda_lora_fwd(x, w_tensors, w_format, w_shape, w_blocksize, lora_A, lora_B, scaling, bias?,
//                 dropout_p, seed, regime) -> (y, u)
//   cuda_lora_bwd(grad_y, x, u, w_tensors, w_format, w_shape, w_blocksize, lora_A, lora_B,
//                 scaling, dropout_p, seed, need_dx, regime) -> (dx, dA, dB)
// Registered with TORCH_LIBRARY (no pybind11); their fake impls are fusedlora/contract.py's,
// registered by fusedlora/extension.py. This file checks the device and sets it; the computation is
// lora_ops.cpp's (which the CPU execution harness runs too).

#include <ATen/ATen.h>
#include <Python.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "kernels.h"

namespace fusedlora {
namespace {

using at::Tensor;

void check_cuda(const Tensor& x, const Tensor& lora_a, const Tensor& lora_b) {
  TORCH_CHECK(x.is_cuda() && lora_a.is_cuda() && lora_b.is_cuda(), "fusedlora: cuda ops take CUDA tensors");
}

std::tuple<Tensor, Tensor> cuda_lora_fwd(const Tensor& x, at::TensorList w_tensors, c10::string_view w_format,
                                         at::IntArrayRef w_shape, int64_t w_blocksize, const Tensor& lora_a,
                                         const Tensor& lora_b, double scaling, const std::optional<Tensor>& bias,
                                         double dropout_p, const Tensor& seed, c10::string_view regime) {
  check_cuda(x, lora_a, lora_b);
  const c10::cuda::CUDAGuard guard(x.device());
  return lora_forward(x, w_tensors, w_format, w_shape, w_blocksize, lora_a, lora_b, scaling, bias, dropout_p, seed,
                      regime);
}

std::tuple<Tensor, Tensor, Tensor> cuda_lora_bwd(const Tensor& grad_y, const Tensor& x, const Tensor& u,
                                                 at::TensorList w_tensors, c10::string_view w_format,
                                                 at::IntArrayRef w_shape, int64_t w_blocksize, const Tensor& lora_a,
                                                 const Tensor& lora_b, double scaling, double dropout_p,
                                                 const Tensor& seed, bool need_dx, c10::string_view regime) {
  check_cuda(x, lora_a, lora_b);
  const c10::cuda::CUDAGuard guard(x.device());
  return lora_backward(grad_y, x, u, w_tensors, w_format, w_shape, w_blocksize, lora_a, lora_b, scaling, dropout_p,
                       seed, need_dx, regime);
}

}  // namespace

TORCH_LIBRARY(fusedlora, m) {
  m.def("cuda_lora_fwd(Tensor x, Tensor[] w_tensors, str w_format, int[] w_shape, int w_blocksize, Tensor lora_A, "
        "Tensor lora_B, float scaling, Tensor? bias, float dropout_p, Tensor seed, str regime) -> (Tensor, Tensor)");
  m.def("cuda_lora_bwd(Tensor grad_y, Tensor x, Tensor u, Tensor[] w_tensors, str w_format, int[] w_shape, "
        "int w_blocksize, Tensor lora_A, Tensor lora_B, float scaling, float dropout_p, Tensor seed, bool need_dx, "
        "str regime) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fusedlora, CUDA, m) {
  m.impl("cuda_lora_fwd", &cuda_lora_fwd);
  m.impl("cuda_lora_bwd", &cuda_lora_bwd);
}

}  // namespace fusedlora

// `import fusedlora._C` loads this library (whose static initialisers register the ops); the
// module itself is empty (pytorch/extension-cpp's pattern, no pybind11).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
