// Warm-up, sampling and the order statistics of the samples.
#include "harness.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <stdexcept>

namespace fl_bench {

const char* device_name(Device device) { return device == Device::Cuda ? "cuda" : "cpu"; }

std::string CaseSpec::shape() const { return std::to_string(rows) + "x" + std::to_string(cols); }

std::string CaseSpec::label() const { return name + "/" + dtype + "/" + shape(); }

// Enough samples for stable p20/p80 on a busy CI machine, bounded to about half
// a second per case so that the full run stays in the minutes.
SamplingPlan default_plan() { return SamplingPlan{3, 0.05, 25, 2000, 0.5}; }

SamplingPlan quick_plan() { return SamplingPlan{2, 0.002, 5, 50, 0.02}; }

std::vector<double> collect_samples(const SamplingPlan& plan, const std::function<double()>& time_one_sample) {
  using Clock = std::chrono::steady_clock;
  auto seconds_since = [](Clock::time_point start) {
    return std::chrono::duration<double>(Clock::now() - start).count();
  };
  // Warm-up: first-touch page faults, instruction caches, GPU clocks and lazy
  // module loading all land here instead of in the first samples.
  const Clock::time_point warmup_start = Clock::now();
  for (int i = 0; i < plan.min_warmup || seconds_since(warmup_start) < plan.min_warmup_seconds; ++i) {
    time_one_sample();
  }
  // The time budget counts wall time (L2 flushes and syncs included), so a case
  // whose overhead dwarfs its kernel still ends on time.
  std::vector<double> samples;
  const Clock::time_point start = Clock::now();
  while (static_cast<int>(samples.size()) < plan.min_samples ||
         (static_cast<int>(samples.size()) < plan.max_samples && seconds_since(start) < plan.min_seconds)) {
    samples.push_back(time_one_sample());
  }
  return samples;
}

namespace {

// Linear interpolation between the closest ranks (numpy's default), on sorted data.
double percentile(const std::vector<double>& sorted, double fraction) {
  const double position = fraction * static_cast<double>(sorted.size() - 1);
  const size_t below = static_cast<size_t>(std::floor(position));
  const size_t above = std::min(below + 1, sorted.size() - 1);
  const double weight = position - static_cast<double>(below);
  return sorted[below] + (sorted[above] - sorted[below]) * weight;
}

}  // namespace

Summary summarize(std::vector<double> seconds) {
  if (seconds.empty()) throw std::logic_error("fastloss_bench: no samples to summarize");
  std::sort(seconds.begin(), seconds.end());
  Summary out;
  out.samples = static_cast<int>(seconds.size());
  out.median_s = percentile(seconds, 0.5);
  out.p20_s = percentile(seconds, 0.2);
  out.p80_s = percentile(seconds, 0.8);
  out.min_s = seconds.front();
  return out;
}

}  // namespace fl_bench
