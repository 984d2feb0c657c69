// Plain descriptions of a call that host code fills and kernels read (no CUDA types here).
#pragma once

#include <cstdint>

namespace fusedlora {

enum WeightFormat : int { kDense = 0, kInt8 = 1, kFp8 = 2, kNf4 = 3, kFp4 = 4 };
// A weight's storage tensors in the order the ops take them; a format holds a prefix of these.
enum WeightSlot : int { kData = 0, kScale = 1, kNestedAbsmax = 2, kNestedCode = 3, kNestedOffset = 4 };
enum DenseType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// The frozen (N, K) weight as the kernels see it (the fields of fusedlora/contract.py's
// `WeightArgs`, without the code table, which lives in constant memory): `data` holds the dense values, the int8 / fp8
// values or the packed 4-bit codes; `scale` holds SCB (int8), the row scale (fp8) or the block
// absmax (4-bit: fp32, or uint8 codes into `nested_code` when nested). Absent tensors are null.
struct WeightView {
  int fmt;
  int dense_type;
  bool nested;
  int64_t k;
  int64_t stride_n;
  int64_t blocksize;
  const void* data;
  const void* scale;
  const float* nested_absmax;
  const float* nested_code;
  const float* nested_offset;
};

// A row-major matrix of fp32, fp16 or bf16 values (`type`: a DenseType) whose dtype is known only
// at run time: the LoRA factors, the bias and u, which the small-M kernel reads and writes in the
// caller's dtypes. `data` null: absent.
struct Operand {
  const void* data;
  int type;
  int64_t stride;
};

// The dropout of one call: the mask is a hash of (seed, element index), see common.cuh.
struct Dropout {
  bool active;
  uint32_t seed;
  uint64_t threshold;
  float keep_scale;
};

}  // namespace fusedlora
