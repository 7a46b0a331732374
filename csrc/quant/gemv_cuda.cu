// CUDA-core GEMV on the packed mixed 2/4-bit weight, for 1 to 8 rows of x: y = x W^T + bias.
//
// Why beside the tensor-core kernel: at batch 1 the weight's 2.19 bits/weight stream from HBM at
// about 2 thread instructions per weight of issue budget (H200: 4.3 TB/s against ~30 T thread
// instructions/s), and the mma kernel spends ~7 on index arithmetic, copies and fragments. Here
// a thread owns whole rows of W and streams their words with plain 128-bit loads:
//
// - Loads. A packed word tile (8 rows x 64 columns, packed_layout.h) stores row r's 64 columns in
//   lanes 4r..4r+3, i.e. 16 contiguous bytes. Lane l of a warp takes row l of 32 consecutive rows
//   (4 tiles): the warp's load of one K-word is four whole 128-byte lines. Each thread holds
//   several such row slots (slots_for: 4 at one row of x) and loads the next K-word's words while
//   it computes this one (a register double buffer, the loop unrolled twice so no copies are
//   needed).
// - Dequantization. OR-ing a 2-bit plane at bit p of each 16-bit half into the fp16 exponent
//   pattern of 2^(10-p) gives the pair (2^(10-p) + q) exactly (one LOP3); five of the eight
//   planes of a word sit where that works, the other three after one shift. One HSUB2 of
//   (2^(10-p) + c) gives q - c, exact; c = 2 (2-bit) or 8 (4-bit) centres the codes so the fp16
//   sums stay small. A 4-bit K-block first merges its main and side words into 4-bit codes
//   (two shifts and two LOP3 bit-selects per pair of words), then the same with nibbles.
// - Accumulation. HFMA2 of (q - c) with x in fp16, two accumulators per row and row of x, each
//   taking 16 products per K-word; per K-word they are folded in fp16 (two HADD2s), converted once
//   and added to the float32 total with the group's scale in one FFMA. The zero point enters once
//   per group, at its start: total += s (c - z) sum x, with sum x per group (and c times it)
//   computed once per CTA in shared memory; so a group start costs a conversion of s and z and
//   two FFMAs per row, and a group end nothing. The scales and zero points are loaded one group
//   ahead (slot j's at slot 0's address + 128 j: one pointer each).
// - x in fp16 whatever its dtype: the CTA stages its K range of x in shared memory, in the words'
//   pair order, scaled by a power of two 2^e chosen so that |x| < 2^7 (exact for bf16 inputs,
//   whose 8-bit significands fit fp16's 11, and no fp16 partial sum can overflow); 2^-e is undone
//   in float32 at the end. So bf16 runs the fp16 loop at the same cost.
// - Split-K. CTAs along K (a chunk of at most kMaxChunkWords K-words each) write float32
//   partial sums; gemv_reduce_kernel adds them in split order and adds the bias: deterministic,
//   no atomics, no host work, so the pair is capturable in a CUDA graph.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "common/cuda_check.cuh"
#include "common/cuda_numeric.cuh"
#include "quant/gemv_cuda.h"

