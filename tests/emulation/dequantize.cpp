// csrc/dequantize.cu compiled as host C++ for the CPU execution harness. ATen's headers come first: the
// harness's device header (through csrc/device.cuh) defines CUDA's keywords, which ATen must not see.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include "dequantize.cu"
