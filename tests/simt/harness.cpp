// SIMT harness: executes the project's CUDA kernels (csrc/cuda/*_kernel.cuh, compiled as host C++ with simt.h
// force-included) on the CPU, through the launch arithmetic the .cu launchers use. Driven by
// tests/test_simt.py and tests/test_simt_peers.py:
//
//     simt_harness CASE_DIR...
//
// Each CASE_DIR holds args.txt ("key value" lines) and the inputs as raw files (za.bin, zb.bin, y.bin, or
// z0.bin..z<K-1>.bin and y.bin for op peers: exactly the elements the strides can reach). Every buffer is a
// malloc of its exact size, so AddressSanitizer stops an access one element out of bounds; outputs and scratch
// start poisoned (0x5A bytes) so an element a kernel forgets to write shows. Each case runs once per thread
// order (forward, reverse, seeded random); the outputs must be bitwise identical across orders, then go to
// CASE_DIR/<name>.bin. Any failure exits non-zero with a message naming the kernel ("SIMT ERROR ...") or a
// sanitizer report.
#include <ATen/OpMathType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cfloat>
#include <cmath>
#include <fstream>
#include <map>
#include <sstream>

#include "../../csrc/cuda/pixel_selective_kl_kernel.cuh"
#include "../../csrc/cuda/pixel_selective_kl_peers_kernel.cuh"
#include "../../csrc/cuda/region_direction_mask_kernel.cuh"
#include "simt_runtime.h"

#include <xmmintrin.h>

namespace {

using namespace ccl;
using namespace ccl::cuda;

struct Args {
  std::string dir;
  std::map<std::string, std::string> kv;

  const std::string& str(const std::string& key) const {
    const auto it = kv.find(key);
    if (it == kv.end()) simt::fail("case " + dir + ": args.txt has no '" + key + "'");
    return it->second;
  }
  int64_t i64(const std::string& key) const { return std::stoll(str(key)); }
  int64_t i64(const std::string& key, int64_t fallback) const { return kv.count(key) ? i64(key) : fallback; }
  double f64(const std::string& key) const { return std::stod(str(key)); }
};

Args read_args(const std::string& dir) {
  Args a{dir, {}};
  std::ifstream in(dir + "/args.txt");
  if (!in) simt::fail("cannot read " + dir + "/args.txt");
  std::string key, value;
  while (in >> key >> value) a.kv[key] = value;
  return a;
}

// Heap buffers of exactly the bytes asked for (ASan puts its redzone right after the last byte).
class Heap {
 public:
  ~Heap() {
    for (char* p : blocks_) std::free(p);
  }
  char* alloc(size_t bytes, int fill) {
    char* p = static_cast<char*>(std::malloc(bytes == 0 ? 1 : bytes));
    if (p == nullptr) simt::fail("out of memory");
    std::memset(p, fill, bytes);
    blocks_.push_back(p);
    return p;
  }