namespace fl {
namespace quant {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
// 32-row slots per warp: four at one row of x, so the per-K-word work shared by a thread's rows
// (x from shared memory, loop control) is spread over more weights and 64 bytes per thread are in
// flight; two with more rows of x, whose accumulators take the registers.
template <int MR>
constexpr int slots_for() { return MR == 1 ? 4 : 2; }
constexpr int rows_per_cta(int slots) { return kWarps * slots * 32; }
constexpr int kMaxChunkWords = 32;                    // K-words (64 columns) per CTA, at most
constexpr int kMinChunkWords = 8;                     // and at least, when K allows
constexpr int kScaledExponentLimit = 7;               // |x| * 2^e < 2^7 in shared memory

// fp16 bits of 2^(10 - p) in both halves: OR-ed over a plane at bit p of each half it makes the
// pair 2^(10 - p) + q (p + width <= 10 keeps the plane inside the significand).
__host__ __device__ constexpr uint32_t magic_bits(int p) { return (uint32_t(25 - p) << 10) * 0x10001u; }
// fp16 bits of 2^(10 - p) + c in both halves (c << p < 2^10: exact).
__host__ __device__ constexpr uint32_t offset_bits(int p, int c) {
  return ((uint32_t(25 - p) << 10) | (uint32_t(c) << p)) * 0x10001u;
}

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ __half2 as_half2(uint32_t bits) { return *reinterpret_cast<__half2*>(&bits); }
__device__ __forceinline__ uint32_t word_of(const uint4& v, int t) {
  return t == 0 ? v.x : t == 1 ? v.y : t == 2 ? v.z : v.w;
}

// The loop-invariant operands of the dequantization, in registers: with the mask and the magic
// both immediates ptxas splits (w & mask) | magic into two LOP3s; with the magic (and the 4-bit
// merge mask) in a register it is one. They come from the launch parameters so the compiler
// cannot fold them back into immediates.
struct DequantRegs {
  uint32_t magic[5];  // magic_bits(0), magic_bits(2), ..., magic_bits(8)
  uint32_t low_planes;  // 0x33333333: the bit-select mask of the 4-bit merge
};

// (plane value - c) * x for one plane pair, into the accumulators of the MR rows of x.
// FIRST: the accumulators start here (a multiply instead of zeroing them).
template <int MR, bool FIRST>
__device__ __forceinline__ void fma_pair(__half2 q, const uint32_t (&xw)[MR][8], int i, __half2 (&acc)[MR]) {
#pragma unroll
  for (int m = 0; m < MR; ++m) acc[m] = FIRST ? __hmul2(q, as_half2(xw[m][i])) : __hfma2(q, as_half2(xw[m][i]), acc[m]);
}

// One main word of a 2-bit K-block: plane i (bits 2i and 16 + 2i) pairs with x pair i.
template <int MR, bool FIRST>
__device__ __forceinline__ void dot_word_2bit(uint32_t w, const DequantRegs& d, const uint32_t (&xw)[MR][8],
                                              __half2 (&acc)[MR]) {
  const uint32_t high = w >> 6;  // planes 5..7 (bits 10..14) to bits 4..8
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int p = i <= 4 ? 2 * i : 2 * i - 6;
    const uint32_t v = ((i <= 4 ? w : high) & (0x00030003u << p)) | d.magic[p / 2];
    const __half2 q = __hsub2(as_half2(v), as_half2(offset_bits(p, 2)));
    if (i == 0) {
      fma_pair<MR, FIRST>(q, xw, i, acc);
    } else {
      fma_pair<MR, false>(q, xw, i, acc);
    }
  }
}

// One word pair of a 4-bit K-block (low planes in `w`, high planes in `h`): the codes of planes
// 0, 2, 4, 6 become the nibbles of `a`, those of planes 1, 3, 5, 7 the nibbles of `b`.
template <int MR, bool FIRST>
__device__ __forceinline__ void dot_word_4bit(uint32_t w, uint32_t h, const DequantRegs& d,
                                              const uint32_t (&xw)[MR][8], __half2 (&acc)[MR]) {
  const uint32_t a = (w & d.low_planes) | ((h << 2) & ~d.low_planes);  // one LOP3 bit-select each
  const uint32_t b = ((w >> 2) & d.low_planes) | (h & ~d.low_planes);
  const uint32_t nibbles[4] = {a, b, a >> 8, b >> 8};  // nibble c of each half at bits 0 and 4
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    // plane i = 2c + h': word (i & 1) (+2 for c >= 2), nibble position 4 * ((i >> 1) & 1)
    const int p = 4 * ((i >> 1) & 1);
    const uint32_t src = nibbles[(i & 1) + 2 * (i >> 2)];
    const uint32_t v = (src & (0x000f000fu << p)) | d.magic[p / 2];
    const __half2 q = __hsub2(as_half2(v), as_half2(offset_bits(p, 8)));
    if (i == 0) {
      fma_pair<MR, FIRST>(q, xw, i, acc);
    } else {
      fma_pair<MR, false>(q, xw, i, acc);
    }
  }
}

