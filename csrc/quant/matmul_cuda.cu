// CUDA y = x W^T + bias on the packed mixed 2/4-bit weight: tensor-core mma.m16n8k16 with
// the dequantization in registers while a cp.async pipeline streams the next tiles.
//
// Batches of 1-8 rows of x go to the CUDA-core GEMV of gemv_cuda.cu instead (plan_launch): on
// the H100 this kernel measured ~6.8 thread instructions per weight at batch 1 (index
// arithmetic, copies, per-group scaling), the GEMV's main loop is ~1.8-2.0 plus 0.5 per row of
// x (scripts/sass_budget.py). Here the weight's B fragments come straight out of a packed word
// (packed_layout.h puts each thread's four codes of a 16-column chunk where one shift and one
// LOP3 turn them into an fp16/bf16 pair), so the dequantization is paid once whatever M is and
// the sums run in float32 on the tensor cores.
//
// Asynchronous dequantization: while a warp dequantizes and multiplies stage i, cp.async has
// stages i+1 .. i+STAGES-1 in flight: packed words, the 4-bit side words of the 4-bit
// K-blocks, the x tile and the scales and zero points, so no load waits on the ALU.
//
// Each group's products accumulate unscaled ((q - z) * x is exact in the MMA) and are
// scaled once per group and output column in float32, so the result is x W^T with W the
// exact (q - z) * s before any rounding: the CPU kernel computes the same sum.
//
// Work split (stream-K): the units (m block of 16-64 rows of x, row block of 64 rows of W,
// K-tile) are cut into one contiguous range per resident CTA; 4 warps per CTA, each owning two
// 8-row word tiles. A row block finished inside one CTA is written to y with its bias; the
// CTAs sharing a row block leave float32 partial sums that fixup_kernel adds in CTA order
// (deterministic: no atomics).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <vector>

#include "common/cuda_async_copy.cuh"
#include "common/cuda_check.cuh"
#include "common/cuda_numeric.cuh"
#include "quant/gemv_cuda.h"
#include "quant/quant_kernels.h"

namespace fl {
namespace quant {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kBlockRows = 64;  // rows of W per CTA: 8 word tiles, 2 per warp
constexpr int kTilesPerWarp = 2;
#ifndef FASTLOSS_QUANT_STAGES
#define FASTLOSS_QUANT_STAGES 4  // pipeline depth; overridable at build time for tuning
#endif
constexpr int kStages = FASTLOSS_QUANT_STAGES;

// The fp16 / bf16 specifics: the exponent bits that make (magic | q) the float magic + q,
// and the MMA instruction.
template <class T>
struct Element;

template <>
struct Element<__half> {
  using Pair = __half2;
  static constexpr uint32_t kMagic = 0x64006400u;  // 1024.0 in both halves: 1024 + q is exact for q < 1024
  __device__ __forceinline__ static void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct Element<__nv_bfloat16> {
  using Pair = __nv_bfloat162;
  static constexpr uint32_t kMagic = 0x43004300u;  // 128.0: 128 + q is exact for q < 128
  __device__ __forceinline__ static void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <class Pair>
__device__ __forceinline__ Pair as_pair(uint32_t bits) {
  return *reinterpret_cast<Pair*>(&bits);
}
template <class Pair>
__device__ __forceinline__ uint32_t as_bits(Pair pair) {
  return *reinterpret_cast<uint32_t*>(&pair);
}

// The two planes at `shift` and 16 + `shift` as the pair (magic + p0, magic + p1): one LOP3.
template <class T>
__device__ __forceinline__ uint32_t magic_pair(uint32_t word, int shift) {
  return ((word >> shift) & 0x00030003u) | Element<T>::kMagic;
}

// B-fragment register of a 2-bit K-block: (q - z) for two weights, exact.
template <class T>
__device__ __forceinline__ uint32_t fragment_2bit(uint32_t low, int shift, uint32_t magic_zero) {
  using Pair = typename Element<T>::Pair;
  return as_bits(__hsub2(as_pair<Pair>(magic_pair<T>(low, shift)), as_pair<Pair>(magic_zero)));
}

// 4-bit: q = low + 4 * high; every intermediate is a small integer, so exact in fp16 and bf16.
template <class T>
__device__ __forceinline__ uint32_t fragment_4bit(uint32_t low, uint32_t high, int shift, uint32_t magic_zero) {
  using Pair = typename Element<T>::Pair;
  const Pair high_value = __hsub2(as_pair<Pair>(magic_pair<T>(high, shift)), as_pair<Pair>(Element<T>::kMagic));
  const Pair four = as_pair<Pair>(Element<T>::kMagic == 0x64006400u ? 0x44004400u : 0x40804080u);  // 4.0
  const Pair code = __hfma2(high_value, four, as_pair<Pair>(magic_pair<T>(low, shift)));
  return as_bits(__hsub2(code, as_pair<Pair>(magic_zero)));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&a)[4], const void* smem) {
  const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3])
               : "r"(address));
}

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
__device__ __forceinline__ int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

