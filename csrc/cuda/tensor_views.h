// Host side of the launchers: the kernels' strided views (pixel_math.cuh) of at::Tensors, and their size checks.
#pragma once

#include <ATen/ATen.h>

#include <limits>

#include "pixel_math.cuh"

namespace ccl::cuda {

template <typename scalar_t>
inline Logits<scalar_t> logits_view(const at::Tensor& z) {
  return {z.const_data_ptr<scalar_t>(), z.stride(0), z.stride(1), z.stride(2), z.stride(3)};
}

inline Labels labels_view(const at::Tensor& y) {
  return {y.const_data_ptr<int64_t>(), y.stride(0), y.stride(1), y.stride(2)};
}

// The per-pixel kernels index channels and pixels of one image with int.
inline void check_sizes(const at::Tensor& z) {
  const int64_t C = z.size(1), HW = z.size(2) * z.size(3);
  TORCH_CHECK(C <= std::numeric_limits<int>::max(), "ccl (CUDA): C = ", C, " is too large");
  TORCH_CHECK(HW <= std::numeric_limits<int>::max() - kThreads, "ccl (CUDA): H * W = ", HW,
              " is too large (at most 2^31 - 257 pixels per image)");
}

}  // namespace ccl::cuda