template <class T>
struct GemvParams {
  const T* x;
  int64_t ldx;
  int rows;      // M
  int64_t cols;  // K
  const uint4* main;
  const uint4* side;
  const int32_t* side_index;
  const T* scales;
  const uint8_t* zeros;
  int64_t rows_padded;
  int64_t n_rows;  // N
  int64_t k_words;
  int64_t side_k_words;
  int group_shift;  // log2(K-words per group)
  int group_words;  // K-words per group
  int chunk_words;
  T* y;
  int64_t ldy;
  const T* bias;
  float* partials;  // [splits][M][N] when gridDim.y > 1
  DequantRegs dequant;
};

template <int MR>
struct GemvShared {
  uint32_t x[MR][kMaxChunkWords][4][8];     // fp16 pairs of scaled x, in the words' pair order
  float word_sum[MR][kMaxChunkWords];       // sum of the scaled x of one K-word
  // At the chunk's K-words that start a group (and at its first): {sum of the scaled x over the
  // chunk's part of that group, c times that sum} (c = 2 or 8, the code centre of the K-block).
  float2 start_sum[MR][kMaxChunkWords];
  int side_offset[kMaxChunkWords];          // K-word's side word (per row tile), -1: 2-bit
  // Per warp, 4-bit K-word and row slot: where the slot's side word is, in 16-byte units from
  // slot 0's side row (a dead slot reads slot 0's).
  int side_word[kWarps][kMaxChunkWords][4];
  int live_slots[kWarps];                   // per warp: its slots 0 .. live_slots - 1 are live
  int exponent[kWarps][MR];                 // per-warp max of the biased exponents of |x|
  float unscale[MR];                        // 2^-e
};

// Stages the CTA's K range of x: the scale 2^e per row of x, the pairs, the sums; and where each
// K-word's side words are.
template <class T, int MR>
__device__ void stage_x(const GemvParams<T>& p, GemvShared<MR>& s, int64_t kw0, int nkw) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t k0 = kw0 * 64, k1 = min64(p.cols, (kw0 + nkw) * 64);
  // The largest |x| of each row, by its float exponent (integer max: no NaN rules needed).
  int top[MR];
