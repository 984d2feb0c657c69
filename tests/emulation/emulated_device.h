// The CPU execution harness's device: compiles csrc/'s kernels as C++20 host code and runs them.
// csrc/device.cuh includes this header when FUSEDLORA_HOST_EMULATION is defined, in place of
// CUDA's; it provides the CUDA keywords and built-ins, the 16-bit and fp8 types, and the
// primitives of csrc/device.cuh (block_sync, warp_shfl_xor, atomic_add, thread_fence,
// load_coherent, shared_array, the host's multiprocessor_count and stream queries, wmma,
// opaque, pack_pair, mul_pairs, mma_m16n8k16, ldmatrix_x4, cp_async_*, launch) with their documented semantics, lane layouts and
// alignment rules (docs/design.md §6).
//
// Execution: one fiber (ucontext) per CUDA thread, a block run by one OS thread. The scheduler
// runs one warp at a time until every lane of it waits (at a warp-wide operation, which it then
// completes, or at block_sync, or exited), then the next warp; when every thread waits at
// block_sync it releases them. So warps never meet at a warp-wide operation by accident, which
// would act as a hidden barrier and hide a missing block_sync. Warps, lanes and blocks run in
// the order set by `set_schedule`: forward, reverse, or shuffled from a seed. Shared memory is
// poisoned (0xFF bytes: NaN in every float type) at each block's start and limited to the 48 KiB
// of a launch without dynamic shared memory. Errors (a broken rule, a warp that diverges at a
// warp-wide operation) abort the launch with an exception naming the block and thread.
#pragma once

#include <ucontext.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// CUDA's keywords: host code now. __constant__ tables live in headers: one copy per translation unit.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __constant__ static

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {  // CUDA's: a misaligned 16-byte load is then UBSan's error here
  uint32_t x, y, z, w;
};
struct alignas(8) uint2 {
  uint32_t x, y;
};

inline int __ffsll(long long value) { return __builtin_ffsll(value); }

// ---- 16-bit floats (round to nearest even) and fp8 e4m3 (decoded exactly) ----

struct __half {
  uint16_t __x;
};
struct __nv_bfloat16 {
  uint16_t __x;
};

inline uint32_t float_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  return bits;
}
inline float bits_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, 4);
  return value;
}

inline float __half2float(__half h) {
  const uint32_t sign = (h.__x & 0x8000u) << 16, exponent = (h.__x >> 10) & 0x1F, mantissa = h.__x & 0x3FF;
  if (exponent == 0x1F) return bits_float(sign | 0x7F800000u | (mantissa << 13));  // inf, NaN
  if (exponent == 0) {  // zero and subnormals: mantissa · 2^-24
    const float magnitude = std::ldexp(static_cast<float>(mantissa), -24);
    return sign ? -magnitude : magnitude;
  }
  return bits_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

inline __half __float2half_rn(float value) {
  const uint32_t bits = float_bits(value), sign = (bits >> 16) & 0x8000u;
  const uint32_t magnitude = bits & 0x7FFFFFFFu;
  if (magnitude > 0x7F800000u) return {static_cast<uint16_t>(sign | 0x7E00u)};  // NaN
  if (magnitude >= 0x477FF000u) return {static_cast<uint16_t>(sign | 0x7C00u)};  // rounds to inf (>= 65520)
  if (magnitude < 0x38800000u) {  // below fp16's smallest normal: a multiple of 2^-24, ties to even
    const float scaled = std::ldexp(bits_float(magnitude), 24);
    return {static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(scaled)))};
  }
  const uint32_t rounded = magnitude + 0xFFFu + ((magnitude >> 13) & 1u);
  return {static_cast<uint16_t>(sign | ((rounded - 0x38000000u) >> 13))};
}

inline float __bfloat162float(__nv_bfloat16 b) { return bits_float(static_cast<uint32_t>(b.__x) << 16); }

inline __nv_bfloat16 __float2bfloat16_rn(float value) {
  const uint32_t bits = float_bits(value);
  if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return {static_cast<uint16_t>((bits >> 16) | 0x40u)};  // NaN
  return {static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16)};
}

