// SIMT runtime: runs a kernel launch on the CPU, one block at a time, each CUDA thread a fiber (ucontext on an
// mmap'd stack below a PROT_NONE guard page; switches annotated for AddressSanitizer). A fiber runs until it
// reaches a barrier (__syncthreads, a warp shuffle) or returns; the scheduler releases a barrier once every
// thread it waits for has arrived, and stops the run with the kernel's name when that can never happen
// (divergence). The order in which runnable threads go is a parameter, so that a missing barrier changes the
// result: kForward runs all threads round-robin in index order; kReverse and kRandom run one warp at a time as
// far as it can go (to the block barrier), warps and lanes in descending or seeded-random order.
#pragma once

#include <elf.h>
#include <link.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdio>
#include <fstream>
#include <cstdlib>
#include <functional>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#ifdef __SANITIZE_ADDRESS__
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif

namespace simt {

enum class Order { kForward, kReverse, kRandom };
inline const char* order_name(Order o) {
  return o == Order::kForward ? "forward" : (o == Order::kReverse ? "reverse" : "random");
}

enum class State { kRunnable, kAtSync, kAtShfl, kExited };

struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;  // usable stack, above the guard page
  void* fake_stack = nullptr;
  uint3 tid{};
  State state = State::kExited;
  const char* file = "";  // barrier site
  int line = 0;
  ShflMode mode{};
  unsigned int mask = 0, arg = 0;
  int width = 0;
  uint64_t value = 0;
};

constexpr size_t kStackBytes = 256 * 1024;  // ASan and UBSan reports run on the fiber's stack
constexpr size_t kGuardBytes = 64 * 1024;
constexpr int kMaxThreads = 1024;

struct Runtime {
  std::vector<Fiber> fibers = std::vector<Fiber>(kMaxThreads);
  int threads = 0;
  Fiber* current = nullptr;
  ucontext_t main_ctx;
  const void* main_bottom = nullptr;
  size_t main_size = 0;
  std::function<void()> body;
  std::string kernel;
  dim3 grid, block;
  uint3 bidx{};
  Order order = Order::kForward;
  std::mt19937_64 rng;
};

inline Runtime& rt() {
  static Runtime r;
  return r;
}

[[noreturn]] inline void fail(const std::string& what) {
  const Runtime& r = rt();
  std::fprintf(stderr, "SIMT ERROR in kernel %s, block (%u, %u, %u), thread order %s: %s\n", r.kernel.c_str(),
               r.bidx.x, r.bidx.y, r.bidx.z, order_name(r.order), what.c_str());
  std::fflush(stderr);
  std::_Exit(70);
}

inline Fiber& self(const char* what) {
  Fiber* f = rt().current;
  if (f == nullptr) fail(std::string(what) + " called outside a kernel");
  return *f;
}

inline const uint3& thread_idx() { return self("threadIdx").tid; }
inline const uint3& block_idx() { return self("blockIdx"), rt().bidx; }
inline const dim3& block_dim() { return self("blockDim"), rt().block; }
inline const dim3& grid_dim() { return self("gridDim"), rt().grid; }

[[noreturn]] inline void device_assert_failed(const char* what, const char* file, int line) {
  const uint3 t = self("assert").tid;
  fail("device-side assert at " + std::string(file) + ":" + std::to_string(line) + " in thread (" +
       std::to_string(t.x) + ", " + std::to_string(t.y) + ", " + std::to_string(t.z) + "): " + what);
}

// ---- fiber switches ---------------------------------------------------------------------------------------

inline void resume(Fiber& f) {  // scheduler -> fiber
  Runtime& r = rt();
  r.current = &f;
#ifdef __SANITIZE_ADDRESS__
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, f.stack, kStackBytes);
#endif
  swapcontext(&r.main_ctx, &f.ctx);
#ifdef __SANITIZE_ADDRESS__
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
  r.current = nullptr;
}