#pragma unroll
  for (int m = 0; m < MR; ++m) {
    top[m] = 0;
    if (m < p.rows) {
      for (int64_t k = k0 + tid; k < k1; k += kThreads) {
        top[m] = max(top[m], int((__float_as_uint(to_acc(p.x[m * p.ldx + k])) >> 23) & 0xff));
      }
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) top[m] = max(top[m], __shfl_xor_sync(0xffffffffu, top[m], offset));
    if (lane == 0) s.exponent[warp][m] = top[m];
  }
  if (tid < nkw) {
    const int64_t kw = kw0 + tid;
    const int32_t rank = __ldg(p.side_index + (kw >> p.group_shift));
    s.side_offset[tid] = rank >= 0 ? int((int64_t(rank) << p.group_shift) + (kw & ((1 << p.group_shift) - 1))) : -1;
  }
  {
    // slot j of warp w: rows (4 j + w) 32 .. + 32 of the CTA's, 16 j row tiles after slot 0
    constexpr int S = slots_for<MR>();
    const int64_t slot_tiles = int64_t(16) * p.side_k_words * 8;
    for (int e = tid; e < kWarps * nkw * S; e += kThreads) {
      const int w = e / (nkw * S), kwl = (e / S) % nkw, j = e % S;
      const int64_t kw = kw0 + kwl;
      const int32_t rank = __ldg(p.side_index + (kw >> p.group_shift));
      if (rank < 0) continue;
      const int64_t word = ((int64_t(rank) << p.group_shift) + (kw & ((1 << p.group_shift) - 1))) * 8;
      const bool live = int64_t(blockIdx.x) * rows_per_cta(S) + (j * kWarps + w) * 32 < p.rows_padded;
      s.side_word[w][kwl][j] = int(word + (live ? j * slot_tiles : 0));
    }
    if (tid < kWarps) {
      int live = 0;
      for (int j = 0; j < S; ++j) live += int64_t(blockIdx.x) * rows_per_cta(S) + (j * kWarps + tid) * 32 < p.rows_padded;
      s.live_slots[tid] = live;
    }
  }
  __syncthreads();
  // |x| < 2^(biased - 126); e makes it < 2^7. Zero rows, inf and NaN keep e = 0; tiny rows stop at
  // e = 60 (2^e stays a normal float).
  auto exponent_of = [&](int m) {
    int biased = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) biased = max(biased, s.exponent[w][m]);
    return (biased == 0 || biased == 255) ? 0 : min(60, kScaledExponentLimit + 126 - biased);
  };
  if (tid < MR) s.unscale[tid] = __uint_as_float(uint32_t(127 - exponent_of(tid)) << 23);
  // Pair i of word t of a K-word holds columns 2j, 2j + 1 with j = 8 (i / 2) + t + 4 (i % 2).
  for (int e = tid; e < MR * nkw * 32; e += kThreads) {
    const int m = e / (nkw * 32), rest = e % (nkw * 32), kwl = rest / 32, t = (rest / 8) % 4, i = rest % 8;
    const int64_t k = (kw0 + kwl) * 64 + 2 * (8 * (i >> 1) + t + 4 * (i & 1));
    float v0 = 0.f, v1 = 0.f;
    if (m < p.rows) {
      const float scale = __uint_as_float(uint32_t(127 + exponent_of(m)) << 23);
      if (k < p.cols) v0 = to_acc(p.x[m * p.ldx + k]) * scale;
      if (k + 1 < p.cols) v1 = to_acc(p.x[m * p.ldx + k + 1]) * scale;
    }
    const __half2 pair = __floats2half2_rn(v0, v1);
    s.x[m][kwl][t][i] = *reinterpret_cast<const uint32_t*>(&pair);
  }
  __syncthreads();
  for (int e = tid; e < MR * nkw; e += kThreads) {  // sums of the fp16 values the loop multiplies
    const int m = e / nkw, kwl = e % nkw;
    float sum = 0.f;
    for (int j = 0; j < 32; ++j) {
      const float2 f = __half22float2(as_half2(s.x[m][kwl][j / 8][j % 8]));
      sum += f.x + f.y;
    }
    s.word_sum[m][kwl] = sum;
  }
  __syncthreads();
  const int64_t wpg = int64_t(1) << p.group_shift;
  for (int e = tid; e < MR * nkw; e += kThreads) {
    const int m = e / nkw, kwl = e % nkw;
    const int64_t kw = kw0 + kwl;
    if (kwl != 0 && (kw & (wpg - 1)) != 0) continue;  // not a group start
    const int end = int(min64(kw0 + nkw, (kw | (wpg - 1)) + 1) - kw0);
    float sum = 0.f;
    for (int i = kwl; i < end; ++i) sum += s.word_sum[m][i];
    s.start_sum[m][kwl] = make_float2(sum, (s.side_offset[kwl] >= 0 ? 8.f : 2.f) * sum);
  }
  __syncthreads();
}