using __nv_fp8_storage_t = uint8_t;
struct __nv_fp8_e4m3 {
  __nv_fp8_storage_t __x;
  explicit operator float() const {  // 1 sign, 4 exponent (bias 7), 3 mantissa bits; S.1111.111 is NaN
    const int exponent = (__x >> 3) & 0xF, mantissa = __x & 0x7;
    float magnitude;
    if (exponent == 0xF && mantissa == 0x7) {
      magnitude = NAN;
    } else if (exponent == 0) {
      magnitude = std::ldexp(static_cast<float>(mantissa), -9);
    } else {
      magnitude = std::ldexp(static_cast<float>(8 + mantissa), exponent - 10);
    }
    return (__x & 0x80) ? -magnitude : magnitude;
  }
};

struct float2 {
  float x, y;
};

// Two fp8 e4m3 values, the first in the low byte.
using __nv_fp8x2_storage_t = uint16_t;
struct __nv_fp8x2_e4m3 {
  __nv_fp8x2_storage_t __x;
  explicit operator float2() const {
    return {static_cast<float>(__nv_fp8_e4m3{static_cast<uint8_t>(__x & 0xFF)}),
            static_cast<float>(__nv_fp8_e4m3{static_cast<uint8_t>(__x >> 8)})};
  }
};

namespace fusedlora {

// CUDA's device min / max, for the kernels (in this namespace; nothing outside sees them).
template <typename T>
inline T min(T a, T b) { return b < a ? b : a; }
template <typename T>
inline T max(T a, T b) { return a < b ? b : a; }

namespace emulation {

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum class Order { kForward, kReverse, kShuffled };
struct Schedule {
  Order order = Order::kForward;
  uint64_t seed = 0;
};
inline Schedule& schedule() {
  static Schedule current;
  return current;
}

constexpr int kWarpSize = 32;
constexpr size_t kSharedLimit = 48 * 1024;  // static shared memory of one block
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kWarpSlotBytes = 64;  // per lane: a warp-wide operation's value or arguments

enum class State { kReady, kWarpWait, kBlockWait, kDone };

// A thread's stack, with an inaccessible page below it (an overflow faults instead of corrupting).
class Stack {
 public:
  Stack() {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    bytes_ = kStackBytes + page;
    base_ = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base_ == MAP_FAILED) throw Error("emulation: cannot map a thread stack");
    mprotect(base_, page, PROT_NONE);
    top_ = static_cast<char*>(base_) + page;
  }
  ~Stack() { munmap(base_, bytes_); }
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
  void* top() const { return top_; }

 private:
  void* base_;
  void* top_;
  size_t bytes_;
};

// A cp.async copy in flight: done at the cp_async_wait that retires its group (so a read before
// that wait sees what was there: the poison).
struct AsyncCopy {
  void* destination;
  const void* source;  // null: 16 zero bytes
};

struct Fiber {
  ucontext_t context;
  State state = State::kReady;
  const char* operation = nullptr;  // the warp-wide operation it waits at
  dim3 thread;
  int linear = 0;
  std::vector<AsyncCopy> open_group;
  std::vector<std::vector<AsyncCopy>> committed_groups;  // oldest first
};

class Block;
inline thread_local Block* current_block = nullptr;

inline std::vector<int> ordered(int count, std::mt19937_64& random) {
  std::vector<int> order(count);
  std::iota(order.begin(), order.end(), 0);
  if (schedule().order == Order::kReverse) std::reverse(order.begin(), order.end());
  if (schedule().order == Order::kShuffled) std::shuffle(order.begin(), order.end(), random);
  return order;
}

class Block {
 public:
  Block(dim3 grid, dim3 block, dim3 index, std::mt19937_64& random)
      : grid_(grid), dim_(block), index_(index), random_(random) {
    const int threads = static_cast<int>(block.x * block.y * block.z);
    if (threads < 1 || threads > 1024) throw Error("emulation: a block of " + std::to_string(threads) + " threads");
    fibers_.resize(threads);
    stacks_.reserve(threads);
    for (int t = 0; t < threads; ++t) stacks_.emplace_back(new Stack());
    warps_ = (threads + kWarpSize - 1) / kWarpSize;
    slots_.assign(static_cast<size_t>(threads) * kWarpSlotBytes, 0);
    std::memset(shared_, 0xFF, sizeof(shared_));
  }
  ~Block() {
    for (Stack* stack : stacks_) delete stack;
  }

