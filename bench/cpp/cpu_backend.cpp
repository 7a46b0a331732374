// The CPU backend: the kernels are synchronous, so a steady_clock pair around
// run() is the sample. No cache flush: the CPU cases model the warm-cache use
// of a loss right after the layer that produced its logits.
#include <chrono>
#include <string>

#include "common/parallel.h"
#include "harness.h"
#include "registry.h"

namespace fl_bench {
namespace {

class CpuBackend final : public Backend {
 public:
  Device device() const override { return Device::Cpu; }
  std::string unavailable_reason() override { return {}; }
  std::string description() override {
    return "cpu (" + std::to_string(fl::cpu_thread_count()) + " threads)";
  }
  DeviceContext context() override { return {}; }
  double time_sample(PreparedCase& work) override {
    const auto start = std::chrono::steady_clock::now();
    work.run();
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  }
};

const BackendRegistrar registrar(std::make_unique<CpuBackend>());

}  // namespace
}  // namespace fl_bench
