// CPU cases of the quant family: matmul_cpu on a packed weight (bench_quant.h).
#include <vector>

#include "bench_quant.h"
#include "registry.h"

namespace fl_bench {
namespace quant {
namespace {

class CpuMatmul final : public PreparedCase {
 public:
  CpuMatmul(const DeviceContext&, const Shape& shape) : data_(shape), y_(static_cast<size_t>(shape.rows * shape.out_features)) {
    problem_.weight = fl::quant::PackedWeight{data_.shape,  data_.main.data(),   data_.side.data(),
                                              data_.side_index.data(), data_.scales.data(), fl::DType::Float16,
                                              data_.zeros.data()};
    problem_.dtype = fl::DType::Float16;
    problem_.x = data_.x.data();
    problem_.rows = shape.rows;
    problem_.ldx = shape.in_features;
    problem_.y = y_.data();
    problem_.ldy = shape.out_features;
  }
  void run() override { fl::quant::matmul_cpu(problem_); }
  void verify() override { require_finite("y", y_); }

 private:
  HostData data_;
  std::vector<fl::Half> y_;
  fl::quant::MatmulProblem problem_{};
};

std::vector<CaseSpec> cpu_cases(bool quick) {
  if (quick) return make_cases<CpuMatmul>(Device::Cpu, {{256, 512, 1, 0}});
  return make_cases<CpuMatmul>(Device::Cpu, {{4096, 4096, 1, 0}, {4096, 4096, 1, 25}, {4096, 4096, 4, 0}});
}

const FamilyRegistrar registrar("quant/cpu", &cpu_cases);

}  // namespace
}  // namespace quant
}  // namespace fl_bench