  // Runs `body` (the kernel with its arguments) as every thread of the block.
  void run(const std::function<void()>& body) {
    body_ = &body;
    for (size_t t = 0; t < fibers_.size(); ++t) {
      Fiber& fiber = fibers_[t];
      fiber.linear = static_cast<int>(t);
      fiber.thread = dim3(t % dim_.x, (t / dim_.x) % dim_.y, t / (dim_.x * dim_.y));
      getcontext(&fiber.context);
      fiber.context.uc_stack.ss_sp = stacks_[t]->top();
      fiber.context.uc_stack.ss_size = kStackBytes;
      fiber.context.uc_link = &scheduler_;
      makecontext(&fiber.context, &Block::entry, 0);
    }
    Block* outer = current_block;
    current_block = this;
    try {
      schedule_all();
    } catch (...) {
      current_block = outer;
      throw;
    }
    current_block = outer;
  }

  const dim3& thread_index() const { return current_->thread; }
  const dim3& block_index() const { return index_; }
  const dim3& block_dim() const { return dim_; }
  const dim3& grid_dim() const { return grid_; }
  int lane() const { return current_->linear % kWarpSize; }
  int warp() const { return current_->linear / kWarpSize; }
  int lanes_of(int warp) const {
    return std::min<int>(kWarpSize, static_cast<int>(fibers_.size()) - warp * kWarpSize);
  }

  // This lane's slot of the current warp's exchange, and lane `other`'s.
  unsigned char* slot(int other) {
    return slots_.data() + static_cast<size_t>(warp() * kWarpSize + other) * kWarpSlotBytes;
  }

  // Suspends the current thread until the scheduler releases it from `state` (at a warp barrier:
  // of `operation`, which every lane of the warp must be at).
  void wait(State state, const char* operation = nullptr) {
    Fiber* fiber = current_;
    fiber->state = state;
    fiber->operation = operation;
    swapcontext(&fiber->context, &scheduler_);
  }

  Fiber& fiber() { return *current_; }

  bool in_shared(const void* pointer, size_t bytes) const {
    const auto* p = static_cast<const unsigned char*>(pointer);
    return p >= shared_ && p + bytes <= shared_ + shared_used_;
  }

  void* shared(const void* key, size_t bytes, size_t alignment) {
    auto found = shared_offsets_.find(key);
    if (found != shared_offsets_.end()) return shared_ + found->second;
    const size_t offset = (shared_used_ + alignment - 1) / alignment * alignment;
    if (offset + bytes > kSharedLimit)
      fail("shared memory of " + std::to_string(offset + bytes) + " bytes, more than the 48 KiB of a launch "
           "without dynamic shared memory");
    shared_used_ = offset + bytes;
    shared_offsets_[key] = offset;
    return shared_ + offset;
  }

  // Throws an Error naming this block and thread (inside a thread: the launch is aborted).
  [[noreturn]] void fail(const std::string& what) const {
    throw Error("emulation: block (" + std::to_string(index_.x) + ", " + std::to_string(index_.y) + ", " +
                std::to_string(index_.z) + "), thread " + std::to_string(current_ ? current_->linear : -1) + ": " +
                what);
  }

 private:
  static void entry() {
    Block* block = current_block;
    try {
      (*block->body_)();
    } catch (const std::exception& error) {
      if (block->error_.empty()) block->error_ = error.what();
    }
    block->current_->state = State::kDone;  // returning resumes the scheduler (uc_link)
  }

  void resume(Fiber& fiber) {
    current_ = &fiber;
    swapcontext(&scheduler_, &fiber.context);
    current_ = nullptr;
    if (!error_.empty()) throw Error(error_);
  }

