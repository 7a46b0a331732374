// The ot-family case list, shared by the CPU cases (bench_ot.cpp) and the CUDA cases
// (bench_ot_cuda.cu): a fixed number of Sinkhorn iterations (no convergence checks, so every
// sample does the same work) through ot/ot_kernels.h, on a cost matrix or on point clouds.
#pragma once

#include <cmath>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "bench_data.h"
#include "harness.h"
#include "ot/ot_kernels.h"

namespace fl_bench {
namespace ot {

constexpr int64_t kIterations = 20;
constexpr double kEps = 0.05;

struct Shape {
  int64_t batch, n, m, dim;  // dim = 0: a cost matrix
};

// Bytes one solve must move at least: the cost matrix twice per iteration, or the points.
inline int64_t bytes_moved(const Shape& s) {
  if (s.dim == 0) return 2 * kIterations * s.batch * s.n * s.m * 4;
  return 2 * kIterations * s.batch * (s.n + s.m) * (s.dim + 2) * 4;
}

struct HostData {
  std::vector<float> cost, x, y, log_a, log_b;

  explicit HostData(const Shape& s) {
    std::mt19937_64 rng(20261122);
    std::uniform_real_distribution<float> uniform(0.f, 1.f);
    std::normal_distribution<float> normal(0.f, 1.f);
    const float scale = s.dim > 0 ? 1.f / std::sqrt(static_cast<float>(s.dim)) : 1.f;
    if (s.dim == 0) {
      cost.resize(static_cast<size_t>(s.batch * s.n * s.m));
      for (float& c : cost) c = uniform(rng);
    } else {
      x.resize(static_cast<size_t>(s.batch * s.n * s.dim));
      y.resize(static_cast<size_t>(s.batch * s.m * s.dim));
      for (float& v : x) v = normal(rng) * scale;
      for (float& v : y) v = normal(rng) * scale + 0.5f * scale;
    }
    log_a.assign(static_cast<size_t>(s.batch * s.n), -std::log(static_cast<float>(s.n)));
    log_b.assign(static_cast<size_t>(s.batch * s.m), -std::log(static_cast<float>(s.m)));
  }
};

inline fl::ot::SolveArgs solve_args(const Shape& s, const void* cost, const void* x, const void* y, const void* log_a,
                                    const void* log_b, void* f, void* g, int32_t* n_iter, void* error,
                                    void* workspace) {
  fl::ot::SolveArgs a;
  a.geom.dtype = fl::DType::Float32;
  a.geom.batch = s.batch;
  a.geom.n = s.n;
  a.geom.m = s.m;
  a.geom.dim = s.dim;
  a.geom.p = s.dim == 0 ? 0 : 2;
  a.geom.cost = cost;
  a.geom.x = x;
  a.geom.y = y;
  a.log_a = log_a;
  a.log_b = log_b;
  a.f = f;
  a.g = g;
  a.eps = kEps;
  a.max_iter = kIterations;
  a.check_every = 0;
  a.n_iter = n_iter;
  a.error = error;
  a.workspace = workspace;
  return a;
}

template <class Impl>
std::vector<CaseSpec> make_cases(Device device, const std::vector<Shape>& shapes) {
  std::vector<CaseSpec> cases;
  for (const Shape& shape : shapes) {
    CaseSpec spec;
    spec.name = std::string("ot/sinkhorn") + (shape.dim == 0 ? "/cost" : "/points/d=" + std::to_string(shape.dim)) +
                "/B=" + std::to_string(shape.batch) + "/it=" + std::to_string(kIterations);
    spec.device = device;
    spec.dtype = "float32";
    spec.rows = shape.n;
    spec.cols = shape.m;
    spec.bytes = bytes_moved(shape);
    spec.prepare = [shape](const DeviceContext& context) -> std::unique_ptr<PreparedCase> {
      return std::make_unique<Impl>(context, shape);
    };
    cases.push_back(std::move(spec));
  }
  return cases;
}

}  // namespace ot
}  // namespace fl_bench
