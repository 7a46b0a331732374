// CPU y = x W^T + bias straight from the packed weight, with each group's sum scaled once,
// so no dequantized copy of W is ever written. Two loops:
// - one or two rows of x (the decode of a weight is not shared): x is permuted once into the
//   words' code order, so each byte of a packed word (four codes) meets four consecutive values of
//   x through a 256-entry table of code values, and the zero point comes out once per group
//   as z * sum(x);
// - more rows: each word tile (8 rows x 64 columns) is decoded once into float (q - z) values
//   and dotted with every row of x.
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
      // A vectorized (reordered) sum: without the pragma the compiler keeps the serial order.
#pragma omp simd reduction(+ : sum)
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

// Up to this many rows of x, the code-order loop; from here on, decoding a tile once for all
// rows is cheaper. Measured on the 2-core CI machine, 4096 x 4096, ms, code order vs tile:
// M = 1: 5.6 vs 9.1, M = 2: 8.7 vs 9.6, M = 4: 12.7 vs 11.2, M = 8: 20.8 vs 13.9.
constexpr int64_t kCodeOrderRows = 2;

// The code-order loop's pieces hold at least this many weights (and 16 rows): a smaller loop runs on
// the calling thread. Measured (bench/threads_calibrate.py, 2 cores): one row of x on 64x128 weights
// takes 0.03 ms, about what waking threads that are not spinning costs; 256x256 gains 1.3x from 2 threads.
constexpr int64_t kMinWeightsPerPiece = 1 << 15;

// kCodeValues[b][i]: the code at plane i of byte b.
struct CodeValueTable {
  float values[256][4];
  CodeValueTable() {
    for (int b = 0; b < 256; ++b)
      for (int i = 0; i < 4; ++i) values[b][i] = static_cast<float>((b >> (2 * i)) & 3);
  }
};
const CodeValueTable kCodeValues;

// sums[m] += weight * sum over the 16 codes of `word` (in plane order) of code * x_m[position],
// for the rows x_m = x_code_order + m * stride.
inline void word_dot(uint32_t word, float weight, const float* x_code_order, int64_t stride, int64_t rows,
                                  float* sums) {
  const float* codes[4];
  for (int byte = 0; byte < 4; ++byte) codes[byte] = kCodeValues.values[(word >> (8 * byte)) & 255u];
  for (int64_t m = 0; m < rows; ++m) {
    const float* xm = x_code_order + m * stride;
    float sum[4] = {0.f, 0.f, 0.f, 0.f};
    for (int byte = 0; byte < 4; ++byte)
      for (int i = 0; i < 4; ++i) sum[i] += codes[byte][i] * xm[4 * byte + i];
    sums[m] += weight * ((sum[0] + sum[1]) + (sum[2] + sum[3]));
  }
}

// totals[(n - begin) * M + m] = sum over groups of s * (sum q x - z sum x), rows n in [begin, end).
FL_CPU_MULTIVERSION void code_order_rows(const PackedWeight& w, const float* x_code, const float* x_sum, int64_t M,
                                         int64_t begin, int64_t end, float* totals, float* group_sum) {
  const PackedShape& s = w.shape;
  const int64_t words_per_group = s.words_per_group(), stride = s.k_words * kWordCols;
  for (int64_t n = begin; n < end; ++n) {
    const int64_t rt = n / kTileRows;
    const int r = static_cast<int>(n % kTileRows);
    float* total = totals + (n - begin) * M;
    for (int64_t m = 0; m < M; ++m) total[m] = 0.f;
    for (int64_t group = 0; group < s.groups; ++group) {
      const int32_t rank = w.side_index[group];
      for (int64_t m = 0; m < M; ++m) group_sum[m] = 0.f;
      for (int64_t kw = group * words_per_group; kw < (group + 1) * words_per_group; ++kw) {
        for (int t = 0; t < 4; ++t) {
          const int lane = r * 4 + t;
          const float* xc = x_code + (kw * 4 + t) * kCodesPerWord;
          word_dot(w.main[main_word_index(s, rt, kw, lane)], 1.f, xc, stride, M, group_sum);
          if (rank >= 0)  // q = low + 4 high
            word_dot(w.side[side_word_index(s, rt, rank, kw % words_per_group, lane)], 4.f, xc, stride, M, group_sum);
        }
      }
      const int64_t at = group * s.rows_padded + n;
      const float scale = host_scale(w.scales, w.scale_dtype, at), zero = static_cast<float>(w.zeros[at]);
      for (int64_t m = 0; m < M; ++m) total[m] += scale * (group_sum[m] - zero * x_sum[m * s.groups + group]);
    }
  }
}

