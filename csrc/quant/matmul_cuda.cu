// CUDA y = x W^T + bias on the packed mixed 2/4-bit weight: tensor-core mma.m16n8k16 with
// the dequantization in registers while a cp.async pipeline streams the next tiles.
//
// Why tensor cores even for one row of x: the weight's B fragments come straight out of a
// packed word (packed_layout.h puts each thread's four codes of a 16-column chunk where one
// shift and one LOP3 turn them into an fp16/bf16 pair), so the per-weight cost is the same
// 1.5 instructions whatever M is, and the sums run in float32 on the tensor cores. A
// CUDA-core GEMV would spend its ALU budget (about 2.8 instructions per weight at HBM rate
// on an H100) on the FMAs and the float32 conversions instead.
//
// Asynchronous dequantization: while a warp dequantizes and multiplies stage i, cp.async has
// stages i+1 .. i+STAGES-1 in flight: packed words, the 4-bit side words of the 4-bit
// K-blocks, the x tile and the scales and zero points, so no load waits on the ALU.
//
// Each group's products accumulate unscaled ((q - z) * x is exact in the MMA) and are
// scaled once per group and output column in float32, so the result is x W^T with W the
// exact (q - z) * s before any rounding: the CPU kernel computes the same sum.
//
// Grid: (N_pad / 64 row blocks, split-K slices, M blocks); 4 warps per CTA, each warp owns
// two 8-row word tiles. Split-K partial sums go to a float32 workspace and a second kernel
// adds them (deterministic: no atomics); with one slice the epilogue writes y directly.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <vector>

#include "common/cuda_check.cuh"
#include "common/cuda_numeric.cuh"
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

__device__ __forceinline__ void cp_async16(void* smem, const void* global, int valid_bytes) {
  const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(global), "r"(valid_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int Pending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending));
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
  float* workspace;  // [splits][M][N_pad] when splits > 1
  int splits;
  int tiles_per_split;  // K-tiles of one split-K slice
};

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
  static constexpr int kBytes = kZeroOffset + kZeroBytes;  // multiple of 16: every part is
  static constexpr int kTotalBytes = kBytes * kStages;
};

