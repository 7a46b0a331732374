// The packed format of a mixed 2/4-bit weight (format version 1), shared by the CPU and
// CUDA kernels and documented in docs/quant_format.md.
//
// W is (N, K): N output channels (rows), K input channels. K is split into groups of
// `group_size` g columns (g a power of two >= 64); a K-block is the column stripe of one
// group across all N rows, and every K-block is either 2-bit or 4-bit, so a whole K-tile
// of the matmul takes one branch. K is padded to K_pad = G * g, N to a multiple of 64.
//
// Every code q (0..3, or 0..15) is split into bit planes of 2 bits:
//   main[] holds the low plane of every weight (all of a 2-bit weight),
//   side[] holds the high plane of the weights of 4-bit K-blocks only.
// Both arrays use one word layout, so the main array has a fixed stride whatever the
// precision mix and a 4-bit K-block costs one extra aligned word load from side[].
//
// Word layout: 32-bit words in tiles of 8 rows x 64 columns, 32 words a tile (one per
// lane of a warp), tiles row-major: word index ((n / 8) * k_words + k / 64) * 32 + lane.
// Lane (r, t) = (n % 8, t) holds, for the four 16-column chunks c of the tile, the
// columns 16c + {2t, 2t+1, 2t+8, 2t+9}: exactly the B fragment of thread r*4+t in an
// mma.m16n8k16, so a warp feeds the tensor cores from one 128-byte load per tile.
// Within the word, column 16c + j (j in {2t, 2t+1, 2t+8, 2t+9}) sits at bit
//   16 * (j & 1) + 4c + 2 * (j >= 8),
// so that (word >> (4c)) & 0x00030003 puts the pair (2t, 2t+1) into the two 16-bit
// halves and (word >> (4c + 2)) & 0x00030003 the pair (2t+8, 2t+9): one shift and one
// LOP3 (with an exponent "magic number") turn two codes into two fp16/bf16 values.
//
// Per (K-block, row): scale s (fp16 or bf16) and zero point z (uint8), stored
// group-major [G][N_pad] so that a CTA's rows of one group are contiguous.
// The dequantized weight is w = round_to_output_dtype(float(q - z) * float(s)): q - z is
// an integer of at most 5 bits and s has at most 11 significant bits, so the product is
// exact in float32 and only the final rounding (round to nearest even) is inexact; the
// CPU and CUDA kernels therefore agree bit for bit.
#pragma once

#include <cstdint>

#include "common/host_device.h"

namespace fl {
namespace quant {

constexpr int kFormatVersion = 1;
constexpr int kTileRows = 8;       // rows per word tile (an mma n8 block)
constexpr int kWordCols = 64;      // columns per word tile
constexpr int kLanes = 32;         // words per tile
constexpr int kRowAlign = 64;      // N is padded to this (the CUDA kernels' row block)
constexpr int kCodesPerWord = 16;  // 2-bit planes per 32-bit word

struct PackedShape {
  int64_t rows = 0;          // N
  int64_t cols = 0;          // K
  int64_t group_size = 0;    // g: a power of two >= 64
  int64_t rows_padded = 0;   // N_pad: N rounded up to kRowAlign
  int64_t groups = 0;        // G = ceil(K / g)
  int64_t k_words = 0;       // word tiles along K: G * g / 64
  int64_t side_groups = 0;   // number of 4-bit K-blocks
  int64_t side_k_words = 0;  // side_groups * g / 64

  FL_HD int64_t cols_padded() const { return groups * group_size; }
  FL_HD int64_t words_per_group() const { return group_size / kWordCols; }
  FL_HD int64_t row_tiles() const { return rows_padded / kTileRows; }
  FL_HD int64_t main_words() const { return row_tiles() * k_words * kLanes; }
  FL_HD int64_t side_words() const { return row_tiles() * side_k_words * kLanes; }
};

inline PackedShape make_packed_shape(int64_t rows, int64_t cols, int64_t group_size, int64_t side_groups) {
  PackedShape s;
  s.rows = rows;
  s.cols = cols;
  s.group_size = group_size;
  s.rows_padded = (rows + kRowAlign - 1) / kRowAlign * kRowAlign;
  s.groups = group_size > 0 ? (cols + group_size - 1) / group_size : 0;
  s.k_words = s.groups * (group_size / kWordCols);
  s.side_groups = side_groups;
  s.side_k_words = side_groups * (group_size / kWordCols);
  return s;
}

// Position of a code inside its word tile.
struct CodeSlot {
  int lane;  // word of the tile (0..31)
  int bit;   // lowest bit of the 2-bit plane in that word
};

FL_HD CodeSlot code_slot(int row_in_tile, int col_in_tile) {
  const int chunk = col_in_tile >> 4;  // 16-column chunk c
  const int j = col_in_tile & 15;
  const int t = (j & 7) >> 1;
  return CodeSlot{row_in_tile * 4 + t, 16 * (j & 1) + 4 * chunk + 2 * (j >> 3)};
}

// The inverse: the column (within the tile) of plane `position` (bit / 2, 0..15) of lane t's word.
FL_HD int col_of_position(int t, int position) {
  const int chunk = (position & 7) >> 1;
  const int j = 8 * (position & 1) + 2 * t + (position >> 3);
  return 16 * chunk + j;
}

FL_HD int64_t main_word_index(const PackedShape& s, int64_t row_tile, int64_t k_word, int lane) {
  return (row_tile * s.k_words + k_word) * kLanes + lane;
}

// side_index[group] is the rank of a 4-bit K-block among the 4-bit K-blocks, -1 for 2-bit.
FL_HD int64_t side_word_index(const PackedShape& s, int64_t row_tile, int64_t side_rank, int64_t word_in_group,
                              int lane) {
  return (row_tile * s.side_k_words + side_rank * s.words_per_group() + word_in_group) * kLanes + lane;
}

// The code at plane `position` of a main word and its side word (0 for a 2-bit K-block).
FL_HD int code_at(uint32_t low, uint32_t high, int position) {
  return static_cast<int>(((low >> (2 * position)) & 3u) | (((high >> (2 * position)) & 3u) << 2));
}

// q - z as the exact float it is, times the scale: the value before the output rounding.
FL_HD float dequantized_value(int code, int zero, float scale) { return static_cast<float>(code - zero) * scale; }

}  // namespace quant
}  // namespace fl
