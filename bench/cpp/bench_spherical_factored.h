// Cases of the factored output layer's kernels (csrc/spherical/factored_layer.h), shared by the CPU
// (bench_spherical_factored.cpp) and CUDA (bench_spherical_factored_cuda.cu) backends: each of the
// four kernels of one training step, and the four in sequence. The step's GEMMs (cuBLAS from
// Python) are not here; the Python benchmark times whole steps.
#pragma once

#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "bench_data.h"
#include "harness.h"
#include "spherical/factored_head.h"
#include "spherical/factored_layer.h"

namespace fl_bench {
namespace spherical_factored {

enum class Step { Head, Prepare, Gram, Scatter, All };

inline const char* step_slug(Step step) {
  switch (step) {
    case Step::Head: return "head";
    case Step::Prepare: return "prepare";
    case Step::Gram: return "gram";
    case Step::Scatter: return "scatter";
    case Step::All: return "all4";
  }
  return "?";
}

struct Shape {
  int64_t classes;   // D
  int64_t features;  // d
  int64_t samples;   // m
};

// Host inputs of one step, from fixed seeds: float64 state arrays, a float32 V, one target a sample.
struct StepData {
  Shape shape;
  std::vector<double> h, sh, grad_loss;
  std::vector<float> weight_rows;
  std::vector<int64_t> target;

  explicit StepData(Shape s) : shape(s) {
    std::mt19937_64 rng(kLogitSeed);
    std::normal_distribution<double> normal(0.0, 1.0);
    const int64_t d = s.features, m = s.samples;
    h.resize(static_cast<size_t>(m * d));
    for (double& v : h) v = normal(rng);
    sh.resize(static_cast<size_t>(m * fl::spherical::packed_width(d)));
    for (double& v : sh) v = normal(rng);
    for (int64_t j = 0; j < m; ++j) sh[j * fl::spherical::packed_width(d) + fl::spherical::wbar_slot(d)] = 0.0;
    // q_j = h_j . Q h_j must exceed s^2 / D: make the Q h block a positive multiple of h.
    for (int64_t j = 0; j < m; ++j)
      for (int64_t i = 0; i < d; ++i) sh[j * fl::spherical::packed_width(d) + fl::spherical::quad_offset(d) + i] = 2.0 * h[j * d + i];
    // V is up to 1.6 billion values: a cheap deterministic pattern in [0, 0.01) (the kernels' time does
    // not depend on the values).
    weight_rows.resize(static_cast<size_t>(s.classes * d));
    for (size_t i = 0; i < weight_rows.size(); ++i) weight_rows[i] = static_cast<float>((i * 2654435761u) % 1000u) * 1e-5f;
    target = random_targets(m, s.classes);
    grad_loss.assign(static_cast<size_t>(m), 1.0 / static_cast<double>(m));
  }

  fl::spherical::FactoredProblem problem(const void* h_ptr, const void* sh_ptr, const void* v_ptr,
                                         const int64_t* target_ptr) const {
    fl::spherical::FactoredProblem p;
    p.state_dtype = fl::DType::Float64;
    p.weight_dtype = fl::DType::Float32;
    p.samples = shape.samples;
    p.targets_per_sample = 1;
    p.features = shape.features;
    p.classes = shape.classes;
    p.h = h_ptr;
    p.sh = sh_ptr;
    p.weight_rows = v_ptr;
    p.target = target_ptr;
    p.params = fl::spherical::LossParams{fl::spherical::LossKind::ZLoss, 1.0, 0.0, 1e-12};
    p.op_name = "fastloss_bench spherical factored";
    return p;
  }
};

// The traffic floor of a step: the V rows it touches, the sample rows, and the m x m matrices.
inline int64_t bytes_moved(Step step, Shape s) {
  const int64_t d = s.features, m = s.samples, width = fl::spherical::packed_width(d);
  const int64_t rows = m * d * 4, state = m * (d + width) * 8, square = m * m * 8;
  switch (step) {
    case Step::Head: return rows + state;
    case Step::Prepare: return rows + state + m * width * 8;
    case Step::Gram: return 3 * square;
    case Step::Scatter: return 2 * rows + m * d * 8;
    case Step::All: return 4 * rows + 2 * state + m * width * 8 + 3 * square + m * d * 8;
  }
  return 0;
}

// Every (step, shape) on `device`; Impl is constructed from (const DeviceContext&, Step, Shape).
template <class Impl>
std::vector<CaseSpec> make_cases(Device device, const std::vector<Shape>& shapes) {
  std::vector<CaseSpec> cases;
  for (Shape shape : shapes) {
    for (Step step : {Step::Head, Step::Prepare, Step::Gram, Step::Scatter, Step::All}) {
      CaseSpec spec;
      spec.name = std::string("spherical/factored D=") + std::to_string(shape.classes) + "/" + step_slug(step);
      spec.device = device;
      spec.dtype = "float64";
      spec.rows = shape.samples;
      spec.cols = shape.features;
      spec.bytes = bytes_moved(step, shape);
      spec.prepare = [step, shape](const DeviceContext& context) -> std::unique_ptr<PreparedCase> {
        return std::make_unique<Impl>(context, step, shape);
      };
      cases.push_back(std::move(spec));
    }
  }
  return cases;
}

}  // namespace spherical_factored
}  // namespace fl_bench