template <class T, int MF, int BK>
__global__ void __launch_bounds__(kThreads) quant_mma_kernel(Params<T> p) {
  using L = StageLayout<MF, BK>;
  constexpr int WPS = L::kWordsPerStage;
  extern __shared__ __align__(16) unsigned char smem[];

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, tid = threadIdx.x;
  const int64_t block_row = int64_t(blockIdx.x) * kBlockRows;     // first row of W
  const int64_t tile_base = block_row / kTileRows;                 // first word tile row
  const int64_t m_base = int64_t(blockIdx.z) * L::kMRows;          // first row of x
  const int m_live = static_cast<int>(min64(L::kMRows, p.rows - m_base));
  const int k_tiles = static_cast<int>((p.k_words + WPS - 1) / WPS);
  const int kt_begin = blockIdx.y * p.tiles_per_split;
  const int kt_end = min(k_tiles, kt_begin + p.tiles_per_split);
  const int kw_begin = kt_begin * WPS;
  const int kw_end = static_cast<int>(min64(p.k_words, int64_t(kt_end) * WPS));
  const int shift = p.group_shift;
  const int wpg_mask = (1 << shift) - 1;

  auto stage_ptr = [&](int stage, int offset) { return smem + stage * L::kBytes + offset; };

  // Rows of x beyond M are zero in every stage, once: the pipeline then copies live rows only.
  for (int i = tid; i < kStages * L::kMRows * (BK / 8); i += kThreads) {
    const int stage = i / (L::kMRows * (BK / 8));
    const int rest = i % (L::kMRows * (BK / 8));
    const int r = rest / (BK / 8);
    if (r >= m_live) {
      *reinterpret_cast<uint4*>(stage_ptr(stage, L::kXOffset) + (r * BK + (rest % (BK / 8)) * 8) * 2) =
          make_uint4(0, 0, 0, 0);
    }
  }

  auto load_stage = [&](int stage, int kt) {
    const int kw0 = kt * WPS;
    const int nw = min(WPS, kw_end - kw0);
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
    // x: live rows only, zero-filled past column K
    for (int i = tid; i < m_live * (BK / 8); i += kThreads) {
      const int r = i / (BK / 8), chunk = i % (BK / 8);
      if (chunk >= nw * 8) continue;
      const int64_t k = int64_t(kw0) * kWordCols + chunk * 8;
      const int valid = static_cast<int>(max64(0, min64(16, (p.cols - k) * 2)));
      const T* src = valid > 0 ? p.x + (m_base + r) * p.ldx + k : p.x;
      cp_async16(stage_ptr(stage, L::kXOffset) + (r * BK + ((chunk ^ (r & 7)) * 8)) * 2, src, valid);
    }
    // scales and zero points of the groups this stage touches
    const int g0 = kw0 >> shift;
    const int groups = ((kw0 + nw - 1) >> shift) - g0 + 1;
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

  auto compute_stage = [&](int stage, int kt) {
    const int kw0 = kt * WPS;
    const int nw = min(WPS, kw_end - kw0);
    const int g0 = kw0 >> shift;
    const uint32_t* main_s = reinterpret_cast<const uint32_t*>(stage_ptr(stage, L::kMainOffset));
    const uint32_t* side_s = reinterpret_cast<const uint32_t*>(stage_ptr(stage, L::kSideOffset));
    const T* x_s = reinterpret_cast<const T*>(stage_ptr(stage, L::kXOffset));
    const T* scale_s = reinterpret_cast<const T*>(stage_ptr(stage, L::kScaleOffset));
    const uint8_t* zero_s = stage_ptr(stage, L::kZeroOffset);
#pragma unroll
    for (int w = 0; w < WPS; ++w) {
      if (w >= nw) break;
      const int kw = kw0 + w;
      const int slot = (kw >> shift) - g0;
      if (kw == kw_begin || (kw & wpg_mask) == 0) {  // a group starts: its zero points, as magic + z pairs
#pragma unroll
        for (int j = 0; j < kTilesPerWarp; ++j) {
          const uint32_t z = zero_s[slot * kBlockRows + warp * 16 + j * 8 + r];
          magic_zero[j] = Element<T>::kMagic | z | (z << 16);
        }
      }
      const bool four_bit = __ldg(p.side_index + (kw >> shift)) >= 0;
      uint32_t low[kTilesPerWarp], high[kTilesPerWarp];
#pragma unroll
      for (int j = 0; j < kTilesPerWarp; ++j) {
        const int at = ((warp * kTilesPerWarp + j) * WPS + w) * kLanes + lane;
        low[j] = main_s[at];
        high[j] = four_bit ? side_s[at] : 0u;
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
      if (((kw + 1) & wpg_mask) == 0 || kw + 1 == kw_end) {  // a group ends: scale its sums once
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

  const int tiles = kt_end - kt_begin;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < tiles) load_stage(s, kt_begin + s);
    cp_async_commit();
  }
  for (int i = 0; i < tiles; ++i) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const int next = i + kStages - 1;
    if (next < tiles) load_stage(next % kStages, kt_begin + next);
    cp_async_commit();
    compute_stage(i % kStages, kt_begin + i);
  }
  cp_async_wait<0>();

  // Epilogue: thread (r, t) holds rows r and r + 8 of each m-fragment, columns 2t and 2t + 1.
#pragma unroll
  for (int mf = 0; mf < MF; ++mf) {
#pragma unroll
    for (int j = 0; j < kTilesPerWarp; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t m = m_base + mf * 16 + r + (e >= 2 ? 8 : 0);
        const int64_t n = block_row + warp * 16 + j * 8 + 2 * t + (e & 1);
        if (m >= p.rows) continue;
        if (p.splits == 1) {
          if (n >= p.n_rows) continue;
          const float b = p.bias ? to_acc(p.bias[n]) : 0.f;
          p.y[m * p.ldy + n] = CudaStore<T>::from(total[mf][j][e] + b);
        } else {
          p.workspace[(int64_t(blockIdx.y) * p.rows + m) * p.rows_padded + n] = total[mf][j][e];
        }
      }
    }
  }
}

// y = sum of the split-K slices + bias, in a fixed order.
template <class T>
__global__ void reduce_splits_kernel(Params<T> p) {
  const int64_t count = p.rows * p.n_rows;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t m = i / p.n_rows, n = i % p.n_rows;
    float sum = p.bias ? to_acc(p.bias[n]) : 0.f;
    for (int s = 0; s < p.splits; ++s) sum += p.workspace[(int64_t(s) * p.rows + m) * p.rows_padded + n];
    p.y[m * p.ldy + n] = CudaStore<T>::from(sum);
  }
}