// Grid (n_blocks, splits): CTA (b, k) computes rows [R b, R b + R) of y (R = rows_per_cta) over K-words
// [k * chunk, (k + 1) * chunk).
template <class T, int MR>
__global__ void __launch_bounds__(kThreads) quant_gemv_kernel(GemvParams<T> p) {
  constexpr int S = slots_for<MR>();
  __shared__ GemvShared<MR> s;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t kw0 = int64_t(blockIdx.y) * p.chunk_words;
  const int nkw = int(min64(p.chunk_words, p.k_words - kw0));
  stage_x<T, MR>(p, s, kw0, nkw);

  // Row slots: slot j of warp w is rows [R b + 32 (4 j + w), +32), lane l its row l. A slot past
  // N_pad (a multiple of 64, so whole slots) rereads slot 0 and writes nothing.
  int64_t row[S];
  bool live[S];
#pragma unroll
  for (int j = 0; j < S; ++j) {
    row[j] = int64_t(blockIdx.x) * rows_per_cta(S) + (j * kWarps + warp) * 32 + lane;
    live[j] = row[j] - lane < p.rows_padded;
  }
  if (!live[0]) return;  // (no barrier follows)
#pragma unroll
  for (int j = 1; j < S; ++j) row[j] = live[j] ? row[j] : row[0];

  // Per slot: this row's 16 bytes of the turn's first K-word (main_at[j][8 i] is K-word kw + i, so
  // the loads of a turn take immediate offsets) and of side word o (side_at[j][8 o]).
  const uint4* main_at[S];
#pragma unroll
  for (int j = 0; j < S; ++j) main_at[j] = p.main + ((row[j] >> 3) * p.k_words + kw0) * 8 + (row[j] & 7);
  const uint4* side_at = p.side + (row[0] >> 3) * p.side_k_words * 8 + (row[0] & 7);

  // total[j][m]: the float32 sum of row slot j and row of x m, each K-word's fp16 dot product
  // multiplied by its group's scale as it is folded in, and each group's zero-point term
  // s (c - z) sum(x) added once at the group's start.
  float total[S][MR];
#pragma unroll
  for (int j = 0; j < S; ++j)
#pragma unroll
    for (int m = 0; m < MR; ++m) total[j][m] = 0.f;
  float scale[S];  // of the current group
  const DequantRegs d = p.dequant;

  // Scales and zero points, one group ahead: the group's are loaded (into raw_*) when the group
  // before it starts, so a group start only converts them. Slot j's row is slot 0's + 128 j (the
  // slot stride), so one pointer per array serves every slot with immediate offsets; a dead slot
  // (past N_pad) skips its loads (its sums are never stored).
  constexpr int kSlotRows = kWarps * 32;
  const int64_t kw_group0 = kw0 >> p.group_shift;
  const T* scale_at = p.scales + kw_group0 * p.rows_padded + row[0];
  const uint8_t* zero_at = p.zeros + kw_group0 * p.rows_padded + row[0];
  T raw_scale[S];
  uint32_t raw_zero[S];
  auto fetch = [&]() {
    const int live_slots = s.live_slots[warp];  // (from shared memory: no register held)
#pragma unroll
    for (int j = 0; j < S; ++j) {
      if (j == 0 || j < live_slots) {
        raw_scale[j] = __ldg(scale_at + j * kSlotRows);
        raw_zero[j] = __ldg(zero_at + j * kSlotRows);
      }
    }
  };
  // The group starting at local K-word kwl: its scales, and its zero-point term into total.
  auto begin_group = [&](int kwl) {
#pragma unroll
    for (int j = 0; j < S; ++j) {
      scale[j] = to_acc(raw_scale[j]);
      const float zero = float(raw_zero[j]);
#pragma unroll
      for (int m = 0; m < MR; ++m) {
        const float2 sums = s.start_sum[m][kwl];  // {sum x, c sum x}
        total[j][m] = fmaf(scale[j], fmaf(-zero, sums.x, sums.y), total[j][m]);
      }
    }
  };
#pragma unroll
  for (int j = 0; j < S; ++j) raw_scale[j] = T(), raw_zero[j] = 0;
  fetch();
  begin_group(0);
  const int wpg = p.group_words;
  int next_start = wpg - int(kw0 & (wpg - 1));  // local K-word of the next group start
  if (next_start < nkw) {
    scale_at += p.rows_padded;
    zero_at += p.rows_padded;
    fetch();
  }

  // Local K-word kwl = (the turn's first) + ahead; side words only for a 4-bit K-word (a uniform branch).
  auto load = [&](uint4 (&words)[S], uint4 (&sides)[S], int kwl, int ahead) {
#pragma unroll
    for (int j = 0; j < S; ++j) words[j] = __ldg(main_at[j] + 8 * ahead);
    if (s.side_offset[kwl] >= 0) {
      int at[4];
      if (S == 4) {
        const int4 v = *reinterpret_cast<const int4*>(&s.side_word[warp][kwl][0]);
        at[0] = v.x, at[1] = v.y, at[2] = v.z, at[3] = v.w;
      } else {
        const int2 v = *reinterpret_cast<const int2*>(&s.side_word[warp][kwl][0]);
        at[0] = v.x, at[1] = v.y, at[2] = at[3] = 0;
      }
#pragma unroll
      for (int j = 0; j < S; ++j) sides[j] = __ldg(side_at + at[j]);
    }
  };

  // One K-word: at a group start the group's scales and zero-point term (and the next group's
  // loads), the products, and the scaled float32 fold.
  auto compute = [&](const uint4 (&words)[S], const uint4 (&sides)[S], int kwl) {
    if (kwl == next_start) {
      begin_group(kwl);
      next_start += wpg;
      if (next_start < nkw) {
        scale_at += p.rows_padded;
        zero_at += p.rows_padded;
        fetch();
      }
    }
    const bool four_bit = s.side_offset[kwl] >= 0;
    __half2 acc[S][2][MR];
    // The products of one K-word, for one bit width: the branch is taken once per K-word.
    auto products = [&](auto four) {
#pragma unroll
      for (int t = 0; t < 4; ++t) {
        uint32_t xw[MR][8];
#pragma unroll
        for (int m = 0; m < MR; ++m) {
          const uint4 lo = *reinterpret_cast<const uint4*>(&s.x[m][kwl][t][0]);
          const uint4 hi = *reinterpret_cast<const uint4*>(&s.x[m][kwl][t][4]);
          xw[m][0] = lo.x, xw[m][1] = lo.y, xw[m][2] = lo.z, xw[m][3] = lo.w;
          xw[m][4] = hi.x, xw[m][5] = hi.y, xw[m][6] = hi.z, xw[m][7] = hi.w;
        }
#pragma unroll
        for (int j = 0; j < S; ++j) {
          const uint32_t w = word_of(words[j], t);
          if (decltype(four)::value) {
            const uint32_t h = word_of(sides[j], t);
            if (t % 2 == 0) dot_word_4bit<MR, true>(w, h, d, xw, acc[j][t / 2]);
            else dot_word_4bit<MR, false>(w, h, d, xw, acc[j][t / 2]);
          } else {
            if (t % 2 == 0) dot_word_2bit<MR, true>(w, d, xw, acc[j][t / 2]);
            else dot_word_2bit<MR, false>(w, d, xw, acc[j][t / 2]);
          }
        }
      }
    };
    if (four_bit) {
      products(std::integral_constant<bool, true>());
    } else {
      products(std::integral_constant<bool, false>());
    }
    // The fold: the two accumulators, then the two halves, in fp16 (64 products; |sum| stays far
    // below fp16's range), one conversion, and the scale in the float32 FMA.
#pragma unroll
    for (int j = 0; j < S; ++j)
#pragma unroll
      for (int m = 0; m < MR; ++m) {
        const __half2 h = __hadd2(acc[j][0][m], acc[j][1][m]);
        total[j][m] = fmaf(scale[j], __half2float(__hadd(__low2half(h), __high2half(h))), total[j][m]);
      }
  };

  uint4 words_a[S], sides_a[S], words_b[S], sides_b[S];
  load(words_a, sides_a, 0, 0);
#pragma unroll 1
  for (int kwl = 0; kwl < nkw; kwl += 2) {  // two K-words a turn: the buffers swap roles
    if (kwl + 1 < nkw) load(words_b, sides_b, kwl + 1, 1);
    compute(words_a, sides_a, kwl);
    if (kwl + 1 == nkw) break;
    if (kwl + 2 < nkw) load(words_a, sides_a, kwl + 2, 2);
    compute(words_b, sides_b, kwl + 1);
#pragma unroll
    for (int j = 0; j < S; ++j) main_at[j] += 16;
  }

#pragma unroll
  for (int j = 0; j < S; ++j) {
    if (!live[j] || row[j] >= p.n_rows) continue;
#pragma unroll
    for (int m = 0; m < MR; ++m) {
      if (m >= p.rows) break;
      const float v = total[j][m] * s.unscale[m];
      if (gridDim.y == 1) {
        p.y[m * p.ldy + row[j]] = CudaStore<T>::from(v + (p.bias ? to_acc(p.bias[row[j]]) : 0.f));
      } else {
        p.partials[(int64_t(blockIdx.y) * p.rows + m) * p.n_rows + row[j]] = v;
      }
    }
  }
}

