// The attention-family case list, shared by the CPU cases (bench_attention.cpp) and the CUDA cases
// (bench_attention_cuda.cu): softplus attention forward and forward + backward through
// attention/attention_kernels.h, LSSA and LSSAR (p = 15), causal, length scale on unit q and k.
#pragma once

#include <cmath>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "attention/attention_kernels.h"
#include "bench_data.h"
#include "harness.h"

namespace fl_bench {
namespace attention {

struct Shape {
  int64_t batch, heads, len, dim;
  bool reweight;
  bool backward;
};

// The bytes one pass must move at least: q, k, v, out (and for the backward dO, dq, dk, dv again).
inline int64_t bytes_moved(const Shape& s, int64_t element_bytes) {
  return (s.backward ? 8 : 4) * s.batch * s.heads * s.len * s.dim * element_bytes;
}

// Unit-norm rows (q, k) and normal rows (v, dO), stored as T.
template <class T>
std::vector<T> random_rows(const Shape& s, uint64_t seed, bool unit) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> row(static_cast<size_t>(s.dim));
  std::vector<T> out(static_cast<size_t>(s.batch * s.heads * s.len * s.dim));
  for (int64_t r = 0; r < s.batch * s.heads * s.len; ++r) {
    float norm = 0.f;
    for (float& x : row) {
      x = normal(rng);
      norm += x * x;
    }
    const float scale = unit ? 1.f / std::sqrt(norm) : 1.f;
    for (int64_t c = 0; c < s.dim; ++c) out[static_cast<size_t>(r * s.dim + c)] = fl::StoreAs<T>::from(row[c] * scale);
  }
  return out;
}

inline fl::attention::AttentionProblem problem(const Shape& s, fl::DType dtype, const void* q, const void* k,
                                               const void* v) {
  fl::attention::AttentionProblem p;
  p.dtype = dtype;
  p.batch = s.batch;
  p.heads_q = p.heads_kv = s.heads;
  p.len_q = p.len_k = s.len;
  p.head_dim = s.dim;
  p.q = q;
  p.k = k;
  p.v = v;
  p.causal = true;
  p.reweight_power = s.reweight ? 15.0 : 0.0;
  return p;
}

template <class Impl>
std::vector<CaseSpec> make_cases(Device device, const char* dtype, int64_t element_bytes,
                                 const std::vector<Shape>& shapes) {
  std::vector<CaseSpec> cases;
  for (const Shape& shape : shapes) {
    CaseSpec spec;
    spec.name = std::string("attention/") + (shape.reweight ? "lssar" : "lssa") + (shape.backward ? "/fwd+bwd" : "/fwd") +
                "/causal/B=" + std::to_string(shape.batch) + "/H=" + std::to_string(shape.heads);
    spec.device = device;
    spec.dtype = dtype;
    spec.rows = shape.len;
    spec.cols = shape.dim;
    spec.bytes = bytes_moved(shape, element_bytes);
    spec.prepare = [shape](const DeviceContext& context) -> std::unique_ptr<PreparedCase> {
      return std::make_unique<Impl>(context, shape);
    };
    cases.push_back(std::move(spec));
  }
  return cases;
}

}  // namespace attention
}  // namespace fl_bench
