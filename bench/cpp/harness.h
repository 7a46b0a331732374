// The measuring core of fastloss_bench, in the style of nvbench: a case is
// prepared once (buffers allocated and filled, not timed), warmed up, then timed
// sample by sample. The summary keeps the median and the p20/p80 spread rather
// than a mean, which one preempted or throttled sample would drag around.
// No CUDA header here: .cpp files include this and must build without CUDA.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "common/stream.h"  // cudaStream_t, declared without the CUDA headers

namespace fl_bench {

enum class Device { Cpu, Cuda };
const char* device_name(Device device);  // "cpu", "cuda"

// What a backend hands to a case when the case prepares its buffers.
struct DeviceContext {
  int device = 0;                 // CUDA device index (unused on the CPU)
  cudaStream_t stream = nullptr;  // the stream to enqueue on (null on the CPU)
};

// A case with its inputs in place. run() does the work of one sample: on the CPU
// it returns when the work is done; on CUDA it only enqueues on the stream.
class PreparedCase {
 public:
  virtual ~PreparedCase() = default;
  virtual void run() = 0;
  // Called once after timing; throws if the outputs are wrong (a non-finite loss,
  // say), so that a broken kernel cannot post a fast time.
  virtual void verify() = 0;
};

struct CaseSpec {
  std::string name;   // "spherical/zloss/fwd"
  Device device = Device::Cpu;
  std::string dtype;  // "float32", "bfloat16"
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t bytes = 0;  // the traffic floor of one sample; GB/s = bytes / median time
  std::function<std::unique_ptr<PreparedCase>(const DeviceContext&)> prepare;

  std::string shape() const;  // "64x32768"
  std::string label() const;  // "name/dtype/shape", what --filter matches
};

// How long to warm up and how many samples to take. Sampling stops once both
// min_samples and min_seconds are reached, or at max_samples.
struct SamplingPlan {
  int min_warmup;
  double min_warmup_seconds;
  int min_samples;
  int max_samples;
  double min_seconds;
};
SamplingPlan default_plan();
SamplingPlan quick_plan();  // CI: a few samples, the whole run in seconds

// Runs the warm-up, then returns the seconds of each timed sample.
std::vector<double> collect_samples(const SamplingPlan& plan, const std::function<double()>& time_one_sample);

struct Summary {
  int samples = 0;
  double median_s = 0, p20_s = 0, p80_s = 0, min_s = 0;
};
Summary summarize(std::vector<double> seconds);

// One device kind the harness can time on. The CPU backend is always linked in;
// the CUDA one only when the build has CUDA (cuda_backend.cu).
class Backend {
 public:
  virtual ~Backend() = default;
  virtual Device device() const = 0;
  // Empty when cases can run here, otherwise why they are skipped. Throws if
  // the device is present but setting it up fails (an error, not a skip).
  virtual std::string unavailable_reason() = 0;
  virtual std::string description() = 0;  // "cpu (N threads)" or the GPU name
  virtual DeviceContext context() = 0;
  // Seconds taken by one run() of `work`, measured the way this device needs.
  virtual double time_sample(PreparedCase& work) = 0;
  // Frees device resources while the runtime is still up (not from a static destructor).
  virtual void shutdown() {}
};

}  // namespace fl_bench