 private:
  std::vector<char*> blocks_;
};

constexpr int kPoison = 0x5A;

std::vector<char> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) simt::fail("cannot read " + path);
  return std::vector<char>((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// The outputs of one run, by name, in the order they were made.
struct Outputs {
  std::vector<std::pair<std::string, std::pair<const char*, size_t>>> items;
  template <typename T>
  T* add(Heap& heap, const std::string& name, int64_t count) {
    const size_t bytes = static_cast<size_t>(count) * sizeof(T);
    char* p = heap.alloc(bytes, kPoison);
    items.push_back({name, {p, bytes}});
    return reinterpret_cast<T*>(p);
  }
};

template <typename T>
const T* input(Heap& heap, const Args& a, const std::string& name) {
  const std::vector<char> data = read_file(a.dir + "/" + name + ".bin");
  if (data.size() % sizeof(T) != 0) simt::fail(name + ".bin is not a whole number of elements");
  char* p = heap.alloc(data.size(), 0);
  if (!data.empty()) std::memcpy(p, data.data(), data.size());
  return reinterpret_cast<const T*>(p);
}

template <typename T>
const char* type_name() {
  if constexpr (std::is_same_v<T, float>) return "float";
  if constexpr (std::is_same_v<T, double>) return "double";
  if constexpr (std::is_same_v<T, c10::Half>) return "half";
  return "bfloat16";
}

// pixel_selective_kl: forward + finalize (+ backward), as pixel_selective_kl_cuda and
// pixel_selective_kl_backward_cuda launch them.
template <typename scalar_t>
void run_kl(const Args& a, Heap& heap, Outputs& out, simt::Order order, uint64_t seed) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = a.i64("N"), C = a.i64("C"), H = a.i64("H"), W = a.i64("W"), HW = H * W;
  const double temperature = a.f64("T");
  const Logits<scalar_t> za{input<scalar_t>(heap, a, "za"), a.i64("sa0"), a.i64("sa1"), a.i64("sa2"), a.i64("sa3")};
  const Logits<scalar_t> zb{input<scalar_t>(heap, a, "zb"), a.i64("sb0"), a.i64("sb1"), a.i64("sb2"), a.i64("sb3")};
  const Labels y{input<int64_t>(heap, a, "y"), a.i64("sy0"), a.i64("sy1"), a.i64("sy2")};
  const Rule rule = static_cast<Rule>(a.i64("rule"));
  const bool normalize_valid = a.i64("normalize_valid") != 0;
  const auto learners = static_cast<uint8_t>(a.i64("learners", kBothLearn));
  const int64_t ignore_index = a.i64("ignore_index");
  // Test-only geometry knobs: a smaller grid.y cap reaches the kernels' loop over N, a smaller finalize block
  // its loop over the partials, without 65536 images or 513 blocks.
  const int64_t max_grid_y = a.i64("max_grid_y", kMaxGridY);
  const int final_threads = static_cast<int>(a.i64("final_threads", kFinalThreads));

  acc_t* loss_a = out.add<acc_t>(heap, "loss_a", 1);
  acc_t* loss_b = out.add<acc_t>(heap, "loss_b", 1);
  acc_t* norm = out.add<acc_t>(heap, "norm", 1);
  auto* count_ab = out.add<int64_t>(heap, "count_ab", 1);
  auto* count_ba = out.add<int64_t>(heap, "count_ba", 1);
  auto* selection = out.add<uint8_t>(heap, "selection", N * HW);
  const bool has_pixels = N > 0 && HW > 0;
  const dim3 grid = pixel_grid(N, HW, max_grid_y);
  const int64_t blocks = has_pixels ? static_cast<int64_t>(grid.x) * grid.y : 0;
  auto* part_kl = out.add<double>(heap, "part_kl", 2 * blocks);
  auto* part_count = out.add<long long>(heap, "part_count", 4 * blocks);
  const std::string t = type_name<scalar_t>();
  if (has_pixels) {
    with_channel_bucket<scalar_t>(C, [&](auto bucket) {
      constexpr int CMAX = decltype(bucket)::value;
      simt::launch("selective_kl_forward_kernel<" + t + ", CMAX=" + std::to_string(CMAX) + ">", kThreads, grid,
                   dim3(kThreads), order, seed, &selective_kl_forward_kernel<scalar_t, acc_t, CMAX>, za, zb, y, N,
                   static_cast<int>(C), static_cast<int>(W), static_cast<int>(HW),
                   static_cast<acc_t>(1.0 / temperature), rule, learners, ignore_index, selection, part_kl,
                   part_count);
    });
  }
  simt::launch("selective_kl_finalize_kernel<" + t + ">", kFinalThreads, dim3(1), dim3(final_threads), order,
               seed + 1, &selective_kl_finalize_kernel<acc_t>, part_kl, part_count, blocks,
               temperature * temperature, normalize_valid, loss_a, loss_b, count_ab, count_ba, norm);
  if (a.i64("backward") == 0) return;

  // Backward: g_a, g_b and n are device scalars; the gradients contiguous NCHW, or absent (nullptr).
  // g_a, g_b: inputs, listed with the outputs so that they are checked untouched; one buffer each, as on the GPU.
  acc_t* g_a = out.add<acc_t>(heap, "grad_loss_a", 1);
  acc_t* g_b = out.add<acc_t>(heap, "grad_loss_b", 1);
  *g_a = static_cast<acc_t>(a.f64("g_a"));
  *g_b = static_cast<acc_t>(a.f64("g_b"));
  const bool mask_a = a.i64("mask_a") != 0, mask_b = a.i64("mask_b") != 0;
  scalar_t* grad_za = mask_a ? out.add<scalar_t>(heap, "grad_za", N * C * HW) : nullptr;
  scalar_t* grad_zb = mask_b ? out.add<scalar_t>(heap, "grad_zb", N * C * HW) : nullptr;
  if (!(mask_a || mask_b) || N == 0 || HW == 0) return;
  const dim3 bgrid = pixel_grid(N, HW, max_grid_y);
  with_channel_bucket<scalar_t>(C, [&](auto bucket) {
    constexpr int CMAX = decltype(bucket)::value;
    simt::launch("selective_kl_backward_kernel<" + t + ", CMAX=" + std::to_string(CMAX) + ">", kThreads, bgrid,
                 dim3(kThreads), order, seed + 2, &selective_kl_backward_kernel<scalar_t, acc_t, CMAX>, za, zb,
                 selection, N, static_cast<int>(C), static_cast<int>(W), static_cast<int>(HW),
                 static_cast<acc_t>(1.0 / temperature), temperature, g_a, g_b, norm, grad_za, grad_zb);
  });
}

// pixel_selective_kl_peers: forward, finalize and gradients, as pixel_selective_kl_peers_cuda launches them.
// Student s's logits are z<s>.bin with strides sz<s>_0..3; grad_mask is a bit mask (bit s: grads[s] wanted).
template <typename scalar_t>
void run_peers(const Args& a, Heap& heap, Outputs& out, simt::Order order, uint64_t seed) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t K = a.i64("K"), N = a.i64("N"), C = a.i64("C"), H = a.i64("H"), W = a.i64("W"), HW = H * W;
  const double temperature = a.f64("T");
  const acc_t inv_t = static_cast<acc_t>(1.0 / temperature);
  const Labels y{input<int64_t>(heap, a, "y"), a.i64("sy0"), a.i64("sy1"), a.i64("sy2")};
  const Rule rule = static_cast<Rule>(a.i64("rule"));
  const bool normalize_valid = a.i64("normalize_valid") != 0;
  const int64_t ignore_index = a.i64("ignore_index"), grad_mask = a.i64("grad_mask");
  const int64_t max_grid_y = a.i64("max_grid_y", kMaxGridY);  // test-only geometry knobs, as in run_kl
  const int final_threads = static_cast<int>(a.i64("final_threads", kFinalThreads));
  const int k = static_cast<int>(K);
  with_peer_bucket(K, [&](auto bucket) {
    constexpr int KMAX = decltype(bucket)::value;
    PeerLogits<scalar_t, KMAX> z{};
    for (int s = 0; s < k; ++s) {
      const std::string name = "z" + std::to_string(s), st = "s" + name + "_";
      z.z[s] = {input<scalar_t>(heap, a, name), a.i64(st + "0"), a.i64(st + "1"), a.i64(st + "2"), a.i64(st + "3")};
    }
    acc_t* losses = out.add<acc_t>(heap, "losses", K);
    auto* counts = out.add<int64_t>(heap, "counts", K);
    acc_t* norm = out.add<acc_t>(heap, "norm", 1);
    auto* learners = out.add<uint8_t>(heap, "learners", N * HW);
    PeerGrads<scalar_t, KMAX> grads{};
    for (int s = 0; s < k; ++s) {
      grads.g[s] = (grad_mask >> s & 1) ? out.add<scalar_t>(heap, "grad" + std::to_string(s), N * C * HW) : nullptr;
    }
    const bool has_pixels = N > 0 && HW > 0;
    const dim3 grid = pixel_grid(N, HW, max_grid_y);
    const int64_t blocks = has_pixels ? static_cast<int64_t>(grid.x) * grid.y : 0;
    auto* part_kl = out.add<double>(heap, "part_kl", K * blocks);
    auto* part_count = out.add<long long>(heap, "part_count", (K + 2) * blocks);
    const std::string t = std::string(type_name<scalar_t>()) + ", KMAX=" + std::to_string(KMAX);
    if (has_pixels) {
      simt::launch("peers_forward_kernel<" + t + ">", kThreads, grid, dim3(kThreads), order, seed,
                   &peers_forward_kernel<scalar_t, acc_t, KMAX>, z, k, y, N, static_cast<int>(C),
                   static_cast<int>(W), static_cast<int>(HW), inv_t, rule, ignore_index, learners, part_kl,
                   part_count);
    }
    simt::launch(std::string("peers_finalize_kernel<") + type_name<scalar_t>() + ">", kFinalThreads, dim3(1),
                 dim3(final_threads), order, seed + 1, &peers_finalize_kernel<acc_t>, part_kl, part_count, blocks,
                 k, temperature * temperature, normalize_valid, losses, counts, norm);
    if (has_pixels && grad_mask != 0) {
      simt::launch("peers_grad_kernel<" + t + ">", kThreads, grid, dim3(kThreads), order, seed + 2,
                   &peers_grad_kernel<scalar_t, acc_t, KMAX>, z, k, y, learners, N, static_cast<int>(C),
                   static_cast<int>(W), static_cast<int>(HW), inv_t, rule, ignore_index, temperature, norm, grads);
    }
  });
}

