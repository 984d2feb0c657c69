// The CPU execution harness's ops (docs/design.md §6): the CUDA backend's host logic
// (csrc/lora_ops.cpp) and kernels (csrc/*.cu, emulated by emulated_device.h) on CPU tensors.
//   fusedlora_emulated::forward / backward: the schemas of fusedlora::cuda_lora_fwd / cuda_lora_bwd
//   fusedlora_emulated::set_schedule(order, seed): "forward", "reverse" or "shuffled"
//   fusedlora_emulated::last_forward_cost(): [kernel launches, allocations] of the last forward call
//   fusedlora_emulated::convert(values, type): the emulated fp16 / bf16 rounding and fp8 decoding
//   fusedlora_emulated::mma_tile(a, bt, c, lane_shift, skip_wait): primitives_kernel.cuh's tile
//   fusedlora_emulated::gemm_on_tensor_cores(left, w_tensors, w_format, w_shape, w_blocksize):
//     whether the GEMM launchers take csrc/gemm_mma.cu for this left operand (x or g) and weight
//   fusedlora_emulated::dequantize_takes(left, ...): whether a call asked to run in the workspace
//     regime does so for activations of left's dtype and this weight
// During a call every CPU allocation (the inputs' copies, which keep their strides, the outputs,
// the temporaries) is guarded: it ends at an inaccessible page (16-byte granularity, the widest
// load) and the pages before it, back to another inaccessible one, are 0xFF bytes (NaN in every
// float type), so a read past a tensor's end faults, one before its start reads NaN, and an output
// element a kernel never writes stays NaN. (0xFF is no NaN in integer data.)

#include <ATen/ATen.h>
#include <c10/core/CPUAllocator.h>
#include <sys/mman.h>
#include <torch/library.h>
#include <unistd.h>

#include <cstring>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>

#include "emulated_device.h"
#include "kernels.h"
#include "primitives_kernel.cuh"

namespace fusedlora {
namespace {

using at::Tensor;

// Guarded allocations since the process started.
int64_t& allocations() {
  static int64_t count = 0;
  return count;
}

// Its data pointers are their own contexts (mappings found by data pointer), so that ATen's CPU
// routines that take raw allocations (the workspace regime's matmuls) work under it too.
class GuardedAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t bytes) override {
    ++allocations();
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t rounded = (bytes + 15) / 16 * 16;
    const size_t body = (rounded + page - 1) / page * page;
    const size_t total = body + 2 * page;
    void* base = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(base != MAP_FAILED, "emulation: cannot map ", total, " bytes");
    char* start = static_cast<char*>(base);
    mprotect(start, page, PROT_NONE);
    mprotect(start + page + body, page, PROT_NONE);
    char* data = start + page + body - rounded;
    std::memset(start + page, 0xFF, body);
    {
      const std::lock_guard<std::mutex> lock(mutex());
      mappings()[data] = Mapping{base, total};
    }
    return {data, data, &GuardedAllocator::release, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &GuardedAllocator::release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { std::memcpy(dest, src, count); }

 private:
  struct Mapping {
    void* base;
    size_t bytes;
  };
  static std::mutex& mutex() {
    static std::mutex instance;
    return instance;
  }
  static std::unordered_map<void*, Mapping>& mappings() {
    static std::unordered_map<void*, Mapping> instance;
    return instance;
  }
  static void release(void* data) {
    Mapping mapping{};
    {
      const std::lock_guard<std::mutex> lock(mutex());
      const auto found = mappings().find(data);
      TORCH_CHECK(found != mappings().end(), "emulation: freeing memory this allocator did not give");
      mapping = found->second;
      mappings().erase(found);
    }
    munmap(mapping.base, mapping.bytes);
  }
};

// Guarded allocation for the scope's lifetime.
class Guarded {
 public:
  Guarded() : previous_(c10::GetCPUAllocator()) {
    c10::SetCPUAllocator(&allocator(), 0);
    TORCH_CHECK(c10::GetCPUAllocator() == &allocator(), "emulation: another CPU allocator has a higher priority");
  }
  ~Guarded() { c10::SetCPUAllocator(previous_, 0); }

