// The metric-family cases' inputs, shared by the CPU cases (bench_metric.cpp) and the CUDA cases
// (bench_metric_cuda.cu): unit-norm random embeddings, labels from 100 classes, and the problem of
// one loss on the batch against itself.
#pragma once

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "common/dtype.h"
#include "metric/metric_kernels.h"

namespace fl_bench {
namespace metric {

struct Shape {
  const char* name;
  fl::metric::LossKind kind;
  int64_t batch, dim;
  double p0, p1, p2, p3;
  int option;
  bool symmetric;
};

// `n` unit-norm rows of `dim` normal values, stored as T.
template <class T>
std::vector<T> unit_rows(int64_t n, int64_t dim, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> row(static_cast<size_t>(dim));
  std::vector<T> out(static_cast<size_t>(n * dim));
  for (int64_t i = 0; i < n; ++i) {
    float norm = 0.f;
    for (float& v : row) {
      v = normal(rng);
      norm += v * v;
    }
    for (int64_t t = 0; t < dim; ++t) out[static_cast<size_t>(i * dim + t)] = fl::StoreAs<T>::from(row[t] / std::sqrt(norm));
  }
  return out;
}

inline std::vector<int64_t> random_labels(int64_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int64_t> label(0, 99);
  std::vector<int64_t> out(static_cast<size_t>(n));
  for (int64_t& v : out) v = label(rng);
  return out;
}

// The loss of `shape` on the batch x against itself (y = x): the self pair excluded for the label
// losses, the diagonal the positive for InfoNCE.
inline fl::metric::PairProblem problem(const Shape& shape, fl::DType dtype, const void* x, const int64_t* labels) {
  fl::metric::PairProblem p;
  p.dtype = dtype;
  p.n = p.m = shape.batch;
  p.dim = shape.dim;
  p.x = p.y = x;
  const bool info_nce = shape.kind == fl::metric::LossKind::InfoNCE;
  p.labels_x = p.labels_y = info_nce ? nullptr : labels;
  p.self_offset = info_nce ? -1 : 0;
  p.kind = shape.kind;
  p.p0 = shape.p0;
  p.p1 = shape.p1;
  p.p2 = shape.p2;
  p.p3 = shape.p3;
  p.option = shape.option;
  p.symmetric = shape.symmetric;
  return p;
}

}  // namespace metric
}  // namespace fl_bench