// region_direction_mask, as region_direction_mask_cuda launches it.
template <typename scalar_t>
void run_region(const Args& a, Heap& heap, Outputs& out, simt::Order order, uint64_t seed) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t N = a.i64("N"), C = a.i64("C"), H = a.i64("H"), W = a.i64("W");
  const int64_t rh = a.i64("rh"), rw = a.i64("rw");
  const Logits<scalar_t> za{input<scalar_t>(heap, a, "za"), a.i64("sa0"), a.i64("sa1"), a.i64("sa2"), a.i64("sa3")};
  const Logits<scalar_t> zb{input<scalar_t>(heap, a, "zb"), a.i64("sb0"), a.i64("sb1"), a.i64("sb2"), a.i64("sb3")};
  const Labels y{input<int64_t>(heap, a, "y"), a.i64("sy0"), a.i64("sy1"), a.i64("sy2")};
  const int64_t Hr = (H + rh - 1) / rh, Wr = (W + rw - 1) / rw, regions = N * Hr * Wr;
  auto* direction = out.add<int8_t>(heap, "direction", regions);
  auto* scores = out.add<float>(heap, "scores", 2 * regions);
  if (regions == 0) return;
  const int threads = region_threads(rh, rw, H, W);
  simt::launch(std::string("region_direction_kernel<") + type_name<scalar_t>() + ">", kThreads,
               dim3(static_cast<unsigned>(regions)), dim3(threads), order, seed,
               &region_direction_kernel<scalar_t, acc_t>, za, zb, y, static_cast<int>(C), static_cast<int>(H),
               static_cast<int>(W), rh, rw, Hr, Wr, a.i64("accuracy") != 0, a.i64("ignore_index"), direction,
               scores);
}