inline void suspend(Fiber& f) {  // fiber -> scheduler, to be resumed
  Runtime& r = rt();
#ifdef __SANITIZE_ADDRESS__
  __sanitizer_start_switch_fiber(&f.fake_stack, r.main_bottom, r.main_size);
#endif
  swapcontext(&f.ctx, &r.main_ctx);
#ifdef __SANITIZE_ADDRESS__
  __sanitizer_finish_switch_fiber(f.fake_stack, &r.main_bottom, &r.main_size);
#endif
}

inline void fiber_main(int index) {
  Runtime& r = rt();
#ifdef __SANITIZE_ADDRESS__
  __sanitizer_finish_switch_fiber(nullptr, &r.main_bottom, &r.main_size);
#endif
  r.body();
  r.fibers[index].state = State::kExited;
#ifdef __SANITIZE_ADDRESS__
  __sanitizer_start_switch_fiber(nullptr, r.main_bottom, r.main_size);  // this stack is done with
#endif
  setcontext(&r.main_ctx);
}

inline void start_fiber(Fiber& f, int index) {
  if (f.stack == nullptr) {
    void* m = mmap(nullptr, kGuardBytes + kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED || mprotect(m, kGuardBytes, PROT_NONE) != 0) fail("cannot map a fiber stack");
    f.stack = static_cast<char*>(m) + kGuardBytes;  // an overflow runs into the guard page and faults
  }
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = f.stack;
  f.ctx.uc_stack.ss_size = kStackBytes;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, reinterpret_cast<void (*)()>(&fiber_main), 1, index);
  // ASan's swapcontext interceptor clears the shadow of the target's uc_stack on every switch (32 KiB of
  // memset per resume); the stack is not needed after makecontext, so clear the shadow once, here, instead.
  f.ctx.uc_stack.ss_size = 0;
#ifdef __SANITIZE_ADDRESS__
  __asan_unpoison_memory_region(f.stack, kStackBytes);
#endif
  f.state = State::kRunnable;
  f.fake_stack = nullptr;
}

// ---- barriers ---------------------------------------------------------------------------------------------

inline void sync_block(const char* file, int line) {
  Fiber& f = self("__syncthreads");
  f.state = State::kAtSync;
  f.file = file;
  f.line = line;
  suspend(f);
}

inline uint64_t shfl(ShflMode mode, unsigned int mask, uint64_t bits, unsigned int arg, int width, const char* file,
                     int line) {
  Fiber& f = self("__shfl_*_sync");
  const int lane = static_cast<int>(&f - rt().fibers.data()) % warpSize;
  if (!(mask >> lane & 1u)) fail("a lane calls a shuffle with a mask that does not include it");
  if (width < 1 || width > warpSize || (width & (width - 1)) != 0)
    fail("shuffle width " + std::to_string(width) + " is not a power of 2 in [1, 32]");
  f.state = State::kAtShfl;
  f.file = file;
  f.line = line;
  f.mode = mode;
  f.mask = mask;
  f.arg = arg;
  f.width = width;
  f.value = bits;
  suspend(f);
  return f.value;
}

inline std::string site(const Fiber& f) { return std::string(f.file) + ":" + std::to_string(f.line); }

// Completes the shuffles of warp w whose lanes have all arrived; returns whether any did.
inline bool resolve_warp(int w) {
  Runtime& r = rt();
  Fiber* lanes = r.fibers.data() + w * warpSize;
  bool any = false;
  for (int l = 0; l < warpSize; ++l) {
    Fiber& f = lanes[l];
    if (f.state != State::kAtShfl) continue;
    bool ready = true;
    for (int k = 0; k < warpSize; ++k) {
      if (!(f.mask >> k & 1u)) continue;
      const Fiber& g = lanes[k];
      if (g.state != State::kAtShfl) ready = false;
      else if (g.mask != f.mask || g.mode != f.mode || g.line != f.line || std::strcmp(g.file, f.file) != 0)
        fail("warp " + std::to_string(w) + ": lanes " + std::to_string(l) + " and " + std::to_string(k) +
             " meet at different shuffles (" + site(f) + ", " + site(g) + ") or with different masks");
    }
    if (!ready) continue;
    // PTX shfl.sync: c = ((32 - width) << 8) | 31; a lane outside its segment's range reads its own value.
    uint64_t out[warpSize];
    for (int k = 0; k < warpSize; ++k) {
      if (!(f.mask >> k & 1u)) continue;
      const Fiber& g = lanes[k];
      const unsigned seg = static_cast<unsigned>(warpSize - g.width), b = g.arg & 31u;
      const unsigned max_lane = (static_cast<unsigned>(k) & seg) | (31u & ~seg);
      unsigned j = g.mode == ShflMode::kDown ? k + b : (static_cast<unsigned>(k) ^ b);
      if (j > max_lane) j = static_cast<unsigned>(k);
      if (!(f.mask >> j & 1u)) fail("a shuffle reads lane " + std::to_string(j) + ", outside its mask");
      out[k] = lanes[j].value;
    }
    for (int k = 0; k < warpSize; ++k) {
      if (!(f.mask >> k & 1u)) continue;
      lanes[k].value = out[k];
      lanes[k].state = State::kRunnable;
    }
    any = true;
  }
  return any;
}