template <class T>
struct Params {
  const T* x;
  int64_t ldx;
  int64_t rows;  // M
  int64_t cols;  // K
  const uint32_t* main;
  const uint32_t* side;
  const int32_t* side_index;
  const T* scales;
  const uint8_t* zeros;
  int64_t rows_padded;
  int64_t n_rows;  // N
  int64_t k_words;
  int64_t side_k_words;
  int group_shift;  // log2(words per group): groups are powers of two, so no integer division
  T* y;
  int64_t ldy;
  const T* bias;
  // Stream-K work split: the units (m block, row block, K-tile) in that order, cut into
  // gridDim.x equal contiguous ranges, one per CTA.
  int m_blocks;
  int n_blocks;
  int k_tiles;
  int64_t units;
  float* partials;  // [gridDim.x][2][16 * MF][64]: the CTA's partial first and last row blocks
};

// First unit of CTA c's range.
__host__ __device__ __forceinline__ int64_t range_start(int64_t units, int ctas, int64_t c) {
  return c * units / ctas;
}

// The shared memory of one pipeline stage; m_rows = 16 * MF rows of x, BK columns.
template <int MF, int BK>
struct StageLayout {
  static constexpr int kWordsPerStage = BK / kWordCols;
  static constexpr int kMRows = 16 * MF;
  static constexpr int kMainBytes = (kBlockRows / kTileRows) * kWordsPerStage * kLanes * 4;
  static constexpr int kXBytes = kMRows * BK * 2;
  static constexpr int kScaleBytes = kWordsPerStage * kBlockRows * 2;  // at most one group per word
  static constexpr int kZeroBytes = kWordsPerStage * kBlockRows;
  static constexpr int kMainOffset = 0;
  static constexpr int kSideOffset = kMainOffset + kMainBytes;
  static constexpr int kXOffset = kSideOffset + kMainBytes;
  static constexpr int kScaleOffset = kXOffset + kXBytes;
  static constexpr int kZeroOffset = kScaleOffset + kScaleBytes;
  static constexpr int kFlagOffset = kZeroOffset + kZeroBytes;  // per word: 1 if its K-block is 4-bit
  static constexpr int kFlagBytes = 16;
  static constexpr int kBytes = kFlagOffset + kFlagBytes;
  static constexpr int kTotalBytes = kBytes * kStages;
  static_assert(kWordsPerStage * 4 <= kFlagBytes, "one int flag per word of a stage");
  static_assert(kBytes % 16 == 0, "every part of a stage is a multiple of 16 bytes, for cp.async");
};

