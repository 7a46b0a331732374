// The spherical-family case list, shared by the CPU cases (bench_spherical.cpp)
// and the CUDA cases (bench_spherical_cuda.cu), so that both devices time the
// same losses, passes and dtypes under the same names.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "bench_data.h"
#include "harness.h"
#include "spherical/dense_loss.h"

namespace fl_bench {
namespace spherical {

enum class Pass { Forward, Backward, ForwardBackward };

inline const char* pass_slug(Pass pass) {
  switch (pass) {
    case Pass::Forward: return "fwd";
    case Pass::Backward: return "bwd";
    case Pass::ForwardBackward: return "fwd+bwd";
  }
  return "?";
}

struct Shape {
  int64_t rows;
  int64_t cols;
};

struct LossVariant {
  const char* slug;
  fl::spherical::LossParams params;
};

// The default hyper-parameters of the Python API (python/fastloss/spherical.py).
inline std::vector<LossVariant> loss_variants() {
  using fl::spherical::LossKind;
  return {{"zloss", {LossKind::ZLoss, 1.0, 0.0, 1e-12}},
          {"spherical_softmax", {LossKind::SphericalSoftmax, 0.0, 0.0, 1e-6}},
          {"taylor_softmax", {LossKind::TaylorSoftmax, 0.0, 0.0, 0.0}}};
}

// Python's default; the random targets never hit it, so every row is live.
constexpr int64_t kIgnoreIndex = -100;

// The traffic floor of a pass: forward reads the logits once; backward reads
// them and writes the gradient. Per-row data (target, loss, coefficients,
// about 32 bytes a row) is left out: the floor stays comparable across losses,
// at the cost of under-counting short rows (3% at D=512 in bfloat16).
inline int64_t bytes_moved(Pass pass, Shape shape, int64_t element_bytes) {
  const int64_t matrix = shape.rows * shape.cols * element_bytes;
  switch (pass) {
    case Pass::Forward: return matrix;
    case Pass::Backward: return 2 * matrix;
    case Pass::ForwardBackward: return 3 * matrix;
  }
  return 0;
}

// The problem description the entry points take, for row-major contiguous logits.
inline fl::spherical::DenseLossProblem make_problem(fl::DType dtype, const void* logits, Shape shape,
                                                    const int64_t* target, const fl::spherical::LossParams& params) {
  fl::spherical::DenseLossProblem problem{dtype, logits, shape.rows, shape.cols, shape.cols, target, kIgnoreIndex,
                                          params, "fastloss_bench spherical", fl::DeviceErrorSlot{}};
  return problem;
}

// Every (loss, pass, dtype, shape) on `device`. Impl<T> is the device's
// PreparedCase for element type T, constructed from
// (const DeviceContext&, const LossParams&, Pass, Shape).
template <template <class> class Impl>
std::vector<CaseSpec> make_cases(Device device, const std::vector<Shape>& shapes) {
  std::vector<CaseSpec> cases;
  auto add = [&](auto type_tag, const LossVariant& loss, Pass pass, Shape shape) {
    using T = typename decltype(type_tag)::type;
    CaseSpec spec;
    spec.name = std::string("spherical/") + loss.slug + "/" + pass_slug(pass);
    spec.device = device;
    spec.dtype = fl::dtype_name(DTypeOf<T>::value);
    spec.rows = shape.rows;
    spec.cols = shape.cols;
    spec.bytes = bytes_moved(pass, shape, static_cast<int64_t>(sizeof(T)));
    const fl::spherical::LossParams params = loss.params;
    spec.prepare = [params, pass, shape](const DeviceContext& context) -> std::unique_ptr<PreparedCase> {
      return std::make_unique<Impl<T>>(context, params, pass, shape);
    };
    cases.push_back(std::move(spec));
  };
  for (const LossVariant& loss : loss_variants()) {
    for (Pass pass : {Pass::Forward, Pass::Backward, Pass::ForwardBackward}) {
      for (Shape shape : shapes) add(fl::TypeTag<float>{}, loss, pass, shape);
      for (Shape shape : shapes) add(fl::TypeTag<fl::BFloat16>{}, loss, pass, shape);
    }
  }
  return cases;
}

}  // namespace spherical
}  // namespace fl_bench