  void schedule_all() {
    while (true) {
      for (int warp : ordered(warps_, random_)) run_warp(warp);
      bool done = true, waiting = false;
      for (Fiber& fiber : fibers_) {
        done = done && fiber.state == State::kDone;
        waiting = waiting || fiber.state == State::kBlockWait;
      }
      if (done) return;
      if (!waiting) fail("the scheduler found no thread to run");
      for (Fiber& fiber : fibers_)  // threads that exited count as arrived, as on sm_70 and later
        if (fiber.state == State::kBlockWait) fiber.state = State::kReady;
    }
  }

  // One warp until every lane waits at block_sync or has exited.
  void run_warp(int warp) {
    const int lanes = lanes_of(warp);
    while (true) {
      for (int lane : ordered(lanes, random_)) {
        Fiber& fiber = fibers_[warp * kWarpSize + lane];
        if (fiber.state == State::kReady) resume(fiber);
      }
      int at_warp = 0;
      for (int lane = 0; lane < lanes; ++lane) at_warp += fibers_[warp * kWarpSize + lane].state == State::kWarpWait;
      if (at_warp == 0) return;
      const std::string where = "emulation: block (" + std::to_string(index_.x) + ", " + std::to_string(index_.y) +
                                "), warp " + std::to_string(warp) + ": ";
      if (at_warp < lanes)
        throw Error(where + std::to_string(at_warp) + " of " + std::to_string(lanes) +
                    " lanes wait at a warp-wide operation while the others wait at block_sync or have exited");
      for (int lane = 1; lane < lanes; ++lane)
        if (std::strcmp(fibers_[warp * kWarpSize + lane].operation, fibers_[warp * kWarpSize].operation) != 0)
          throw Error(where + "lanes meet at different warp-wide operations (" +
                      fibers_[warp * kWarpSize].operation + ", " + fibers_[warp * kWarpSize + lane].operation + ")");
      for (int lane = 0; lane < lanes; ++lane) fibers_[warp * kWarpSize + lane].state = State::kReady;
    }
  }

  dim3 grid_, dim_, index_;
  std::mt19937_64& random_;
  std::vector<Fiber> fibers_;
  std::vector<Stack*> stacks_;
  int warps_ = 0;
  std::vector<unsigned char> slots_;
  alignas(128) unsigned char shared_[kSharedLimit];
  size_t shared_used_ = 0;
  std::map<const void*, size_t> shared_offsets_;
  ucontext_t scheduler_;
  Fiber* current_ = nullptr;
  const std::function<void()>* body_ = nullptr;
  std::string error_;
};

inline Block& block() {
  if (current_block == nullptr) throw Error("emulation: a device primitive called outside a kernel launch");
  return *current_block;
}

// Every lane of the warp arrives at `operation` before any goes on.
inline void warp_barrier(const char* operation) { block().wait(State::kWarpWait, operation); }

// Runs `body` as the grid's blocks, one at a time on this OS thread, in the schedule's order.
inline void run_grid(dim3 grid, dim3 threads, const std::function<void()>& body) {
  std::mt19937_64 random(schedule().seed);
  const int blocks = static_cast<int>(grid.x * grid.y * grid.z);
  for (int linear : ordered(blocks, random)) {
    const dim3 index(linear % grid.x, (linear / grid.x) % grid.y, linear / (grid.x * grid.y));
    auto block = std::make_unique<Block>(grid, threads, index, random);
    block->run(body);
  }
}

inline const dim3& thread_index() { return block().thread_index(); }
inline const dim3& block_index() { return block().block_index(); }
inline const dim3& block_dim() { return block().block_dim(); }
inline const dim3& grid_dim() { return block().grid_dim(); }

// The lanes of a warp-wide operation must pass the same arguments (CUDA: undefined otherwise).
template <typename Arguments>
void require_uniform(const Arguments& mine, const char* operation) {
  static_assert(sizeof(Arguments) <= kWarpSlotBytes && std::is_trivially_copyable_v<Arguments>);
  Block& b = block();
  warp_barrier(operation);  // the previous exchange is read by every lane
  std::memcpy(b.slot(b.lane()), &mine, sizeof(Arguments));
  warp_barrier(operation);
  if (std::memcmp(b.slot(0), &mine, sizeof(Arguments)) != 0)
    b.fail(std::string(operation) + ": the lanes of the warp pass different arguments");
  warp_barrier(operation);
}

}  // namespace emulation