// Where a unit sits: m block, row block and K-tile. The kernel steps through its range with
// next() instead of dividing (64-bit division is a long instruction sequence on the GPU).
struct Unit {
  int mb, nb, kt;
  __device__ __forceinline__ void next(int n_blocks, int k_tiles) {
    if (++kt == k_tiles) {
      kt = 0;
      if (++nb == n_blocks) {
        nb = 0;
        ++mb;
      }
    }
  }
};
__device__ __forceinline__ Unit unit_at(int64_t u, int n_blocks, int k_tiles) {
  const int64_t per_m = int64_t(n_blocks) * k_tiles;
  const int64_t rest = u % per_m;
  return Unit{static_cast<int>(u / per_m), static_cast<int>(rest / k_tiles), static_cast<int>(rest % k_tiles)};
}

// Stream-K: each CTA walks its range of units with one cp.async pipeline that runs on across
// row-block boundaries, so no CTA pays a pipeline fill per short slice and the grid is exactly
// the resident CTAs (no tail wave). A row block whose K-tiles all fall in one CTA is written
// to y directly; the others leave partial sums that fixup_kernel adds in a fixed order.
template <class T, int MF, int BK>
__global__ void __launch_bounds__(kThreads) quant_mma_kernel(Params<T> p) {
  using L = StageLayout<MF, BK>;
  constexpr int WPS = L::kWordsPerStage;
  extern __shared__ __align__(16) unsigned char smem[];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, tid = threadIdx.x;
  const int64_t u_begin = range_start(p.units, gridDim.x, blockIdx.x);
  const int64_t u_end = range_start(p.units, gridDim.x, blockIdx.x + 1);
  const int shift = p.group_shift;
  const int wpg_mask = (1 << shift) - 1;
  // With one m block the dead rows of x (beyond M) are zeroed once; with several, every stage
  // zero-fills the dead rows of its own m block.
  const bool one_m_block = p.m_blocks == 1;
  const int rows_single = static_cast<int>(min64(L::kMRows, p.rows));

  auto stage_ptr = [&](int stage, int offset) { return smem + stage * L::kBytes + offset; };

  if (one_m_block) {
    for (int i = tid; i < kStages * L::kMRows * (BK / 8); i += kThreads) {
      const int stage = i / (L::kMRows * (BK / 8));
      const int rest = i % (L::kMRows * (BK / 8));
      const int r = rest / (BK / 8);
      if (r >= rows_single) {
        *reinterpret_cast<uint4*>(stage_ptr(stage, L::kXOffset) + (r * BK + (rest % (BK / 8)) * 8) * 2) =
            make_uint4(0, 0, 0, 0);
      }
    }
  }

  auto load_stage = [&](int stage, const Unit& at) {
    const int64_t tile_base = int64_t(at.nb) * (kBlockRows / kTileRows);
    const int64_t m_base = int64_t(at.mb) * L::kMRows;
    const int kw0 = at.kt * WPS;
    const int nw = static_cast<int>(min64(WPS, p.k_words - kw0));
    if (tid < WPS) {  // which words are 4-bit, for compute_stage
      reinterpret_cast<int*>(stage_ptr(stage, L::kFlagOffset))[tid] =
          tid < nw ? int(__ldg(p.side_index + ((kw0 + tid) >> shift)) >= 0) : 0;
    }
    // packed words: 8 tiles x nw words x 8 chunks of 16 bytes
    for (int i = tid; i < (kBlockRows / kTileRows) * WPS * 8; i += kThreads) {
      const int tile = i / (WPS * 8), w = (i / 8) % WPS, chunk = i % 8;
      if (w >= nw) continue;
      const int kw = kw0 + w;
      const uint32_t* src = p.main + ((tile_base + tile) * p.k_words + kw) * kLanes + chunk * 4;
      cp_async16(stage_ptr(stage, L::kMainOffset) + ((tile * WPS + w) * kLanes + chunk * 4) * 4, src, 16);
      const int32_t rank = __ldg(p.side_index + (kw >> shift));
      if (rank >= 0) {
        const uint32_t* side_src =
            p.side + ((tile_base + tile) * p.side_k_words + (int64_t(rank) << shift) + (kw & wpg_mask)) * kLanes +
            chunk * 4;
        cp_async16(stage_ptr(stage, L::kSideOffset) + ((tile * WPS + w) * kLanes + chunk * 4) * 4, side_src, 16);
      }
    }
    // x: the live rows (and, with several m blocks, zero-filled dead rows), zero past column K
    const int x_rows = one_m_block ? rows_single : L::kMRows;
    for (int i = tid; i < x_rows * (BK / 8); i += kThreads) {
      const int r = i / (BK / 8), chunk = i % (BK / 8);
      if (chunk >= nw * 8) continue;
      const int64_t k = int64_t(kw0) * kWordCols + chunk * 8;
      const bool live = m_base + r < p.rows;
      const int valid = live ? static_cast<int>(max64(0, min64(16, (p.cols - k) * 2))) : 0;
      const T* src = valid > 0 ? p.x + (m_base + r) * p.ldx + k : p.x;
      cp_async16(stage_ptr(stage, L::kXOffset) + (r * BK + ((chunk ^ (r & 7)) * 8)) * 2, src, valid);
    }
    // scales and zero points of the groups this stage touches
    const int g0 = kw0 >> shift;
    const int groups = ((kw0 + nw - 1) >> shift) - g0 + 1;
    const int64_t block_row = int64_t(at.nb) * kBlockRows;
    for (int i = tid; i < groups * 12; i += kThreads) {
      const int gi = i / 12, part = i % 12;
      const int64_t row0 = int64_t(g0 + gi) * p.rows_padded + block_row;
      if (part < 8) {
        cp_async16(stage_ptr(stage, L::kScaleOffset) + (gi * kBlockRows + part * 8) * 2, p.scales + row0 + part * 8, 16);
      } else {
        cp_async16(stage_ptr(stage, L::kZeroOffset) + gi * kBlockRows + (part - 8) * 16, p.zeros + row0 + (part - 8) * 16,
                   16);
      }
    }
  };

  float total[MF][kTilesPerWarp][4];
  float partial[MF][kTilesPerWarp][4];
#pragma unroll
  for (int mf = 0; mf < MF; ++mf)
#pragma unroll
    for (int j = 0; j < kTilesPerWarp; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) total[mf][j][e] = partial[mf][j][e] = 0.f;
  uint32_t magic_zero[kTilesPerWarp] = {0, 0};

  const int a_row = (lane & 7) + ((lane >> 3) & 1) * 8;  // ldmatrix: the row this lane addresses
  const int a_chunk = lane >> 4;                         // and its 8-column half of the 16
  const int t = lane & 3, r = lane >> 2;

  // seg_first / seg_last: the unit opens / closes this CTA's stretch of its row block.
  auto compute_stage = [&](int stage, const Unit& at, bool seg_first, bool seg_last) {
    const int kw0 = at.kt * WPS;
    const int nw = static_cast<int>(min64(WPS, p.k_words - kw0));
    const int g0 = kw0 >> shift;
    const uint32_t* main_s = reinterpret_cast<const uint32_t*>(stage_ptr(stage, L::kMainOffset));
    const uint32_t* side_s = reinterpret_cast<const uint32_t*>(stage_ptr(stage, L::kSideOffset));
    const T* x_s = reinterpret_cast<const T*>(stage_ptr(stage, L::kXOffset));
    const T* scale_s = reinterpret_cast<const T*>(stage_ptr(stage, L::kScaleOffset));
    const uint8_t* zero_s = stage_ptr(stage, L::kZeroOffset);
    const int* flag_s = reinterpret_cast<const int*>(stage_ptr(stage, L::kFlagOffset));
#pragma unroll
    for (int w = 0; w < WPS; ++w) {
      if (w >= nw) continue;  // only the last K-tile is short; continue keeps the loop unrollable
      const int kw = kw0 + w;
      const int slot = (kw >> shift) - g0;
      if ((w == 0 && seg_first) || (kw & wpg_mask) == 0) {  // a group starts: its zero points, as magic + z
#pragma unroll
        for (int j = 0; j < kTilesPerWarp; ++j) {
          const uint32_t z = zero_s[slot * kBlockRows + warp * 16 + j * 8 + r];
          magic_zero[j] = Element<T>::kMagic | z | (z << 16);
        }
      }
      const bool four_bit = flag_s[w] != 0;
      uint32_t low[kTilesPerWarp], high[kTilesPerWarp];
#pragma unroll
      for (int j = 0; j < kTilesPerWarp; ++j) {
        const int at_word = ((warp * kTilesPerWarp + j) * WPS + w) * kLanes + lane;
        low[j] = main_s[at_word];
        high[j] = four_bit ? side_s[at_word] : 0u;
      }
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        uint32_t a[MF][4];
#pragma unroll
        for (int mf = 0; mf < MF; ++mf) {
          const int row = mf * 16 + a_row;
          const int chunk = w * 8 + 2 * c + a_chunk;
          ldmatrix_x4(a[mf], x_s + row * BK + ((chunk ^ (row & 7)) * 8));
        }
#pragma unroll
        for (int j = 0; j < kTilesPerWarp; ++j) {
          uint32_t b0, b1;
          if (four_bit) {
            b0 = fragment_4bit<T>(low[j], high[j], 4 * c, magic_zero[j]);
            b1 = fragment_4bit<T>(low[j], high[j], 4 * c + 2, magic_zero[j]);
          } else {
            b0 = fragment_2bit<T>(low[j], 4 * c, magic_zero[j]);
            b1 = fragment_2bit<T>(low[j], 4 * c + 2, magic_zero[j]);
          }
#pragma unroll
          for (int mf = 0; mf < MF; ++mf) Element<T>::mma(partial[mf][j], a[mf], b0, b1);
        }
      }
      if (((kw + 1) & wpg_mask) == 0 || (w == nw - 1 && seg_last)) {  // a group ends: scale its sums once
#pragma unroll
        for (int j = 0; j < kTilesPerWarp; ++j) {
          const int col = slot * kBlockRows + warp * 16 + j * 8 + 2 * t;
          const float s0 = to_acc(scale_s[col]), s1 = to_acc(scale_s[col + 1]);
#pragma unroll
          for (int mf = 0; mf < MF; ++mf) {
            total[mf][j][0] += s0 * partial[mf][j][0];
            total[mf][j][1] += s1 * partial[mf][j][1];
            total[mf][j][2] += s0 * partial[mf][j][2];
            total[mf][j][3] += s1 * partial[mf][j][3];
#pragma unroll
            for (int e = 0; e < 4; ++e) partial[mf][j][e] = 0.f;
          }
        }
      }
    }
  };

  // A closed stretch: the whole row block goes to y (bias added), a part of it to this CTA's
  // partial slot (0 if the stretch holds the range's first unit, else 1).
  auto finish_block = [&](const Unit& at, bool whole, int slot) {
#pragma unroll
    for (int mf = 0; mf < MF; ++mf) {
#pragma unroll
      for (int j = 0; j < kTilesPerWarp; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int m_local = mf * 16 + r + (e >= 2 ? 8 : 0);
          const int n_local = warp * 16 + j * 8 + 2 * t + (e & 1);
          if (whole) {
            const int64_t m = int64_t(at.mb) * L::kMRows + m_local, n = int64_t(at.nb) * kBlockRows + n_local;
            if (m < p.rows && n < p.n_rows) {
              const float b = p.bias ? to_acc(p.bias[n]) : 0.f;
              p.y[m * p.ldy + n] = CudaStore<T>::from(total[mf][j][e] + b);
            }
          } else {
            p.partials[((int64_t(blockIdx.x) * 2 + slot) * L::kMRows + m_local) * kBlockRows + n_local] =
                total[mf][j][e];
          }
          total[mf][j][e] = 0.f;
        }
      }
    }
  };

  const int64_t count = u_end - u_begin;
  Unit loading = unit_at(u_begin, p.n_blocks, p.k_tiles);  // the unit the next load_stage fetches
  Unit at = loading;                                       // the unit the next compute_stage uses
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < count) {
      load_stage(s, loading);
      loading.next(p.n_blocks, p.k_tiles);
    }
    cp_async_commit();
  }
  int64_t stretch_start = u_begin;
  int stage = 0, load_stage_index = kStages - 1;
  for (int64_t i = 0; i < count; ++i) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    if (i + kStages - 1 < count) {
      load_stage(load_stage_index, loading);
      loading.next(p.n_blocks, p.k_tiles);
    }
    load_stage_index = load_stage_index + 1 == kStages ? 0 : load_stage_index + 1;
    cp_async_commit();
    const int64_t u = u_begin + i;
    const bool seg_first = u == u_begin || at.kt == 0;
    const bool seg_last = u + 1 == u_end || at.kt == p.k_tiles - 1;
    if (seg_first) stretch_start = u;
    compute_stage(stage, at, seg_first, seg_last);
    if (seg_last) {
      const bool whole = at.kt == p.k_tiles - 1 && u - stretch_start == p.k_tiles - 1;
      finish_block(at, whole, stretch_start == u_begin ? 0 : 1);
    }
    stage = stage + 1 == kStages ? 0 : stage + 1;
    at.next(p.n_blocks, p.k_tiles);
  }
  cp_async_wait<0>();
}