// ---- launch configuration -------------------------------------------------
struct LaunchPlan {
  int mf;          // m-fragments per CTA (16 rows of x each)
  int bk;          // columns per pipeline stage
  int m_blocks;
  int n_blocks;
  int k_tiles;
  int splits;
  int tiles_per_split;
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

// Split K until the grid fills whole waves: a weight with few row blocks (4096 rows make
// 64 CTAs on 132 SMs) would otherwise leave most of the GPU idle.
LaunchPlan plan_launch(int64_t rows, const PackedShape& s, int device) {
  LaunchPlan plan;
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
  const int64_t base = int64_t(plan.m_blocks) * plan.n_blocks;
  double best_score = -1.0;
  plan.splits = 1;
  plan.tiles_per_split = plan.k_tiles;
  for (int want = 1; want <= 16; ++want) {
    const int per = (plan.k_tiles + want - 1) / want;
    if (want > 1 && per < 2) break;  // a slice shorter than the pipeline is all fill and drain
    const int splits = (plan.k_tiles + per - 1) / per;
    const int64_t ctas = base * splits;
    const int64_t waves = (ctas + slots - 1) / slots;
    // Fraction of the GPU's CTA slots in use, with a small charge per extra slice (its
    // pipeline fill and its partial sums).
    const double score = double(ctas) / double(waves * slots) - 0.02 * (splits - 1);
    if (score > best_score + 1e-9) {
      best_score = score;
      plan.splits = splits;
      plan.tiles_per_split = per;
    }
    if (base >= 4 * slots) break;  // several full waves already
  }
  // Tuning knob for benchmarks: FASTLOSS_QUANT_SPLITS=n forces n split-K slices (clamped).
  if (const char* forced = std::getenv("FASTLOSS_QUANT_SPLITS")) {
    const int want = std::max(1, std::min(std::atoi(forced), plan.k_tiles));
    plan.tiles_per_split = (plan.k_tiles + want - 1) / want;
    plan.splits = (plan.k_tiles + plan.tiles_per_split - 1) / plan.tiles_per_split;
  }
  plan.workspace_bytes = plan.splits > 1 ? int64_t(plan.splits) * rows * s.rows_padded * int64_t(sizeof(float)) : 0;
  return plan;
}

template <class T, int MF, int BK>
void launch(const Params<T>& params, const LaunchPlan& plan, cudaStream_t stream) {
  constexpr int smem = StageLayout<MF, BK>::kTotalBytes;
  FL_CUDA_CHECK(cudaFuncSetAttribute(quant_mma_kernel<T, MF, BK>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  const dim3 grid(plan.n_blocks, plan.splits, plan.m_blocks);
  quant_mma_kernel<T, MF, BK><<<grid, kThreads, smem, stream>>>(params);
  FL_CUDA_CHECK_LAUNCH(quant_mma_kernel);
}

template <class T>
void matmul_typed(const MatmulProblem& p, const LaunchPlan& plan, void* workspace, int device, cudaStream_t stream) {
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
  params.workspace = static_cast<float*>(workspace);
  params.splits = plan.splits;
  params.tiles_per_split = plan.tiles_per_split;
  if (plan.mf == 1) {
    launch<T, 1, 256>(params, plan, stream);
  } else if (plan.mf == 2) {
    launch<T, 2, 256>(params, plan, stream);
  } else {
    launch<T, 4, 128>(params, plan, stream);
  }
  if (plan.splits > 1) {
    const int64_t count = p.rows * w.shape.rows;
    const int blocks = static_cast<int>(std::min<int64_t>((count + 255) / 256, int64_t(cuda_sm_count(device)) * 8));
    reduce_splits_kernel<T><<<std::max(blocks, 1), 256, 0, stream>>>(params);
    FL_CUDA_CHECK_LAUNCH(reduce_splits_kernel);
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
  if (p.dtype == DType::Float16) {
    matmul_typed<__half>(p, plan, workspace, device, stream);
  } else {
    matmul_typed<__nv_bfloat16>(p, plan, workspace, device, stream);
  }
}

}  // namespace quant
}  // namespace fl
