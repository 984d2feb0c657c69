// Dispatch on the activation dtype (fp32, fp16, bf16) to CUDA's own element types, and on the
// weight format.
#pragma once

#include <ATen/Dispatch.h>

#include <type_traits>

#include "device.cuh"
#include "types.h"

namespace fusedlora {

template <typename T> struct CudaType { using type = T; };
template <> struct CudaType<at::Half> { using type = __half; };
template <> struct CudaType<at::BFloat16> { using type = __nv_bfloat16; };

// Calls `launch(std::integral_constant<int, FMT>{})` for the weight format `fmt` (types.h's
// WeightFormat): the kernels are compiled per format, with no per-element switch.
template <typename Launch>
void dispatch_format(int fmt, Launch&& launch) {
  switch (fmt) {
    case kNf4: launch(std::integral_constant<int, kNf4>{}); break;
    case kFp4: launch(std::integral_constant<int, kFp4>{}); break;
    case kInt8: launch(std::integral_constant<int, kInt8>{}); break;
    case kFp8: launch(std::integral_constant<int, kFp8>{}); break;
    default: launch(std::integral_constant<int, kDense>{}); break;
  }
}

}  // namespace fusedlora

// Runs the lambda with `scalar_t` (ATen's type) for a float, half or bfloat16 `TYPE`.
#define FUSEDLORA_DISPATCH_ACTIVATION(TYPE, NAME, ...)                 \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                      \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__))