// y for the row blocks that were split across CTAs: the CTAs' partial sums in CTA order, plus
// the bias. Blocks that one CTA finished are skipped (already in y).
template <class T, int MF>
__global__ void fixup_kernel(Params<T> p, int ctas) {
  constexpr int kMRows = 16 * MF;
  const int64_t block = blockIdx.x;  // m block * n_blocks + row block
  const int64_t ub = block * p.k_tiles, ue = ub + p.k_tiles;
  // the CTAs whose ranges hold the block's first and last units
  int64_t first = ub * ctas / p.units;
  while (first + 1 < ctas && range_start(p.units, ctas, first + 1) <= ub) ++first;
  while (first > 0 && range_start(p.units, ctas, first) > ub) --first;
  int64_t last = first;
  while (last + 1 < ctas && range_start(p.units, ctas, last + 1) < ue) ++last;
  if (first == last) return;
  const int64_t mb = block / p.n_blocks, nb = block % p.n_blocks;
  for (int i = threadIdx.x; i < kMRows * kBlockRows; i += blockDim.x) {
    const int m_local = i / kBlockRows, n_local = i % kBlockRows;
    const int64_t m = mb * kMRows + m_local, n = nb * kBlockRows + n_local;
    if (m >= p.rows || n >= p.n_rows) continue;
    float sum = p.bias ? to_acc(p.bias[n]) : 0.f;
    for (int64_t c = first; c <= last; ++c) {
      const int64_t start = range_start(p.units, ctas, c);
      if (range_start(p.units, ctas, c + 1) == start) continue;  // an empty range
      const int slot = (start >= ub && start < ue) ? 0 : 1;
      sum += p.partials[((c * 2 + slot) * kMRows + m_local) * kBlockRows + n_local];
    }
    p.y[m * p.ldy + n] = CudaStore<T>::from(sum);
  }
}