// y = the splits' partial sums, added in split order, plus the bias.
template <class T>
__global__ void gemv_reduce_kernel(GemvParams<T> p, int splits) {
  const int64_t count = int64_t(p.rows) * p.n_rows;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < count; e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t m = e / p.n_rows, n = e % p.n_rows;
    float sum = 0.f;
    for (int k = 0; k < splits; ++k) sum += p.partials[k * count + e];
    p.y[m * p.ldy + n] = CudaStore<T>::from(sum + (p.bias ? to_acc(p.bias[n]) : 0.f));
  }
}

template <class T, int MR>
void launch_typed(const GemvParams<T>& params, const GemvPlan& plan, cudaStream_t stream) {
  const dim3 grid(plan.n_blocks, plan.splits);
  quant_gemv_kernel<T, MR><<<grid, kThreads, 0, stream>>>(params);
  FL_CUDA_CHECK_LAUNCH(quant_gemv_kernel);
  if (plan.splits > 1) {
    const int64_t count = int64_t(params.rows) * params.n_rows;
    const int blocks = static_cast<int>(std::min<int64_t>((count + 255) / 256, 4096));
    gemv_reduce_kernel<T><<<blocks, 256, 0, stream>>>(params, plan.splits);
    FL_CUDA_CHECK_LAUNCH(gemv_reduce_kernel);
  }
}

