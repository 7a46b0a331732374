// CPU cases of the factored output layer's kernels (see bench_spherical_factored.h).
#include <vector>

#include "bench_spherical_factored.h"
#include "registry.h"

namespace fl_bench {
namespace spherical_factored {
namespace {

class CpuFactoredStep final : public PreparedCase {
 public:
  CpuFactoredStep(const DeviceContext& /*context*/, Step step, Shape shape)
      : step_(step),
        data_(shape),
        loss_(static_cast<size_t>(shape.samples)),
        partials_(static_cast<size_t>(shape.samples * 3)),
        ytilde_(static_cast<size_t>(shape.samples * fl::spherical::packed_width(shape.features))),
        scaled_(partials_.size()),
        coef_(static_cast<size_t>(shape.samples * 2)),
        square_(static_cast<size_t>(shape.samples * shape.samples)),
        gram_(square_.size()),
        r_(data_.h) {
    problem_ = data_.problem(data_.h.data(), data_.sh.data(), data_.weight_rows.data(), data_.target.data());
    for (size_t i = 0; i < square_.size(); ++i) square_[i] = 1e-3 * static_cast<double>(i % 7);
    head();  // every later step needs the partials and the scaled partials
    prepare();
  }

  void run() override {
    if (step_ == Step::Head || step_ == Step::All) head();
    if (step_ == Step::Prepare || step_ == Step::All) prepare();
    if (step_ == Step::Gram || step_ == Step::All) fl::spherical::factored_gram_cpu(problem_, scaled_.data(), square_.data(), square_.data(), gram_.data());
    if (step_ == Step::Scatter || step_ == Step::All)
      fl::spherical::factored_scatter_cpu(problem_, data_.weight_rows.data(), scaled_.data(), r_.data(), 1e-9);
  }

  void verify() override {
    require_finite("loss", loss_);
    require_finite("ytilde", ytilde_);
    if (step_ == Step::Gram || step_ == Step::All) require_finite("gram", gram_);
  }

 private:
  void head() { fl::spherical::factored_head_cpu(problem_, loss_.data(), partials_.data()); }
  void prepare() {
    fl::spherical::factored_prepare_cpu(problem_, partials_.data(), data_.grad_loss.data(), 1, ytilde_.data(),
                                        scaled_.data(), coef_.data());
  }

  Step step_;
  StepData data_;
  std::vector<double> loss_, partials_, ytilde_, scaled_, coef_, square_, gram_, r_;
  fl::spherical::FactoredProblem problem_{};
};

std::vector<CaseSpec> cpu_cases(bool quick) {
  const std::vector<Shape> shapes = quick ? std::vector<Shape>{{5000, 32, 16}}
                                          : std::vector<Shape>{{100000, 128, 128}, {100000, 512, 128}};
  return make_cases<CpuFactoredStep>(Device::Cpu, shapes);
}

const FamilyRegistrar registrar("spherical_factored/cpu", &cpu_cases);

}  // namespace
}  // namespace spherical_factored
}  // namespace fl_bench