// ---- csrc/device.cuh's primitives ----

inline void block_sync() { emulation::block().wait(emulation::State::kBlockWait); }

inline float warp_shfl_xor(float value, int offset) {
  emulation::Block& b = emulation::block();
  const int lane = b.lane(), other = lane ^ offset;
  if (other >= b.lanes_of(b.warp())) b.fail("warp_shfl_xor: lane " + std::to_string(other) + " is not in the warp");
  emulation::warp_barrier("warp_shfl_xor");  // the previous exchange is read by every lane
  std::memcpy(b.slot(lane), &value, sizeof(float));
  emulation::warp_barrier("warp_shfl_xor");
  float result;
  std::memcpy(&result, b.slot(other), sizeof(float));
  return result;
}

inline void atomic_add(float* address, float value) {
  if (reinterpret_cast<uintptr_t>(address) % alignof(float) != 0) emulation::block().fail("atomic_add: misaligned");
  std::atomic_ref<float>(*address).fetch_add(value);
}

inline int atomic_add(int* address, int value) {
  if (reinterpret_cast<uintptr_t>(address) % alignof(int) != 0) emulation::block().fail("atomic_add: misaligned");
  return std::atomic_ref<int>(*address).fetch_add(value);
}

// Blocks run one after another, each to its end: every write is seen by the blocks after it.
inline void thread_fence() {}
inline float load_coherent(const float* address) { return *address; }

// A GPU of 4 SMs: the launchers' grids split work as on a small GPU, so that ragged test shapes
// take their multi-block paths.
inline int multiprocessor_count() { return 4; }
inline bool stream_capturing() { return false; }
inline int64_t current_stream_id() { return 0; }

template <typename T, int Tag>
T& shared_array() {
  static const char key = 0;  // one per instantiation: per declaration
  return *static_cast<T*>(emulation::block().shared(&key, sizeof(T), 32));
}

// Kernel launches since the process started (the harness reports a call's).
inline int64_t& launches() {
  static int64_t count = 0;
  return count;
}

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, Args&&... args) {
  ++launches();
  std::tuple<std::decay_t<Params>...> bound(std::forward<Args>(args)...);
  emulation::run_grid(grid, block, [&] { std::apply(kernel, bound); });
}

// ---- mma.sync m16n8k16, ldmatrix, cp.async: PTX's documented lane layouts (see csrc/device.cuh) ----

namespace emulation {
template <typename T>
float half_value(uint16_t bits) {
  return std::is_same_v<T, __nv_bfloat16> ? __bfloat162float(__nv_bfloat16{bits}) : __half2float(__half{bits});
}
inline uint16_t low(uint32_t r) { return static_cast<uint16_t>(r & 0xFFFFu); }
inline uint16_t high(uint32_t r) { return static_cast<uint16_t>(r >> 16); }

inline void require_aligned(const void* pointer, size_t alignment, const char* operation) {
  if (reinterpret_cast<uintptr_t>(pointer) % alignment != 0)
    block().fail(std::string(operation) + ": address not " + std::to_string(alignment) + "-byte aligned");
}
}  // namespace emulation

