// CPU cases of the attention family (bench_attention.h): float32 forward, or forward + backward.
#include <vector>

#include "bench_attention.h"
#include "registry.h"

namespace fl_bench {
namespace attention {
namespace {

class CpuAttention final : public PreparedCase {
 public:
  CpuAttention(const DeviceContext&, const Shape& shape)
      : shape_(shape),
        q_(random_rows<float>(shape, 1, true)),
        k_(random_rows<float>(shape, 2, true)),
        v_(random_rows<float>(shape, 3, false)),
        grad_out_(random_rows<float>(shape, 4, false)),
        out_(q_.size()),
        grad_q_(q_.size()),
        grad_k_(q_.size()),
        grad_v_(q_.size()),
        stats_(static_cast<size_t>(shape.batch * shape.heads * shape.len * 3)),
        row_terms_(static_cast<size_t>(shape.batch * shape.heads * shape.len * 2)) {
    problem_ = problem(shape, fl::DType::Float32, q_.data(), k_.data(), v_.data());
  }
  void run() override {
    fl::attention::forward_cpu(problem_, out_.data(), stats_.data());
    if (!shape_.backward) return;
    fl::attention::BackwardArgs a;
    a.out = out_.data();
    a.grad_out = grad_out_.data();
    a.stats = stats_.data();
    a.grad_q = grad_q_.data();
    a.grad_k = grad_k_.data();
    a.grad_v = grad_v_.data();
    a.row_terms = row_terms_.data();
    fl::attention::backward_cpu(problem_, a);
  }
  void verify() override {
    require_finite("out", out_);
    if (shape_.backward) {
      require_finite("grad_q", grad_q_);
      require_finite("grad_k", grad_k_);
      require_finite("grad_v", grad_v_);
    }
  }

 private:
  Shape shape_;
  std::vector<float> q_, k_, v_, grad_out_, out_, grad_q_, grad_k_, grad_v_, stats_, row_terms_;
  fl::attention::AttentionProblem problem_;
};

std::vector<CaseSpec> cpu_cases(bool quick) {
  if (quick) return make_cases<CpuAttention>(Device::Cpu, "float32", 4, {{1, 2, 128, 64, true, true}});
  std::vector<Shape> shapes;
  for (bool reweight : {false, true})
    for (bool backward : {false, true}) shapes.push_back({1, 8, 2048, 128, reweight, backward});
  return make_cases<CpuAttention>(Device::Cpu, "float32", 4, shapes);
}

const FamilyRegistrar registrar("attention/cpu", &cpu_cases);

}  // namespace
}  // namespace attention
}  // namespace fl_bench