template <typename scalar_t>
void run_case(const Args& a, Heap& heap, Outputs& out, simt::Order order, uint64_t seed) {
  const std::string& op = a.str("op");
  if (op == "kl") return run_kl<scalar_t>(a, heap, out, order, seed);
  if (op == "region") return run_region<scalar_t>(a, heap, out, order, seed);
  if (op == "peers") return run_peers<scalar_t>(a, heap, out, order, seed);
  simt::fail("unknown op '" + op + "'");
}

void run_dtype(const Args& a, Heap& heap, Outputs& out, simt::Order order, uint64_t seed) {
  const std::string& dtype = a.str("dtype");
  if (dtype == "float32") return run_case<float>(a, heap, out, order, seed);
#ifndef CCL_SIMT_FLOAT32_ONLY  // the defect builds need one dtype only, and compile faster without the rest
  if (dtype == "float64") return run_case<double>(a, heap, out, order, seed);
  if (dtype == "float16") return run_case<c10::Half>(a, heap, out, order, seed);
  if (dtype == "bfloat16") return run_case<c10::BFloat16>(a, heap, out, order, seed);
#endif
  simt::fail("dtype '" + dtype + "' is not built into this harness");
}

void run(const std::string& dir) {
  const Args a = read_args(dir);
  const uint64_t seed = static_cast<uint64_t>(a.i64("seed", 1));
  const simt::Order orders[] = {simt::Order::kForward, simt::Order::kReverse, simt::Order::kRandom};
  std::vector<std::vector<char>> first;
  std::vector<std::string> names;
  for (const simt::Order order : orders) {
    Heap heap;  // every buffer of this run, freed at its end
    Outputs out;
    run_dtype(a, heap, out, order, seed);
    for (size_t i = 0; i < out.items.size(); ++i) {
      const auto& [name, span] = out.items[i];
      std::vector<char> bytes(span.first, span.first + span.second);
      if (order == simt::Order::kForward) {
        first.push_back(std::move(bytes));
        names.push_back(name);
      } else if (i >= first.size() || names[i] != name || bytes != first[i]) {
        simt::rt().kernel = "(" + a.str("op") + " op)";
        simt::rt().order = order;
        simt::fail("output '" + name + "' differs from the forward thread order's: a race (missing barrier?)");
      }
    }
  }
  for (size_t i = 0; i < first.size(); ++i) {
    std::ofstream o(dir + "/" + names[i] + ".bin", std::ios::binary);
    o.write(first[i].data(), static_cast<std::streamsize>(first[i].size()));
    if (!o) simt::fail("cannot write " + dir + "/" + names[i] + ".bin");
  }
}

}  // namespace

