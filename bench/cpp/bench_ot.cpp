// CPU cases of the ot family: solve_cpu with a fixed iteration count (bench_ot.h).
#include <algorithm>
#include <vector>

#include "bench_ot.h"
#include "registry.h"

namespace fl_bench {
namespace ot {
namespace {

class CpuSolve final : public PreparedCase {
 public:
  CpuSolve(const DeviceContext&, const Shape& shape)
      : shape_(shape),
        data_(shape),
        f_(static_cast<size_t>(shape.batch * shape.n)),
        g_(static_cast<size_t>(shape.batch * shape.m)),
        n_iter_(static_cast<size_t>(shape.batch)),
        error_(static_cast<size_t>(shape.batch)) {
    args_ = solve_args(shape, data_.cost.data(), data_.x.data(), data_.y.data(), data_.log_a.data(),
                       data_.log_b.data(), f_.data(), g_.data(), n_iter_.data(), error_.data(), nullptr);
    workspace_.resize(static_cast<size_t>(fl::ot::solve_workspace_bytes(args_.geom)));
    args_.workspace = workspace_.data();
  }
  void run() override {
    std::fill(f_.begin(), f_.end(), 0.f);
    std::fill(g_.begin(), g_.end(), 0.f);
    fl::ot::solve_cpu(args_);
  }
  void verify() override {
    require_finite("f", f_);
    require_finite("error", error_);
  }

 private:
  Shape shape_;
  HostData data_;
  std::vector<float> f_, g_;
  std::vector<int32_t> n_iter_;
  std::vector<float> error_;
  std::vector<unsigned char> workspace_;
  fl::ot::SolveArgs args_;
};

std::vector<CaseSpec> cpu_cases(bool quick) {
  if (quick) return make_cases<CpuSolve>(Device::Cpu, {{1, 128, 96, 0}, {1, 128, 96, 3}});
  return make_cases<CpuSolve>(Device::Cpu, {{1, 2000, 2000, 0}, {1, 2000, 2000, 3}, {1, 2000, 2000, 64}, {16, 256, 256, 0}});
}

const FamilyRegistrar registrar("ot/cpu", &cpu_cases);

}  // namespace
}  // namespace ot
}  // namespace fl_bench
