// Dispatch on the activation dtype (fp32, fp16, bf16) to CUDA's own element types.
#pragma once

#include <ATen/Dispatch.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace fusedlora {

template <typename T> struct CudaType { using type = T; };
template <> struct CudaType<at::Half> { using type = __half; };
template <> struct CudaType<at::BFloat16> { using type = __nv_bfloat16; };

}  // namespace fusedlora

// Runs the lambda with `scalar_t` (ATen's type) for a float, half or bfloat16 `TYPE`.
#define FUSEDLORA_DISPATCH_ACTIVATION(TYPE, NAME, ...)                 \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                      \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))
