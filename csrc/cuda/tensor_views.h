// Host side of the launchers: the kernels' strided views (pixel_math.cuh) of at::Tensors.
#pragma once

#include <ATen/ATen.h>

#include "pixel_math.cuh"

namespace ccl::cuda {

template <typename scalar_t>
inline Logits<scalar_t> logits_view(const at::Tensor& z) {
  return {z.const_data_ptr<scalar_t>(), z.stride(0), z.stride(1), z.stride(2), z.stride(3)};
}

inline Labels labels_view(const at::Tensor& y) {
  return {y.const_data_ptr<int64_t>(), y.stride(0), y.stride(1), y.stride(2)};
}

}  // namespace ccl::cuda
