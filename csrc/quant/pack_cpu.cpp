// CPU packing, unpacking and dequantization of the mixed 2/4-bit format (packed_layout.h).
// Each loop walks the word tiles, so the bit positions come from the same code_slot /
// col_of_position functions as the CUDA kernels.
#include <cstring>

#include "common/dtype.h"
#include "common/error.h"
#include "common/parallel.h"
#include "quant/quant_kernels.h"

namespace fl {
namespace quant {
namespace {

// Calls visit(row, col, position) for the 16 codes of lane `lane` of a word tile.
template <class Visit>
void for_each_code(int64_t row_tile, int64_t k_word, int lane, Visit&& visit) {
  const int64_t row = row_tile * kTileRows + lane / 4;
  const int t = lane % 4;
  for (int position = 0; position < kCodesPerWord; ++position) {
    visit(row, k_word * kWordCols + col_of_position(t, position), position);
  }
}

// Grain of the row-tile loops: a tile row of a 4096-column weight is ~2 KB of words.
constexpr int64_t kTileGrain = 4;

// Calls visit(row_tile, k_word, lane, main_at, side_at) for every word of the main array, in
// parallel over row tiles; side_at is the word's partner in the side array, -1 for 2-bit K-blocks.
template <class Visit>
void for_each_word(const PackedShape& s, const int32_t* side_index, Visit&& visit) {
  const int64_t words_per_group = s.words_per_group();
  parallel_for(s.row_tiles(), kTileGrain, [&](int64_t begin, int64_t end) {
    for (int64_t rt = begin; rt < end; ++rt) {
      for (int64_t kw = 0; kw < s.k_words; ++kw) {
        const int32_t rank = side_index[kw / words_per_group];
        for (int lane = 0; lane < kLanes; ++lane) {
          const int64_t side_at = rank >= 0 ? side_word_index(s, rt, rank, kw % words_per_group, lane) : -1;
          visit(rt, kw, lane, main_word_index(s, rt, kw, lane), side_at);
        }
      }
    }
  });
}

}  // namespace

void pack_codes_cpu(const PackedShape& s, const int32_t* side_index, const uint8_t* codes, int64_t ld,
                    uint32_t* main, uint32_t* side) {
  validate_packed_shape(s, "fastloss.quant.pack");
  for_each_word(s, side_index, [&](int64_t rt, int64_t kw, int lane, int64_t main_at, int64_t side_at) {
    uint32_t low = 0, high = 0;
    for_each_code(rt, kw, lane, [&](int64_t row, int64_t col, int position) {
      const uint32_t code = (row < s.rows && col < s.cols) ? codes[row * ld + col] : 0u;
      low |= (code & 3u) << (2 * position);
      high |= ((code >> 2) & 3u) << (2 * position);
    });
    main[main_at] = low;
    if (side_at >= 0) side[side_at] = high;
  });
}

void unpack_codes_cpu(const PackedShape& s, const int32_t* side_index, const uint32_t* main, const uint32_t* side,
                      uint8_t* codes) {
  validate_packed_shape(s, "fastloss.quant.unpack");
  for_each_word(s, side_index, [&](int64_t rt, int64_t kw, int lane, int64_t main_at, int64_t side_at) {
    const uint32_t low = main[main_at];
    const uint32_t high = side_at >= 0 ? side[side_at] : 0u;
    for_each_code(rt, kw, lane, [&](int64_t row, int64_t col, int position) {
      if (row >= s.rows || col >= s.cols) return;
      codes[row * s.cols + col] = static_cast<uint8_t>(code_at(low, high, position));
    });
  });
}

void dequantize_cpu(const PackedWeight& w, DType out_dtype, void* out) {
  const PackedShape& s = w.shape;
  validate_packed_shape(s, "fastloss.quant.dequantize");
  FL_CHECK_ARG(w.scale_dtype == DType::Float16 || w.scale_dtype == DType::BFloat16,
               "fastloss.quant.dequantize: scales must be float16 or bfloat16");
  dispatch_float_types<Half, BFloat16>(out_dtype, "fastloss.quant.dequantize", [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* dst = static_cast<T*>(out);
    const int64_t words_per_group = s.words_per_group();
    for_each_word(s, w.side_index, [&](int64_t rt, int64_t kw, int lane, int64_t main_at, int64_t side_at) {
      const int64_t row = rt * kTileRows + lane / 4;
      if (row >= s.rows) return;
      const int64_t at = (kw / words_per_group) * s.rows_padded + row;
      const uint32_t low = w.main[main_at];
      const uint32_t high = side_at >= 0 ? w.side[side_at] : 0u;
      const float scale = host_scale(w.scales, w.scale_dtype, at);
      const int zero = w.zeros[at];
      for_each_code(rt, kw, lane, [&](int64_t, int64_t col, int position) {
        if (col >= s.cols) return;
        const int code = code_at(low, high, position);
        dst[row * s.cols + col] = StoreAs<T>::from(dequantized_value(code, zero, scale));
      });
    });
  });
}

}  // namespace quant
}  // namespace fl
