// CPU y = x W^T + bias straight from the packed weight: each word tile (8 rows x 64
// columns) is decoded once into float (q - z) values and dotted with every row of x, and
// each group's sum is scaled once, so no dequantized copy of W is ever written.
#include <algorithm>
#include <vector>

#include "common/cpu_multiversion.h"
#include "common/dtype.h"
#include "common/parallel.h"
#include "quant/quant_kernels.h"

namespace fl {
namespace quant {
namespace {

// group_sums[m * 8 + r] += dot(tile[r], x[m]) over the tile's 64 columns.
FL_CPU_MULTIVERSION void accumulate_tile(const float* tile, const float* x, int64_t ldx, int64_t rows,
                                         float* group_sums) {
  for (int64_t m = 0; m < rows; ++m) {
    const float* xm = x + m * ldx;
    for (int r = 0; r < kTileRows; ++r) {
      const float* wr = tile + r * kWordCols;
      float sum = 0.f;
      for (int c = 0; c < kWordCols; ++c) sum += wr[c] * xm[c];
      group_sums[m * kTileRows + r] += sum;
    }
  }
}

// The 8 x 64 tile of (q - z) values of word tile (rt, kw).
void decode_tile(const PackedWeight& w, int64_t rt, int64_t kw, const int* zeros, float* tile) {
  const PackedShape& s = w.shape;
  const int64_t words_per_group = s.words_per_group();
  const int32_t rank = w.side_index[kw / words_per_group];
  for (int lane = 0; lane < kLanes; ++lane) {
    const int r = lane / 4, t = lane % 4;
    const uint32_t low = w.main[main_word_index(s, rt, kw, lane)];
    const uint32_t high = rank >= 0 ? w.side[side_word_index(s, rt, rank, kw % words_per_group, lane)] : 0u;
    for (int position = 0; position < kCodesPerWord; ++position) {
      const int code = code_at(low, high, position);
      tile[r * kWordCols + col_of_position(t, position)] = static_cast<float>(code - zeros[r]);
    }
  }
}

template <class T>
void matmul_typed(const MatmulProblem& p) {
  const PackedWeight& w = p.weight;
  const PackedShape& s = w.shape;
  const int64_t M = p.rows, K_pad = s.cols_padded();
  // x in float, zero beyond column K, so the padded columns of the last group add nothing.
  std::vector<float> xf(static_cast<size_t>(M * K_pad), 0.f);
  const T* x = static_cast<const T*>(p.x);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < s.cols; ++k) xf[m * K_pad + k] = to_acc(x[m * p.ldx + k]);
  const T* bias = static_cast<const T*>(p.bias);
  T* y = static_cast<T*>(p.y);
  const int64_t words_per_group = s.words_per_group();
  const int64_t live_tiles = (s.rows + kTileRows - 1) / kTileRows;
  parallel_for(live_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> tile(kTileRows * kWordCols), sums(M * kTileRows), totals(M * kTileRows);
    int zeros[kTileRows];
    float scales[kTileRows];
    for (int64_t rt = begin; rt < end; ++rt) {
      std::fill(totals.begin(), totals.end(), 0.f);
      for (int64_t group = 0; group < s.groups; ++group) {
        for (int r = 0; r < kTileRows; ++r) {
          const int64_t at = group * s.rows_padded + rt * kTileRows + r;
          zeros[r] = w.zeros[at];
          scales[r] = host_scale(w.scales, w.scale_dtype, at);
        }
        std::fill(sums.begin(), sums.end(), 0.f);
        for (int64_t kw = group * words_per_group; kw < (group + 1) * words_per_group; ++kw) {
          decode_tile(w, rt, kw, zeros, tile.data());
          accumulate_tile(tile.data(), xf.data() + kw * kWordCols, K_pad, M, sums.data());
        }
        for (int64_t m = 0; m < M; ++m)
          for (int r = 0; r < kTileRows; ++r) totals[m * kTileRows + r] += scales[r] * sums[m * kTileRows + r];
      }
      for (int64_t m = 0; m < M; ++m) {
        for (int r = 0; r < kTileRows; ++r) {
          const int64_t n = rt * kTileRows + r;
          if (n >= s.rows) break;
          const float b = bias ? to_acc(bias[n]) : 0.f;
          y[m * p.ldy + n] = StoreAs<T>::from(totals[m * kTileRows + r] + b);
        }
      }
    }
  });
}

}  // namespace

void matmul_cpu(const MatmulProblem& p) {
  validate_matmul(p, /*cuda=*/false);
  if (p.rows == 0) return;
  switch (p.dtype) {
    case DType::Float32: return matmul_typed<float>(p);
    case DType::Float16: return matmul_typed<Half>(p);
    case DType::BFloat16: return matmul_typed<BFloat16>(p);
    default: break;
  }
}

}  // namespace quant
}  // namespace fl