namespace {
bool fast_math = false;  // set per case
}

// A model of __expf under --use_fast_math: ex2.approx.ftz.f32(x * log2(e)). The product is rounded to float as
// on the device (an error growing with |x|), the exp2 is exact here and then moved 2 ulp (the documented bound
// of ex2.approx) in a direction that depends on x, and subnormal results flush to zero. Not the device's bits:
// an adversarial stand-in within the documented error bounds.
float simt::device_expf(float x) {
  if (!fast_math) return ::expf(x);
  const float t = x * 1.44269504088896341f;
  float r = static_cast<float>(std::exp2(static_cast<double>(t)));
  uint32_t h;
  std::memcpy(&h, &x, sizeof h);
  h *= 2654435761u;
  const float toward = (h >> 31) ? INFINITY : 0.0f;
  r = std::nextafter(std::nextafter(r, toward), toward);
  return r < FLT_MIN ? 0.0f : r;
}

int simt::mutant() {
  static const int k = [] {
    const char* v = std::getenv("SIMT_MUTANT");
    return v ? std::atoi(v) : 0;
  }();
  return k;
}

int main(int argc, char** argv) {
  const unsigned csr = _mm_getcsr();
  for (int i = 1; i < argc; ++i) {
    fast_math = read_args(argv[i]).i64("fast_math", 0) != 0;
    // FTZ | DAZ: fast math flushes float32 subnormals on the device (here float64 too; no test makes any).
    _mm_setcsr(fast_math ? csr | 0x8040 : csr);
    run(argv[i]);
  }
  return 0;
}
