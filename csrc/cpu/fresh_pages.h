// Fresh output memory, mapped in bulk before a kernel writes it.
//
// glibc serves every buffer over 32 MB by a fresh mmap, so each 4 KB page of a logits-sized gradient faults the
// first time a kernel stores to it: one trap per page, taken in the middle of the arithmetic. Asking the kernel
// to map a whole 2 MB chunk at once (madvise MADV_POPULATE_WRITE, Linux 5.14) does the same work without the
// traps, on all threads. Measured in the benchmark's rounds at (2, 19, 512, 512) float32 (benchmarks/
// RESULTS_CPU.md): pixel_selective_kl forward+backward 120 -> 86 ms, 63 -> 45 ms in a tight loop.
//
// Memory an allocator hands out again is already mapped: populating it again walks its page tables for nothing
// (2-3 ms for 80 MB). One page in the middle of each chunk (mincore) tells the two cases apart; a chunk that is
// only partly mapped just faults as before. Contents are never changed, so this is only ever a speed hint: where
// the call is not supported (other kernels, other systems) the pages fault on first touch as they always did.
//
// Returns whether it mapped anything: the kernel has just zeroed those pages through the caches, where the caller's
// stores may still find their lines (see store_output in pixel_tile.h).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#ifdef __linux__
#include <sys/mman.h>
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23  // older C libraries; a kernel before 5.14 answers EINVAL
#endif
#endif

namespace ccl::cpu {

inline bool populate_for_writing(const at::Tensor& t) {
#ifdef __linux__
  constexpr uintptr_t kPage = 4096, kChunk = uintptr_t(1) << 21;
  if (t.nbytes() < 2 * kChunk) return false;  // small buffers come from the heap, already mapped
  const auto start = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t begin = (start + kPage - 1) & ~(kPage - 1), end = (start + t.nbytes()) & ~(kPage - 1);
  const int64_t chunks = static_cast<int64_t>((end - begin + kChunk - 1) / kChunk);
  std::atomic<bool> mapped_any{false};
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const uintptr_t a = begin + c * kChunk, b = std::min(end, a + kChunk);
      unsigned char mapped = 0;
      auto* middle = reinterpret_cast<void*>((a + (b - a) / 2) & ~(kPage - 1));
      if (mincore(middle, kPage, &mapped) == 0 && (mapped & 1)) continue;
      // An error leaves the pages to fault on first touch.
      if (madvise(reinterpret_cast<void*>(a), b - a, MADV_POPULATE_WRITE) == 0) mapped_any = true;
    }
  });
  return mapped_any;
#else
  (void)t;
  return false;
#endif
}

}  // namespace ccl::cpu
