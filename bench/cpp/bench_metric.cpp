// CPU cases of the metric family: one loss's forward (row terms) and backward (dX, dY) through
// metric/metric_kernels.h on unit-norm random embeddings, with labels from 100 classes.
#include <memory>
#include <string>
#include <vector>

#include "bench_data.h"
#include "bench_metric.h"
#include "harness.h"
#include "metric/metric_kernels.h"
#include "registry.h"

namespace fl_bench {
namespace metric {
namespace {

using fl::metric::LossKind;

class CpuPairLoss final : public PreparedCase {
 public:
  CpuPairLoss(const DeviceContext&, const Shape& shape)
      : shape_(shape),
        n_(shape.batch),
        x_(unit_rows<float>(n_, shape.dim, 20261123)),
        labels_(random_labels(n_, 20261124)),
        terms_(static_cast<size_t>(n_ * fl::metric::kRowTerms)),
        counts_(terms_.size()),
        stats_(static_cast<size_t>(n_ * fl::metric::kRowStats)),
        grad_row_(terms_.size(), 1.0f / static_cast<float>(n_)),
        grad_x_(x_.size()),
        grad_y_(x_.size()) {
    p_ = problem(shape, fl::DType::Float32, x_.data(), labels_.data());
  }
  void run() override {
    fl::metric::ForwardOut out;
    out.row_terms = terms_.data();
    out.row_counts = counts_.data();
    out.row_stats = stats_.data();
    fl::metric::forward_cpu(p_, out);
    fl::metric::BackwardArgs a;
    a.row_stats = stats_.data();
    a.grad_row = grad_row_.data();
    a.grad_col = nullptr;
    a.grad_x = grad_x_.data();
    a.grad_y = grad_y_.data();
    a.grad_scale = &grad_scale_;
    fl::metric::backward_cpu(p_, a);
  }
  void verify() override {
    require_finite("row terms", terms_);
    require_finite("grad_x", grad_x_);
    require_finite("grad_y", grad_y_);
  }

 private:
  Shape shape_;
  int64_t n_;
  std::vector<float> x_;
  std::vector<int64_t> labels_;
  std::vector<float> terms_, counts_, stats_, grad_row_, grad_x_, grad_y_;
  float grad_scale_ = 0.f;
  fl::metric::PairProblem p_;
};

std::vector<CaseSpec> cpu_cases(bool quick) {
  const int64_t b = quick ? 128 : 4096, d = quick ? 32 : 128;
  const std::vector<Shape> shapes = {
      {"info_nce", LossKind::InfoNCE, b, d, 1.0 / 0.07, 0, 0, 0, 0, false},
      {"multi_similarity+mining", LossKind::MultiSimilarity, b, d, 2.0, 50.0, 0.5, 0.1, 1, false},
      {"supcon", LossKind::SupCon, b, d, 0.1, 0, 0, 0, 0, false},
      {"triplet_all", LossKind::Triplet, b, d, 0.05, 0.05, 0, 0, 0, false},
  };
  std::vector<CaseSpec> cases;
  for (const Shape& shape : shapes) {
    CaseSpec spec;
    spec.name = std::string("metric/") + shape.name + "/fwd+bwd";
    spec.device = Device::Cpu;
    spec.dtype = "float32";
    spec.rows = shape.batch;
    spec.cols = shape.dim;
    spec.bytes = 3 * shape.batch * shape.dim * 4;
    spec.prepare = [shape](const DeviceContext& context) -> std::unique_ptr<PreparedCase> {
      return std::make_unique<CpuPairLoss>(context, shape);
    };
    cases.push_back(std::move(spec));
  }
  return cases;
}

const FamilyRegistrar registrar("metric/cpu", &cpu_cases);

}  // namespace
}  // namespace metric
}  // namespace fl_bench