template <typename T>
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>, "mma_m16n8k16 takes bf16 or fp16");
  struct Fragments {
    uint32_t a[4], b[2];
    float c[4];
  };
  emulation::Block& blk = emulation::block();
  const int lane = blk.lane();
  if (blk.lanes_of(blk.warp()) != emulation::kWarpSize) blk.fail("mma_m16n8k16: a warp of fewer than 32 lanes");
  emulation::warp_barrier("mma_m16n8k16");  // the previous exchange is read by every lane
  Fragments mine{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}, {c[0], c[1], c[2], c[3]}};
  std::memcpy(blk.slot(lane), &mine, sizeof(Fragments));
  emulation::warp_barrier("mma_m16n8k16");
  float A[16][16], B[16][8], C[16][8];
  for (int l = 0; l < emulation::kWarpSize; ++l) {
    Fragments f;
    std::memcpy(&f, blk.slot(l), sizeof(Fragments));
    const int g = l / 4, t = l % 4;
    for (int half = 0; half < 2; ++half) {  // a: (g, 2t..), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..)
      for (int j = 0; j < 2; ++j) {
        const uint32_t top = f.a[2 * half], bottom = f.a[2 * half + 1];
        A[g][2 * t + 8 * half + j] = emulation::half_value<T>(j ? emulation::high(top) : emulation::low(top));
        A[g + 8][2 * t + 8 * half + j] = emulation::half_value<T>(j ? emulation::high(bottom) : emulation::low(bottom));
      }
      B[2 * t + 8 * half][g] = emulation::half_value<T>(emulation::low(f.b[half]));
      B[2 * t + 8 * half + 1][g] = emulation::half_value<T>(emulation::high(f.b[half]));
    }
    for (int i = 0; i < 4; ++i) C[g + 8 * (i / 2)][2 * t + i % 2] = f.c[i];
  }
  const int g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i / 2), column = 2 * t + i % 2;
    float sum = C[row][column];
    for (int k = 0; k < 16; ++k) sum = std::fma(A[row][k], B[k][column], sum);
    d[i] = sum;
  }
  emulation::warp_barrier("mma_m16n8k16");
}

template <typename T>
uint32_t pack_pair(float low, float high) {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>, "pack_pair takes bf16 or fp16");
  uint16_t bits[2];
  for (int i = 0; i < 2; ++i) {
    const float value = i ? high : low;
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      bits[i] = __float2bfloat16_rn(value).__x;
    } else {
      bits[i] = __float2half_rn(value).__x;
    }
  }
  return static_cast<uint32_t>(bits[0]) | (static_cast<uint32_t>(bits[1]) << 16);
}

inline int opaque(int value) { return value; }  // an optimizer's matter alone

// A product of two 16-bit values is exact in fp32 (8- or 11-bit significands) above fp32's normal
// minimum, so one rounding to T is HMUL2's (below it, far under T's range, double rounding may differ).
template <typename T>
uint32_t mul_pairs(uint32_t a, uint32_t b) {
  using emulation::half_value, emulation::high, emulation::low;
  return pack_pair<T>(half_value<T>(low(a)) * half_value<T>(low(b)), half_value<T>(high(a)) * half_value<T>(high(b)));
}

template <bool Trans>
void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  emulation::Block& blk = emulation::block();
  const int lane = blk.lane();
  if (!blk.in_shared(row, 16)) blk.fail("ldmatrix_x4: a row address outside the block's shared memory");
  emulation::require_aligned(row, 16, "ldmatrix_x4");
  emulation::warp_barrier("ldmatrix_x4");
  std::memcpy(blk.slot(lane), &row, sizeof(row));
  emulation::warp_barrier("ldmatrix_x4");
  for (int j = 0; j < 4; ++j) {
    uint16_t pair[2];
    for (int e = 0; e < 2; ++e) {
      // Matrix j's rows come from lanes 8j..8j+7; lane l takes (row l/4, columns 2(l%4)+e), or transposed.
      const int matrix_row = Trans ? 2 * (lane % 4) + e : lane / 4, column = Trans ? lane / 4 : 2 * (lane % 4) + e;
      const unsigned char* source;
      std::memcpy(&source, blk.slot(8 * j + matrix_row), sizeof(source));
      std::memcpy(&pair[e], source + 2 * column, 2);
    }
    r[j] = static_cast<uint32_t>(pair[0]) | (static_cast<uint32_t>(pair[1]) << 16);
  }
  emulation::warp_barrier("ldmatrix_x4");
}

inline void cp_async_16(void* shared_destination, const void* global_source, uint32_t source_bytes = 16) {
  emulation::Block& blk = emulation::block();
  if (!blk.in_shared(shared_destination, 16)) blk.fail("cp_async_16: a destination outside the block's shared memory");
  emulation::require_aligned(shared_destination, 16, "cp_async_16");
  emulation::require_aligned(global_source, 16, "cp_async_16");
  if (source_bytes != 16 && source_bytes != 0) blk.fail("cp_async_16: source_bytes must be 16 or 0");
  blk.fiber().open_group.push_back({shared_destination, source_bytes ? global_source : nullptr});
}