// Nothing can run: release the block barrier if every thread waits at the same one, else explain and stop.
inline void release_or_fail() {
  Runtime& r = rt();
  std::string sync_site, shfl_where, exited;
  int at_sync = 0, n_exited = 0;
  for (int i = 0; i < r.threads; ++i) {
    const Fiber& f = r.fibers[i];
    if (f.state == State::kExited) {
      if (n_exited++ == 0) exited = std::to_string(i);
    } else if (f.state == State::kAtSync) {
      if (at_sync++ == 0) sync_site = site(f);
      else if (site(f) != sync_site)
        fail("barrier divergence: threads wait at different __syncthreads (" + sync_site + " and, thread " +
             std::to_string(i) + ", " + site(f) + ")");
    } else if (f.state == State::kAtShfl && shfl_where.empty()) {
      shfl_where = "thread " + std::to_string(i) + " at " + site(f);
    }
  }
  if (!shfl_where.empty())
    fail("warp divergence: a shuffle can never complete (" + shfl_where + "; " + std::to_string(at_sync) +
         " threads at __syncthreads, " + std::to_string(n_exited) + " exited)");
  if (at_sync > 0 && n_exited > 0)
    fail("barrier divergence: " + std::to_string(n_exited) + " threads (first: " + exited +
         ") exited while " + std::to_string(at_sync) + " wait at __syncthreads " + sync_site);
  for (int i = 0; i < r.threads; ++i)
    if (r.fibers[i].state == State::kAtSync) r.fibers[i].state = State::kRunnable;
}

// ---- shared memory ----------------------------------------------------------------------------------------

struct SharedArray {
  char* address;
  size_t bytes;
  std::string symbol;
};

// Every __shared__ array of the kernels: the function-local statics ("_ZZN3ccl...") in this executable's ELF
// symbol table, relocated by the load bias of the main program.
inline const std::vector<SharedArray>& shared_arrays() {
  static const std::vector<SharedArray> arrays = [] {
    std::vector<SharedArray> found;
    std::ifstream in("/proc/self/exe", std::ios::binary | std::ios::ate);
    std::vector<char> elf(static_cast<size_t>(std::max<std::streamoff>(in.tellg(), 0)));
    in.seekg(0).read(elf.data(), static_cast<std::streamsize>(elf.size()));
    if (!in || elf.size() < sizeof(Elf64_Ehdr)) fail("cannot read /proc/self/exe");
    uintptr_t bias = 0;
    dl_iterate_phdr([](dl_phdr_info* info, size_t, void* out) {
      *static_cast<uintptr_t*>(out) = info->dlpi_addr;
      return 1;  // the first object is the main program
    }, &bias);
    const auto* eh = reinterpret_cast<const Elf64_Ehdr*>(elf.data());
    const auto* sections = reinterpret_cast<const Elf64_Shdr*>(elf.data() + eh->e_shoff);
    for (int i = 0; i < eh->e_shnum; ++i) {
      if (sections[i].sh_type != SHT_SYMTAB) continue;
      const char* names = elf.data() + sections[sections[i].sh_link].sh_offset;
      const auto* syms = reinterpret_cast<const Elf64_Sym*>(elf.data() + sections[i].sh_offset);
      for (size_t k = 0; k < sections[i].sh_size / sizeof(Elf64_Sym); ++k) {
        const std::string name = names + syms[k].st_name;
        if (ELF64_ST_TYPE(syms[k].st_info) == STT_OBJECT && name.rfind("_ZZN3ccl", 0) == 0 && syms[k].st_size > 0)
          found.push_back({reinterpret_cast<char*>(bias + syms[k].st_value), syms[k].st_size, name});
      }
    }
    if (found.empty()) fail("no __shared__ array found in the symbol table (is the harness stripped?)");
    return found;
  }();
  return arrays;
}

