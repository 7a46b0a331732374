// CPU cases of the metric family: one loss's forward (row terms) and backward (dX, dY) through
// metric/metric_kernels.h on unit-norm random embeddings, with labels from 100 classes.
#include <cmath>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "bench_data.h"
#include "harness.h"
#include "metric/metric_kernels.h"
#include "registry.h"

namespace fl_bench {
namespace metric {
namespace {

using fl::metric::LossKind;

struct Shape {
  const char* name;
  LossKind kind;
  int64_t batch, dim;
  double p0, p1, p2, p3;
  int option;
};

class CpuPairLoss final : public PreparedCase {
 public:
  CpuPairLoss(const DeviceContext&, const Shape& shape)
      : shape_(shape),
        n_(shape.batch),
        x_(static_cast<size_t>(n_ * shape.dim)),
        labels_(static_cast<size_t>(n_)),
        terms_(static_cast<size_t>(n_ * fl::metric::kRowTerms)),
        counts_(terms_.size()),
        stats_(static_cast<size_t>(n_ * fl::metric::kRowStats)),
        grad_row_(terms_.size(), 1.0f / static_cast<float>(n_)),
        grad_x_(x_.size()),
        grad_y_(x_.size()) {
    std::mt19937_64 rng(20261123);
    std::normal_distribution<float> normal(0.f, 1.f);
    std::uniform_int_distribution<int64_t> label(0, 99);
    for (int64_t i = 0; i < n_; ++i) {
      float norm = 0.f;
      for (int64_t t = 0; t < shape.dim; ++t) {
        const float v = normal(rng);
        x_[static_cast<size_t>(i * shape.dim + t)] = v;
        norm += v * v;
      }
      for (int64_t t = 0; t < shape.dim; ++t) x_[static_cast<size_t>(i * shape.dim + t)] /= std::sqrt(norm);
      labels_[static_cast<size_t>(i)] = label(rng);
    }
    p_.dtype = fl::DType::Float32;
    p_.n = p_.m = n_;
    p_.dim = shape.dim;
    p_.x = p_.y = x_.data();
    p_.labels_x = p_.labels_y = labels_.data();
    p_.self_offset = shape.kind == LossKind::InfoNCE ? -1 : 0;
    p_.kind = shape.kind;
    p_.p0 = shape.p0;
    p_.p1 = shape.p1;
    p_.p2 = shape.p2;
    p_.p3 = shape.p3;
    p_.option = shape.option;
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
      {"info_nce", LossKind::InfoNCE, b, d, 1.0 / 0.07, 0, 0, 0, 0},
      {"multi_similarity+mining", LossKind::MultiSimilarity, b, d, 2.0, 50.0, 0.5, 0.1, 1},
      {"supcon", LossKind::SupCon, b, d, 0.1, 0, 0, 0, 0},
      {"triplet_all", LossKind::Triplet, b, d, 0.05, 0.05, 0, 0, 0},
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