// ---- launch configuration -------------------------------------------------
struct LaunchPlan {
  bool gemv = false;  // 1-8 rows of x: the CUDA-core GEMV of gemv_cuda.cu (then only `gemv` below counts)
  GemvPlan gemv_plan;
  int mf;  // m-fragments per CTA (16 rows of x each)
  int bk;  // columns per pipeline stage
  int m_blocks;
  int n_blocks;
  int k_tiles;
  int64_t units;
  int ctas;
  int64_t workspace_bytes;
};

template <int MF, int BK>
const void* kernel_for(DType dtype) {
  if (dtype == DType::Float16) return reinterpret_cast<const void*>(&quant_mma_kernel<__half, MF, BK>);
  return reinterpret_cast<const void*>(&quant_mma_kernel<__nv_bfloat16, MF, BK>);
}

// CTAs of one configuration that fit on an SM, cached per (device, configuration).
int resident_ctas(int device, int mf, const void* kernel, int smem_bytes) {
  static std::mutex mutex;
  static std::vector<int> cache;  // [device * 3 + mf index]
  const int index = device * 3 + (mf == 1 ? 0 : mf == 2 ? 1 : 2);
  std::lock_guard<std::mutex> lock(mutex);
  if (static_cast<size_t>(index) >= cache.size()) cache.resize(index + 1, 0);
  if (cache[index] == 0) {
    FL_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes));
    int blocks = 0;
    FL_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, smem_bytes));
    cache[index] = std::max(blocks, 1);
  }
  return cache[index];
}

