// Benchmark inputs, the same on every run: logits from N(0, 1) and targets
// uniform over the classes, each from a fixed seed. Random logits, not zeros:
// a zero row has zero variance and would time the loss heads on a degenerate
// path (and hide a NaN). Also the finiteness checks of the outputs.
// Host-only and CUDA-free: the CUDA cases upload these same host buffers.
#pragma once

#include <cmath>
#include <cstdint>
#include <map>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/dtype.h"

namespace fl_bench {

template <class T>
struct DTypeOf;
template <>
struct DTypeOf<float> {
  static constexpr fl::DType value = fl::DType::Float32;
};
template <>
struct DTypeOf<fl::BFloat16> {  // on CUDA the same 2-byte layout as __nv_bfloat16
  static constexpr fl::DType value = fl::DType::BFloat16;
};

constexpr uint64_t kLogitSeed = 20240611;
constexpr uint64_t kTargetSeed = 20240612;

// `count` normal values stored as T. Cached per (T, count), because drawing
// tens of millions of normals for every CUDA case would take longer than
// timing it; the benchmark is single-threaded, so a plain static map will do.
template <class T>
const std::vector<T>& random_logits(int64_t count) {
  static std::map<int64_t, std::vector<T>> cache;
  auto found = cache.find(count);
  if (found != cache.end()) return found->second;
  std::mt19937_64 rng(kLogitSeed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<T> values(static_cast<size_t>(count));
  for (T& v : values) v = fl::StoreAs<T>::from(normal(rng));
  return cache.emplace(count, std::move(values)).first->second;
}

inline std::vector<int64_t> random_targets(int64_t rows, int64_t cols) {
  std::mt19937_64 rng(kTargetSeed);
  std::uniform_int_distribution<int64_t> uniform(0, cols - 1);
  std::vector<int64_t> targets(static_cast<size_t>(rows));
  for (int64_t& t : targets) t = uniform(rng);
  return targets;
}

// Throws std::runtime_error naming the first non-finite value of `what`.
template <class T>
void require_finite(const char* what, const std::vector<T>& values) {
  for (size_t i = 0; i < values.size(); ++i) {
    const double v = static_cast<double>(fl::to_acc(values[i]));
    if (!std::isfinite(v)) {
      throw std::runtime_error(std::string("sanity check failed: ") + what + "[" + std::to_string(i) +
                               "] = " + std::to_string(v) + " is not finite");
    }
  }
}

}  // namespace fl_bench