inline void cp_async_commit() {
  emulation::Fiber& fiber = emulation::block().fiber();
  fiber.committed_groups.push_back(std::move(fiber.open_group));
  fiber.open_group.clear();
}

template <int N>
void cp_async_wait() {
  auto& groups = emulation::block().fiber().committed_groups;
  while (groups.size() > static_cast<size_t>(N)) {
    for (const emulation::AsyncCopy& copy : groups.front()) {
      if (copy.source) {
        std::memcpy(copy.destination, copy.source, 16);
      } else {
        std::memset(copy.destination, 0, 16);
      }
    }
    groups.erase(groups.begin());
  }
}

// ---- WMMA (16x16x16): fragments are opaque in CUDA, so each lane holds the whole tile here ----
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the harness emulates 16x16x16 WMMA only");
  T x[16 * 16];  // element (i, j) at x[16 * i + j]
};

namespace detail {
inline float value(float v) { return v; }
inline float value(__half v) { return __half2float(v); }
inline float value(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
void check_pointer(const T* pointer, unsigned ldm, const char* operation) {
  if (reinterpret_cast<uintptr_t>(pointer) % 32 != 0) emulation::block().fail(std::string(operation) + ": pointer not 32-byte aligned");
  if ((ldm * sizeof(T)) % 16 != 0) emulation::block().fail(std::string(operation) + ": ldm not a multiple of 16 bytes");
}

struct Arguments {
  const void* pointer;
  unsigned ldm;
  int layout;
};
}  // namespace detail

template <typename Use, typename T, typename Layout>
void fill_fragment(fragment<Use, 16, 16, 16, T, Layout>& f, float value) {
  for (T& element : f.x) {
    if constexpr (std::is_same_v<T, float>) {
      element = value;
    } else if constexpr (std::is_same_v<T, __half>) {
      element = __float2half_rn(value);
    } else {
      element = __float2bfloat16_rn(value);
    }
  }
}

template <typename Use, typename T, typename Layout>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& f, const T* pointer, unsigned ldm) {
  static_assert(!std::is_void_v<Layout>, "an operand fragment has a layout");
  emulation::require_uniform(detail::Arguments{pointer, ldm, 0}, "wmma::load_matrix_sync");
  detail::check_pointer(pointer, ldm, "wmma::load_matrix_sync");
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j)
      f.x[16 * i + j] = std::is_same_v<Layout, row_major> ? pointer[i * ldm + j] : pointer[i + j * ldm];
  emulation::warp_barrier("wmma::load_matrix_sync");
}

template <typename T, typename Layout_a, typename Layout_b>
void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, Layout_a>& a,
              const fragment<matrix_b, 16, 16, 16, T, Layout_b>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  emulation::warp_barrier("wmma::mma_sync");
  float result[16 * 16];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float sum = c.x[16 * i + j];
      for (int k = 0; k < 16; ++k) sum = std::fma(detail::value(a.x[16 * i + k]), detail::value(b.x[16 * k + j]), sum);
      result[16 * i + j] = sum;
    }
  std::copy(result, result + 16 * 16, d.x);
  emulation::warp_barrier("wmma::mma_sync");
}

inline void store_matrix_sync(float* pointer, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm,
                              layout_t layout) {
  emulation::require_uniform(detail::Arguments{pointer, ldm, static_cast<int>(layout)}, "wmma::store_matrix_sync");
  detail::check_pointer(pointer, ldm, "wmma::store_matrix_sync");
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) pointer[layout == mem_row_major ? i * ldm + j : i + j * ldm] = f.x[16 * i + j];
  emulation::warp_barrier("wmma::store_matrix_sync");
}

}  // namespace wmma
}  // namespace fusedlora

// CUDA's built-in indices: the current thread's, from the running block.
#define threadIdx (::fusedlora::emulation::thread_index())
#define blockIdx (::fusedlora::emulation::block_index())
#define blockDim (::fusedlora::emulation::block_dim())
#define gridDim (::fusedlora::emulation::grid_dim())