template <class T>
void launch_dtype(const MatmulProblem& p, const GemvPlan& plan, void* workspace, cudaStream_t stream) {
  const PackedWeight& w = p.weight;
  GemvParams<T> params;
  params.x = static_cast<const T*>(p.x);
  params.ldx = p.ldx;
  params.rows = static_cast<int>(p.rows);
  params.cols = w.shape.cols;
  params.main = reinterpret_cast<const uint4*>(w.main);
  params.side = reinterpret_cast<const uint4*>(w.side);
  params.side_index = w.side_index;
  params.scales = static_cast<const T*>(w.scales);
  params.zeros = w.zeros;
  params.rows_padded = w.shape.rows_padded;
  params.n_rows = w.shape.rows;
  params.k_words = w.shape.k_words;
  params.side_k_words = w.shape.side_k_words;
  params.group_shift = 0;
  while ((int64_t(1) << params.group_shift) < w.shape.words_per_group()) ++params.group_shift;
  params.group_words = 1 << params.group_shift;
  params.chunk_words = plan.chunk_words;
  params.y = static_cast<T*>(p.y);
  params.ldy = p.ldy;
  params.bias = static_cast<const T*>(p.bias);
  params.partials = static_cast<float*>(workspace);
  for (int i = 0; i < 5; ++i) params.dequant.magic[i] = magic_bits(2 * i);
  params.dequant.low_planes = 0x33333333u;
  switch (plan.row_tile) {
    case 1: return launch_typed<T, 1>(params, plan, stream);
    case 2: return launch_typed<T, 2>(params, plan, stream);
    case 4: return launch_typed<T, 4>(params, plan, stream);
    default: return launch_typed<T, 8>(params, plan, stream);
  }
}

}  // namespace

