// SIMT shim: the CUDA surface the kernel headers of csrc/cuda use, for compiling them as host C++ and running
// them on the CPU (`g++ -x c++ -include tests/simt/simt.h ...`). Each CUDA thread is a fiber of the scheduler in
// simt_runtime.h; __syncthreads and the warp shuffles are barriers across the block's or the warp's fibers.
//
// Only what the project's kernels use is provided, and every use is checked where CUDA leaves it undefined
// (shuffle masks and widths, barrier divergence): an unchecked stand-in would hide exactly the defects this
// harness exists to find.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

// ---- keywords ---------------------------------------------------------------------------------------------

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)  // checked at launch: simt::launch takes the kernel's bound
// Shared memory: static storage (one block runs at a time, so one copy suffices). Device code has no other
// static variables, so the runtime finds every __shared__ array as a function-local static of namespace ccl in
// the harness's own symbol table, and poisons them all before each block (simt_runtime.h, shared_arrays()).
#define __shared__ static

constexpr int warpSize = 32;

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace simt {

// The emulated thread's coordinates (they abort when called outside a kernel).
const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();

// Barriers. `site` identifies the call in the source: threads of a block must meet at the same one.
void sync_block(const char* file, int line);
enum class ShflMode { kDown, kXor };
uint64_t shfl(ShflMode mode, unsigned int mask, uint64_t bits, unsigned int arg, int width, const char* file,
              int line);

[[noreturn]] void device_assert_failed(const char* what, const char* file, int line);

template <typename T>
T shfl_as(ShflMode mode, unsigned int mask, T var, unsigned int arg, int width, const char* file, int line) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>, "shfl of a type CUDA can move");
  uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = shfl(mode, mask, bits, arg, width, file, line);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

}  // namespace simt

#define threadIdx (::simt::thread_idx())
#define blockIdx (::simt::block_idx())
#define blockDim (::simt::block_dim())
#define gridDim (::simt::grid_dim())

inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::simt::sync_block(file, line);
}

template <typename T>
T __shfl_down_sync(unsigned int mask, T var, unsigned int delta, int width = warpSize,
                   const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::simt::shfl_as(::simt::ShflMode::kDown, mask, var, delta, width, file, line);
}

template <typename T>
T __shfl_xor_sync(unsigned int mask, T var, unsigned int lane_mask, int width = warpSize,
                  const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::simt::shfl_as(::simt::ShflMode::kXor, mask, var, lane_mask, width, file, line);
}

// A failed device assertion stops the run with the kernel, block and thread (on a GPU: "device-side assert").
#define CCL_ASSERT_LABEL(ok) \
  ((ok) ? (void)0 : ::simt::device_assert_failed("y contains a label value that is neither in [0, C) nor ignore_index", __FILE__, __LINE__))

// expf: the host's, or (a case with "fast_math 1") a model of nvcc's --use_fast_math __expf (harness.cpp).
namespace simt {
float device_expf(float x);
// The defect build (tests/test_simt_defects.py) compiles mutated copies of the kernels whose mutations are
// switched on by SIMT_MUTANT=k; the real kernels never call this.
int mutant();
}  // namespace simt
#define CCL_DEVICE_EXPF ::simt::device_expf