 private:
  static GuardedAllocator& allocator() {
    static GuardedAllocator instance;
    return instance;
  }
  c10::Allocator* previous_;
};

// A guarded copy of `t` with its strides (a row-strided view stays one).
Tensor copied(const Tensor& t) { return at::empty_strided(t.sizes(), t.strides(), t.options()).copy_(t); }

std::vector<Tensor> copied(at::TensorList tensors) {
  std::vector<Tensor> copies;
  for (const Tensor& t : tensors) copies.push_back(copied(t));
  return copies;
}

// (kernel launches, allocations) of the last forward call, its inputs' copies left out.
std::vector<int64_t>& forward_cost() {
  static std::vector<int64_t> cost{0, 0};
  return cost;
}

std::tuple<Tensor, Tensor> forward(const Tensor& x, at::TensorList w_tensors, c10::string_view w_format,
                                   at::IntArrayRef w_shape, int64_t w_blocksize, const Tensor& lora_a,
                                   const Tensor& lora_b, double scaling, const std::optional<Tensor>& bias,
                                   double dropout_p, const Tensor& seed, c10::string_view regime) {
  Guarded guarded;
  const std::optional<Tensor> bias_copy = bias.has_value() ? std::optional<Tensor>(copied(*bias)) : std::nullopt;
  const Tensor x_copy = copied(x), a_copy = copied(lora_a), b_copy = copied(lora_b);
  const std::vector<Tensor> w_copy = copied(w_tensors);
  const int64_t launches_before = launches(), allocations_before = allocations();
  auto outputs = lora_forward(x_copy, w_copy, w_format, w_shape, w_blocksize, a_copy, b_copy, scaling, bias_copy,
                              dropout_p, seed, regime);
  forward_cost() = {launches() - launches_before, allocations() - allocations_before};
  return outputs;
}

std::vector<int64_t> last_forward_cost() { return forward_cost(); }

bool takes_tensor_cores(const Tensor& left, at::TensorList w_tensors, c10::string_view w_format, at::IntArrayRef w_shape,
                        int64_t w_blocksize) {
  return gemm_on_tensor_cores(left, weight_view(w_tensors, w_format, w_shape, w_blocksize), w_shape[0], w_shape[1]);
}

bool workspace_takes(const Tensor& left, at::TensorList w_tensors, c10::string_view w_format, at::IntArrayRef w_shape,
                     int64_t w_blocksize) {
  return dequantize_takes(left.scalar_type(), weight_view(w_tensors, w_format, w_shape, w_blocksize));
}

std::tuple<Tensor, Tensor, Tensor> backward(const Tensor& grad_y, const Tensor& x, const Tensor& u,
                                            at::TensorList w_tensors, c10::string_view w_format,
                                            at::IntArrayRef w_shape, int64_t w_blocksize, const Tensor& lora_a,
                                            const Tensor& lora_b, double scaling, double dropout_p, const Tensor& seed,
                                            bool need_dx, c10::string_view regime) {
  Guarded guarded;
  return lora_backward(copied(grad_y), copied(x), copied(u), copied(w_tensors), w_format, w_shape, w_blocksize,
                       copied(lora_a), copied(lora_b), scaling, dropout_p, seed, need_dx, regime);
}

// float32 `values` through the harness's 16-bit types and back ("fp16", "bf16"), or uint8 `values`
// decoded as fp8 e4m3 ("fp8"): the emulated conversions, for tests against torch's.
Tensor convert(const Tensor& values, c10::string_view type) {
  const std::string name(type);
  Tensor out = at::empty(values.sizes(), values.options().dtype(at::kFloat));
  const int64_t count = values.numel();
  float* result = out.data_ptr<float>();
  if (name == "fp8") {
    TORCH_CHECK(values.scalar_type() == at::kByte, "convert: fp8 takes uint8 codes");
    const uint8_t* codes = values.contiguous().data_ptr<uint8_t>();
    for (int64_t i = 0; i < count; ++i) result[i] = static_cast<float>(__nv_fp8_e4m3{codes[i]});
    return out;
  }
  TORCH_CHECK(values.scalar_type() == at::kFloat && (name == "fp16" || name == "bf16"), "convert: fp16 or bf16 of float32");
  const Tensor contiguous = values.contiguous();
  const float* source = contiguous.data_ptr<float>();
  for (int64_t i = 0; i < count; ++i)
    result[i] = name == "fp16" ? __half2float(__float2half_rn(source[i])) : __bfloat162float(__float2bfloat16_rn(source[i]));
  return out;
}

// tests/emulation/primitives_kernel.cuh on bf16 A (16x16), Bᵀ (8x16) and fp32 C (16x8): A·B + C.
Tensor mma_tile(const Tensor& a, const Tensor& bt, const Tensor& c, int64_t lane_shift, bool skip_wait) {
  TORCH_CHECK(a.sizes() == at::IntArrayRef({16, 16}) && bt.sizes() == at::IntArrayRef({8, 16}) &&
                  c.sizes() == at::IntArrayRef({16, 8}) && a.scalar_type() == at::kBFloat16 &&
                  bt.scalar_type() == at::kBFloat16 && c.scalar_type() == at::kFloat,
              "mma_tile: bf16 A (16, 16) and B^T (8, 16), fp32 C (16, 8)");
  Guarded guarded;
  const Tensor a_copy = copied(a.contiguous()), bt_copy = copied(bt.contiguous()), c_copy = copied(c.contiguous());
  Tensor d = at::empty({16, 8}, c.options());
  launch(mma_tile_kernel<__nv_bfloat16>, dim3(1), dim3(32),
         reinterpret_cast<const __nv_bfloat16*>(a_copy.data_ptr<at::BFloat16>()),
         reinterpret_cast<const __nv_bfloat16*>(bt_copy.data_ptr<at::BFloat16>()), c_copy.data_ptr<float>(),
         d.data_ptr<float>(), static_cast<int>(lane_shift), skip_wait);
  return d;
}

void set_schedule(c10::string_view order, int64_t seed) {
  const std::string name(order);
  auto& schedule = emulation::schedule();
  if (name == "forward") {
    schedule.order = emulation::Order::kForward;
  } else if (name == "reverse") {
    schedule.order = emulation::Order::kReverse;
  } else if (name == "shuffled") {
    schedule.order = emulation::Order::kShuffled;
  } else {
    TORCH_CHECK(false, "set_schedule: order must be forward, reverse or shuffled, got ", name);
  }
  schedule.seed = static_cast<uint64_t>(seed);
}

}  // namespace

TORCH_LIBRARY(fusedlora_emulated, m) {
  m.def("forward(Tensor x, Tensor[] w_tensors, str w_format, int[] w_shape, int w_blocksize, Tensor lora_A, "
        "Tensor lora_B, float scaling, Tensor? bias, float dropout_p, Tensor seed, str regime=\"fused\") "
        "-> (Tensor, Tensor)");
  m.def("backward(Tensor grad_y, Tensor x, Tensor u, Tensor[] w_tensors, str w_format, int[] w_shape, "
        "int w_blocksize, Tensor lora_A, Tensor lora_B, float scaling, float dropout_p, Tensor seed, bool need_dx, "
        "str regime=\"fused\") -> (Tensor, Tensor, Tensor)");
  m.def("set_schedule(str order, int seed) -> ()", &set_schedule);
  m.def("last_forward_cost() -> int[]", &last_forward_cost);
  m.def("convert(Tensor values, str type) -> Tensor");
  m.def("mma_tile(Tensor a, Tensor bt, Tensor c, int lane_shift, bool skip_wait) -> Tensor");
  m.def("gemm_on_tensor_cores(Tensor left, Tensor[] w_tensors, str w_format, int[] w_shape, int w_blocksize) -> bool");
  m.def("dequantize_takes(Tensor left, Tensor[] w_tensors, str w_format, int[] w_shape, int w_blocksize) -> bool");
}

TORCH_LIBRARY_IMPL(fusedlora_emulated, CPU, m) {
  m.impl("forward", &forward);
  m.impl("backward", &backward);
  m.impl("convert", &convert);
  m.impl("mma_tile", &mma_tile);
  m.impl("gemm_on_tensor_cores", &takes_tensor_cores);
  m.impl("dequantize_takes", &workspace_takes);
}

}  // namespace fusedlora