// ---- scheduling -------------------------------------------------------------------------------------------

inline void run_block() {
  Runtime& r = rt();
  for (const SharedArray& a : shared_arrays()) std::memset(a.address, 0xFF, a.bytes);  // NaN / -1
  for (int i = 0; i < r.threads; ++i) {
    Fiber& f = r.fibers[i];
    start_fiber(f, i);
    f.tid = {i % r.block.x, i / r.block.x % r.block.y, i / (r.block.x * r.block.y)};
  }
  const int warps = r.threads / warpSize;
  std::vector<int> warp_order(warps), lane_order(warpSize);
  for (;;) {
    bool ran = false;
    if (r.order == Order::kForward) {  // round-robin over all threads, then the shuffles of every warp
      for (int i = 0; i < r.threads; ++i)
        if (r.fibers[i].state == State::kRunnable) resume(r.fibers[i]), ran = true;
      for (int w = 0; w < warps; ++w) ran = resolve_warp(w) || ran;
    } else {  // one warp at a time, as far as it goes
      for (int w = 0; w < warps; ++w) warp_order[w] = warps - 1 - w;
      for (int l = 0; l < warpSize; ++l) lane_order[l] = warpSize - 1 - l;
      if (r.order == Order::kRandom) std::shuffle(warp_order.begin(), warp_order.end(), r.rng);
      for (int w : warp_order) {
        do {
          if (r.order == Order::kRandom) std::shuffle(lane_order.begin(), lane_order.end(), r.rng);
          for (int l : lane_order) {
            Fiber& f = r.fibers[w * warpSize + l];
            if (f.state == State::kRunnable) resume(f), ran = true;
          }
        } while (resolve_warp(w));
      }
    }
    if (ran) continue;
    bool live = false;
    for (int i = 0; i < r.threads && !live; ++i) live = r.fibers[i].state != State::kExited;
    if (!live) return;
    release_or_fail();
  }
}

// A kernel launch: checks the geometry against CUDA's limits and the kernel's __launch_bounds__, then runs
// every block in order. The arguments convert to the kernel's parameter types as in <<<grid, block>>>.
template <typename... P, typename... A>
void launch(const std::string& name, int launch_bound, dim3 grid, dim3 block, Order order, uint64_t seed,
            void (*kernel)(P...), A&&... args) {
  Runtime& r = rt();
  r.kernel = name;
  r.order = order;
  r.rng.seed(seed);
  r.grid = grid;
  r.block = block;
  r.bidx = {0, 0, 0};
  const long long threads = 1LL * block.x * block.y * block.z;
  if (threads < 1 || threads > kMaxThreads || block.z > 64)
    fail("block of " + std::to_string(threads) + " threads is outside CUDA's limits");
  if (threads > launch_bound) fail("block of " + std::to_string(threads) + " threads exceeds __launch_bounds__(" +
                                   std::to_string(launch_bound) + ")");
  if (threads % warpSize != 0) fail("block of " + std::to_string(threads) + " threads is not whole warps");
  if (grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.x > 2147483647u || grid.y > 65535u || grid.z > 65535u)
    fail("grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) + ", " + std::to_string(grid.z) +
         ") is outside CUDA's limits");
  r.threads = static_cast<int>(threads);
  std::tuple<P...> params(std::forward<A>(args)...);
  r.body = [&] { std::apply(kernel, params); };  // each thread gets its own copy of the parameters
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        r.bidx = {x, y, z};
        run_block();
      }
  r.body = nullptr;
}

}  // namespace simt
