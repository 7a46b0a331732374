// CPU cases of the spherical family: dense_loss_forward_cpu / _backward_cpu,
// through the public entry points of spherical/dense_loss.h only.
#include <vector>

#include "bench_data.h"
#include "bench_spherical.h"
#include "registry.h"

namespace fl_bench {
namespace spherical {
namespace {

template <class T>
class CpuDenseLoss final : public PreparedCase {
  using Acc = typename fl::AccType<T>::type;

 public:
  CpuDenseLoss(const DeviceContext& /*context*/, const fl::spherical::LossParams& params, Pass pass, Shape shape)
      : pass_(pass),
        // Read-only, so the cached buffer is used in place, shared by the cases of one shape.
        logits_(random_logits<T>(shape.rows * shape.cols)),
        target_(random_targets(shape.rows, shape.cols)),
        loss_(static_cast<size_t>(shape.rows)),
        coef_(static_cast<size_t>(shape.rows * fl::spherical::kCoefficientsPerRow)),
        grad_loss_(static_cast<size_t>(shape.rows), Acc(1)),
        grad_(pass == Pass::Forward ? 0 : static_cast<size_t>(shape.rows * shape.cols)) {
    problem_ = make_problem(DTypeOf<T>::value, logits_.data(), shape, target_.data(), params);
    // Backward alone still needs the coefficients that a forward pass saves.
    if (pass_ == Pass::Backward) forward();
  }

  void run() override {
    if (pass_ != Pass::Backward) forward();
    if (pass_ != Pass::Forward) backward();
  }

  void verify() override {
    require_finite("loss", loss_);
    if (pass_ != Pass::Forward) require_finite("grad_logits", grad_);
  }

 private:
  void forward() { fl::spherical::dense_loss_forward_cpu(problem_, loss_.data(), coef_.data()); }
  void backward() {
    fl::spherical::dense_loss_backward_cpu(problem_, grad_loss_.data(), 1, coef_.data(), grad_.data());
  }

  Pass pass_;
  const std::vector<T>& logits_;
  std::vector<int64_t> target_;
  std::vector<Acc> loss_;
  std::vector<Acc> coef_;
  std::vector<Acc> grad_loss_;
  std::vector<T> grad_;
  fl::spherical::DenseLossProblem problem_{};
};

std::vector<CaseSpec> cpu_cases(bool quick) {
  // Default: a mid-size vocabulary with a batch that fills every core, and a
  // large vocabulary with few rows, where each row is split across threads.
  const std::vector<Shape> shapes = quick ? std::vector<Shape>{{8, 4096}}
                                          : std::vector<Shape>{{64, 32768}, {8, 131072}};
  return make_cases<CpuDenseLoss>(Device::Cpu, shapes);
}

const FamilyRegistrar registrar("spherical/cpu", &cpu_cases);

}  // namespace
}  // namespace spherical
}  // namespace fl_bench