bool gemv_selected(int64_t rows) {
  // Tuning knob for benchmarks and tests: FASTLOSS_QUANT_KERNEL=mma keeps every batch on the
  // tensor-core kernel, =gemv sends every batch the GEMV can take (1..8 rows) to it.
  const char* forced = std::getenv("FASTLOSS_QUANT_KERNEL");
  if (forced && std::strcmp(forced, "mma") == 0) return false;
  return rows >= 1 && rows <= kGemvMaxRows;
}

// n_blocks CTAs of rows_per_cta rows along N; along K as many splits as bring the grid to about four CTAs
// per SM (several resident CTAs per SM keep the loads of one in flight while another computes),
// with chunks of 8 to 32 K-words, whole groups where a group fits.
GemvPlan plan_gemv(int64_t rows, const PackedShape& s, int device) {
  GemvPlan plan;
  plan.row_tile = rows <= 1 ? 1 : rows <= 2 ? 2 : rows <= 4 ? 4 : 8;
  const int block_rows = rows_per_cta(plan.row_tile == 1 ? slots_for<1>() : slots_for<2>());
  plan.n_blocks = static_cast<int>((s.rows_padded + block_rows - 1) / block_rows);
  const int64_t target = int64_t(cuda_sm_count(device)) * 4;
  int64_t splits = std::max<int64_t>(1, (target + plan.n_blocks - 1) / plan.n_blocks);
  splits = std::min<int64_t>(splits, std::max<int64_t>(1, s.k_words / kMinChunkWords));
  if (const char* forced = std::getenv("FASTLOSS_QUANT_SPLITS")) splits = std::max<int64_t>(1, std::atoll(forced));
  int64_t chunk = (s.k_words + splits - 1) / splits;
  const int64_t words_per_group = s.words_per_group();
  if (words_per_group <= kMaxChunkWords && chunk > words_per_group) {
    chunk = (chunk + words_per_group - 1) / words_per_group * words_per_group;
  }
  chunk = std::max<int64_t>(1, std::min<int64_t>(chunk, kMaxChunkWords));
  FL_CHECK_ARG(s.groups * s.rows_padded < (int64_t(1) << 32), "fastloss.quant.matmul",
               ": the GEMV indexes scales in 32 bits; got ", s.groups, " x ", s.rows_padded, " of them");
  FL_CHECK_ARG(s.rows_padded * s.side_k_words < (int64_t(1) << 31), "fastloss.quant.matmul",
               ": the GEMV indexes side words in 32 bits; got ", s.rows_padded, " x ", s.side_k_words, " of them");
  plan.chunk_words = static_cast<int>(chunk);
  plan.splits = static_cast<int>((s.k_words + chunk - 1) / chunk);
  plan.workspace_bytes = plan.splits > 1 ? int64_t(plan.splits) * rows * s.rows * int64_t(sizeof(float)) : 0;
  return plan;
}

void launch_gemv(const MatmulProblem& p, const GemvPlan& plan, void* workspace, cudaStream_t stream) {
  if (p.dtype == DType::Float16) {
    launch_dtype<__half>(p, plan, workspace, stream);
  } else {
    launch_dtype<__nv_bfloat16>(p, plan, workspace, stream);
  }
}

}  // namespace quant
}  // namespace fl
