// The op options and selection bits, without torch: shared by the argument checks (checks.h), the CPU kernels
// and the CUDA kernel headers, which must also compile as plain host C++ in the SIMT test harness (tests/simt).
#pragma once
#include <cstdint>

namespace ccl {

enum class Rule { kCorrect, kConfidence, kAll };
enum class Normalize { kValid, kSelected };
enum class Score { kCrossEntropy, kAccuracy };

// Bits of the per-pixel selection mask of pixel_selective_kl.
constexpr uint8_t kAteachesB = 1;
constexpr uint8_t kBteachesA = 2;
// Which losses pixel_selective_kl computes (option `learners`), as the selection bits of the teaching direction
// that feeds each: loss_a is taught where B teaches A, loss_b where A teaches B.
constexpr uint8_t kBothLearn = kAteachesB | kBteachesA;

// At most this many students in pixel_selective_kl_peers (the kernels keep per-student state in fixed arrays).
constexpr int kMaxPeers = 8;

}  // namespace ccl