// One CTA per resident slot (never more than there are units), each with an equal share of the
// units: the work is spread evenly whatever the row-block count.
// Batches of 1-8 rows go to the GEMV. The cutoff by instruction count (scripts/sass_budget.py,
// pure 2-bit at g = 128, thread instructions per weight of the main loop): GEMV 1.91 (1 row), 2.63
// (2), 3.92 (4), 6.59 (5-8, the 8-row kernel) against ~6.8 for this kernel at batch 1 (measured on
// the H100; its per-weight cost does not grow up to 16 rows). The 8-row GEMV is only ~3% below, so
// the 5-8 crossover is marginal and is for a GPU run to confirm (bench "fastloss 2-bit mma"). The
// tuning knob FASTLOSS_QUANT_KERNEL=mma|gemv overrides the choice (gemv_selected).
LaunchPlan plan_launch(int64_t rows, const PackedShape& s, int device) {
  LaunchPlan plan;
  if (gemv_selected(rows)) {
    plan.gemv = true;
    plan.gemv_plan = plan_gemv(rows, s, device);
    plan.workspace_bytes = plan.gemv_plan.workspace_bytes;
    return plan;
  }
  plan.mf = rows <= 16 ? 1 : rows <= 32 ? 2 : 4;
  plan.bk = plan.mf == 4 ? 128 : 256;
  int smem = 0;
  const void* kernel = nullptr;
  if (plan.mf == 1) {
    smem = StageLayout<1, 256>::kTotalBytes;
    kernel = kernel_for<1, 256>(DType::Float16);
  } else if (plan.mf == 2) {
    smem = StageLayout<2, 256>::kTotalBytes;
    kernel = kernel_for<2, 256>(DType::Float16);
  } else {
    smem = StageLayout<4, 128>::kTotalBytes;
    kernel = kernel_for<4, 128>(DType::Float16);
  }
  const int64_t slots = int64_t(cuda_sm_count(device)) * resident_ctas(device, plan.mf, kernel, smem);
  plan.m_blocks = static_cast<int>((rows + 16 * plan.mf - 1) / (16 * plan.mf));
  plan.n_blocks = static_cast<int>(s.rows_padded / kBlockRows);
  const int words_per_tile = plan.bk / kWordCols;
  plan.k_tiles = static_cast<int>((s.k_words + words_per_tile - 1) / words_per_tile);
  plan.units = int64_t(plan.m_blocks) * plan.n_blocks * plan.k_tiles;
  plan.ctas = static_cast<int>(std::min<int64_t>(slots, plan.units));
  // Tuning knob for benchmarks: FASTLOSS_QUANT_CTAS=n launches n CTAs (clamped to the units).
  if (const char* forced = std::getenv("FASTLOSS_QUANT_CTAS")) {
    plan.ctas = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(std::atoll(forced), plan.units)));
  }
  plan.workspace_bytes = int64_t(plan.ctas) * 2 * 16 * plan.mf * kBlockRows * int64_t(sizeof(float));
  return plan;
}