template <class T>
void matmul_code_order(const MatmulProblem& p) {
  const PackedWeight& w = p.weight;
  const PackedShape& s = w.shape;
  const int64_t M = p.rows, words_per_group = s.words_per_group();
  // x_code[m][kw][t][position] = x[m][kw * 64 + col_of_position(t, position)] (0 beyond K),
  // and the sums of x per group.
  std::vector<float> x_code(static_cast<size_t>(M * s.k_words * kWordCols)), x_sum(static_cast<size_t>(M * s.groups), 0.f);
  const T* x = static_cast<const T*>(p.x);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t kw = 0; kw < s.k_words; ++kw) {
      float* dst = x_code.data() + (m * s.k_words + kw) * kWordCols;
      float group_part = 0.f;
      for (int t = 0; t < 4; ++t) {
        for (int position = 0; position < kCodesPerWord; ++position) {
          const int64_t k = kw * kWordCols + col_of_position(t, position);
          const float v = k < s.cols ? to_acc(x[m * p.ldx + k]) : 0.f;
          dst[t * kCodesPerWord + position] = v;
          group_part += v;
        }
      }
      x_sum[m * s.groups + kw / words_per_group] += group_part;
    }
  }
  parallel_for(s.rows, std::max<int64_t>(16, kMinWeightsPerPiece / std::max<int64_t>(1, s.cols)), [&](int64_t begin, int64_t end) {
    std::vector<float> total((end - begin) * M), group_sum(M);
    code_order_rows(w, x_code.data(), x_sum.data(), M, begin, end, total.data(), group_sum.data());
    const T* bias = static_cast<const T*>(p.bias);
    T* y = static_cast<T*>(p.y);
    for (int64_t n = begin; n < end; ++n) {
      const float b = bias ? to_acc(bias[n]) : 0.f;
      for (int64_t m = 0; m < M; ++m) y[m * p.ldy + n] = StoreAs<T>::from(total[(n - begin) * M + m] + b);
    }
  });
}

template <class T>
void matmul_typed(const MatmulProblem& p) {
  if (p.rows <= kCodeOrderRows) return matmul_code_order<T>(p);
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
  // Long batches go in slices of rows, so the float32 copy of x stays small.
  constexpr int64_t kSliceRows = 256;
  if (p.rows > kSliceRows) {
    const int64_t x_bytes = p.dtype == DType::Float32 ? 4 : 2;
    for (int64_t m0 = 0; m0 < p.rows; m0 += kSliceRows) {
      MatmulProblem slice = p;
      slice.rows = std::min(kSliceRows, p.rows - m0);
      slice.x = static_cast<const char*>(p.x) + m0 * p.ldx * x_bytes;
      slice.y = static_cast<char*>(p.y) + m0 * p.ldy * x_bytes;
      matmul_cpu(slice);
    }
    return;
  }
  switch (p.dtype) {
    case DType::Float32: return matmul_typed<float>(p);
    case DType::Float16: return matmul_typed<Half>(p);
    case DType::BFloat16: return matmul_typed<BFloat16>(p);
    default: break;
  }
}

}  // namespace quant
}  // namespace fl
