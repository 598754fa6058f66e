// The gradient outputs of the CPU kernels that write gradients in their forward pass.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "fresh_pages.h"

namespace ccl::cpu {

// A gradient buffer of z's shape (contiguous), or an empty tensor when not asked for. They are fresh buffers first
// written by these kernels: with glibc's allocator every logits-sized buffer is a fresh mmap whose pages fault on
// first touch, which on this VM costs more than the arithmetic (benchmarks/RESULTS_CPU.md), so they are mapped
// in bulk first (fresh_pages.h), and `fresh` says so: the forward then writes them with ordinary stores, since
// the zeroed lines are in the caches, and non-temporally otherwise (store_output, pixel_tile.h). Transparent
// huge pages were faster in a tight loop but 2x slower when calls are spaced out as in training (the VM hands
// freed 2 MB blocks back to its host, and touching them again faults there), so that choice is left to the
// user's allocator settings.
//
// A buffer that starts on a page boundary (tcmalloc hands those out) starts one 64-byte line later instead.
// Page-aligned, every gradient row of a tile sits at the same offset within a page as rows of the tile's
// page-aligned scratch, and the gradient pass ran at half speed: most likely its loads waiting on the stores
// before them (4K aliasing; moving the scratch instead recovered part of it). Measured with tcmalloc,
// forward+backward at (2, 19, 512, 512): 58 ms page-aligned, 29 ms a line on.
inline at::Tensor gradient_buffer(const at::Tensor& z, bool wanted, bool& fresh) {
  if (!wanted) return at::empty({0}, z.options());
  constexpr uintptr_t kPage = 4096;
  const int64_t line = 64 / static_cast<int64_t>(z.element_size());
  const auto storage = at::empty({z.numel() + line}, z.options());
  const bool page_aligned = reinterpret_cast<uintptr_t>(storage.data_ptr()) % kPage == 0;
  // A tensor of its own, starting `line` on when page-aligned, so that its storage offset is 0 whatever the
  // allocator gave (as the op's fake implementation says); the deleter keeps the allocation alive.
  char* start = static_cast<char*>(storage.data_ptr()) + (page_aligned ? line * z.element_size() : 0);
  auto grad = at::from_blob(start, z.sizes(), [storage](void*) {}, z.options());
  fresh = populate_for_writing(grad) || fresh;
  return grad;
}

}  // namespace ccl::cpu
