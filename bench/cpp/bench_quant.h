// The quant-family case list, shared by the CPU cases (bench_quant.cpp) and the CUDA cases
// (bench_quant_cuda.cu): y = x W^T from a packed mixed 2/4-bit weight, through the public
// entry points of quant/quant_kernels.h only. Random words are valid codes, so the weight is
// random packed data with small scales.
#pragma once

#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "bench_data.h"
#include "harness.h"
#include "quant/quant_kernels.h"

namespace fl_bench {
namespace quant {

struct Shape {
  int64_t out_features;  // N
  int64_t in_features;   // K
  int64_t rows;          // M, rows of x
  int four_bit_percent;  // share of 4-bit K-blocks
  const char* kernel = nullptr;  // FASTLOSS_QUANT_KERNEL for the case ("mma", "gemv"), null: the plan's choice
};

constexpr int64_t kGroupSize = 128;

inline fl::quant::PackedShape packed_shape(const Shape& s) {
  const int64_t groups = (s.in_features + kGroupSize - 1) / kGroupSize;
  return fl::quant::make_packed_shape(s.out_features, s.in_features, kGroupSize, groups * s.four_bit_percent / 100);
}

// Bytes one product must move: the packed weight (words, K-block map, scales, zeros), x and y.
inline int64_t bytes_moved(const Shape& s) {
  const fl::quant::PackedShape p = packed_shape(s);
  return (p.main_words() + p.side_words() + p.groups) * 4 + p.groups * p.rows_padded * 3 +
         2 * s.rows * (s.in_features + s.out_features);
}

// The host arrays of a packed weight and of x (fp16), drawn once per case.
struct HostData {
  fl::quant::PackedShape shape;
  std::vector<uint32_t> main, side;
  std::vector<int32_t> side_index;
  std::vector<fl::Half> scales, x;
  std::vector<uint8_t> zeros;

  explicit HostData(const Shape& s) {
    shape = packed_shape(s);
    const int64_t groups = shape.groups, four = shape.side_groups;
    std::mt19937_64 rng(20261122);
    std::uniform_int_distribution<uint32_t> bits;
    main.resize(static_cast<size_t>(shape.main_words()));
    side.resize(static_cast<size_t>(shape.side_words()));
    for (uint32_t& w : main) w = bits(rng);
    for (uint32_t& w : side) w = bits(rng);
    side_index.assign(static_cast<size_t>(groups), -1);
    for (int64_t g = 0; g < four; ++g) side_index[static_cast<size_t>(g * groups / four)] = static_cast<int32_t>(g);
    scales.resize(static_cast<size_t>(groups * shape.rows_padded));
    zeros.resize(scales.size());
    for (size_t i = 0; i < scales.size(); ++i) {
      scales[i] = fl::half_from_float(0.01f + 0.01f * static_cast<float>(bits(rng) % 100) / 100.f);
      zeros[i] = static_cast<uint8_t>(bits(rng) % 4);
    }
    x.resize(static_cast<size_t>(s.rows * s.in_features));
    std::normal_distribution<float> normal(0.f, 1.f);
    for (fl::Half& v : x) v = fl::half_from_float(normal(rng));
  }
};

// Impl is the device's PreparedCase, constructed from (const DeviceContext&, Shape).
template <class Impl>
std::vector<CaseSpec> make_cases(Device device, const std::vector<Shape>& shapes) {
  std::vector<CaseSpec> cases;
  for (const Shape& shape : shapes) {
    CaseSpec spec;
    spec.name = "quant/matmul/" + std::string(shape.four_bit_percent ? "mixed" : "2bit") + "/M=" +
                std::to_string(shape.rows) + (shape.kernel ? std::string("/") + shape.kernel : std::string());
    spec.device = device;
    spec.dtype = "float16";
    spec.rows = shape.out_features;
    spec.cols = shape.in_features;
    spec.bytes = bytes_moved(shape);
    spec.prepare = [shape](const DeviceContext& context) -> std::unique_ptr<PreparedCase> {
      return std::make_unique<Impl>(context, shape);
    };
    cases.push_back(std::move(spec));
  }
  return cases;
}

}  // namespace quant
}  // namespace fl_bench
