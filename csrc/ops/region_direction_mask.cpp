// Schema of the region direction mask (METHOD.md §2). Kernels:
// csrc/cpu/region_direction_mask_kernel.cpp, csrc/cuda/region_direction_mask_kernel.cu.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(ccl, m) {
  // Outputs: direction int8 (N, ceil(H/rh), ceil(W/rw)) with +1 where A's score
  // is strictly better, -1 where B's is, 0 otherwise; scores float32
  // (N, 2, ceil(H/rh), ceil(W/rw)), NaN for a region without valid pixels.
  m.def(
      "region_direction_mask(Tensor za, Tensor zb, Tensor y, int region_h, "
      "int region_w, str score, int ignore_index) -> (Tensor, Tensor)");
}