template <class T, int MF, int BK>
void launch(const Params<T>& params, const LaunchPlan& plan, cudaStream_t stream) {
  constexpr int smem = StageLayout<MF, BK>::kTotalBytes;
  FL_CUDA_CHECK(cudaFuncSetAttribute(quant_mma_kernel<T, MF, BK>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  quant_mma_kernel<T, MF, BK><<<plan.ctas, kThreads, smem, stream>>>(params);
  FL_CUDA_CHECK_LAUNCH(quant_mma_kernel);
  // Blocks split across CTAs exist unless every CTA's range is whole row blocks.
  if (plan.units % plan.ctas != 0 || (plan.units / plan.ctas) % plan.k_tiles != 0) {
    fixup_kernel<T, MF><<<plan.m_blocks * plan.n_blocks, 256, 0, stream>>>(params, plan.ctas);
    FL_CUDA_CHECK_LAUNCH(fixup_kernel);
  }
}

template <class T>
void matmul_typed(const MatmulProblem& p, const LaunchPlan& plan, void* workspace, cudaStream_t stream) {
  const PackedWeight& w = p.weight;
  Params<T> params;
  params.x = static_cast<const T*>(p.x);
  params.ldx = p.ldx;
  params.rows = p.rows;
  params.cols = w.shape.cols;
  params.main = w.main;
  params.side = w.side;
  params.side_index = w.side_index;
  params.scales = static_cast<const T*>(w.scales);
  params.zeros = w.zeros;
  params.rows_padded = w.shape.rows_padded;
  params.n_rows = w.shape.rows;
  params.k_words = w.shape.k_words;
  params.side_k_words = w.shape.side_k_words;
  params.group_shift = 0;
  while ((int64_t(1) << params.group_shift) < w.shape.words_per_group()) ++params.group_shift;
  params.y = static_cast<T*>(p.y);
  params.ldy = p.ldy;
  params.bias = static_cast<const T*>(p.bias);
  params.m_blocks = plan.m_blocks;
  params.n_blocks = plan.n_blocks;
  params.k_tiles = plan.k_tiles;
  params.units = plan.units;
  params.partials = static_cast<float*>(workspace);
  if (plan.mf == 1) {
    launch<T, 1, 256>(params, plan, stream);
  } else if (plan.mf == 2) {
    launch<T, 2, 256>(params, plan, stream);
  } else {
    launch<T, 4, 128>(params, plan, stream);
  }
}

}  // namespace

int64_t matmul_cuda_workspace_bytes(int64_t rows, const PackedShape& shape, int device) {
  validate_packed_shape(shape, "fastloss.quant.matmul");
  if (rows <= 0) return 0;
  CudaDeviceGuard guard(device);
  return plan_launch(rows, shape, device).workspace_bytes;
}

void matmul_cuda(const MatmulProblem& p, void* workspace, int64_t workspace_bytes, int device, cudaStream_t stream) {
  validate_matmul(p, /*cuda=*/true);
  if (p.rows == 0) return;
  CudaDeviceGuard guard(device);
  const LaunchPlan plan = plan_launch(p.rows, p.weight.shape, device);
  FL_CHECK_ARG(workspace_bytes >= plan.workspace_bytes, p.op_name, ": workspace of ", workspace_bytes,
               " bytes, the launch needs ", plan.workspace_bytes, " (matmul_cuda_workspace_bytes)");
  if (plan.gemv) return launch_gemv(p, plan.gemv_plan, workspace, stream);
  if (p.dtype == DType::Float16) {
    matmul_typed<__half>(p, plan, workspace, stream);
  } else {
    matmul_typed<__nv_bfloat16>(p, plan, workspace, stream);
  }
}

}  // namespace quant
}  // namespace fl
