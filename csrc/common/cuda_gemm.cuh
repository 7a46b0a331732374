// A general matrix product for kernels whose operands are views, not tensors: C (M x N, fp32, row
// stride ldc) = alpha * A B + beta * C, where A (M x K) and B (K x N) are read through element
// strides with one of the two equal to 1, so one kernel serves A B, A B^T and A^T B on row-major
// storage. The metric family uses it for the similarity rows S = X Y^T and the gradient products
// W Y and W^T X.
//
// Blocks of 256 threads own 128 x 128 tiles of C and walk K in steps through shared memory, two
// stages deep: the next step's tiles are loaded from global memory into registers (16-byte loads
// along the unit-stride dimension when aligned) while the current step computes, then stored. Each
// operand tile keeps its global layout in shared memory (row- or column-major), so loads are
// coalesced for either. Operands are converted on the way in to the compute type TC: float runs on
// the FMA units (8 x 8 outputs a thread, exact fp32), __half and __nv_bfloat16 on tensor cores
// (WMMA 16x16x16 with fp32 accumulation; each of the 8 warps owns 32 x 64). Include only from .cu files.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/cuda_check.cuh"
#include "common/cuda_numeric.cuh"
#include "common/dtype.h"

namespace fl::cuda_gemm {

// Element (r, c) of a matrix view is data[r * row_stride + c * col_stride]; one stride must be 1.
template <class T>
struct View {
  const T* data;
  int64_t row_stride, col_stride;
};

constexpr int kTile = 128;  // C tile: 128 x 128
constexpr int kThreads = 256;

template <class TC>
struct Config {
  static constexpr bool kTensorCores = !std::is_same<TC, float>::value;
  static constexpr int kDepth = kTensorCores ? 32 : 16;  // K step
  // Padding of the shared rows against bank conflicts; WMMA needs row strides that are multiples of
  // 8 16-bit elements (16 bytes).
  static constexpr int kPad = kTensorCores ? 8 : 4;
};

// A (rows x cols) operand tile in shared memory, stored with its global layout: Inner is the
// unit-stride dimension (cols when RowMajor), Outer the other one. Row stride Inner + pad.
template <class TC, bool RowMajor, int Rows, int Cols>
struct TileShape {
  static constexpr int kOuter = RowMajor ? Rows : Cols;
  static constexpr int kInner = RowMajor ? Cols : Rows;
  static constexpr int kLd = kInner + Config<TC>::kPad;
  static constexpr int kElems = kOuter * kLd;
};

// Global -> registers -> shared memory for one operand tile of TS elements converted to TC.
// Each thread owns kPerThread groups of 16 bytes along the unit-stride dimension.
template <class TS, class TC, class Shape>
struct TileLoader {
  static constexpr int kVec = 16 / static_cast<int>(sizeof(TS));
  static constexpr int kGroupsPerOuter = Shape::kInner / kVec;
  static constexpr int kPerThread = Shape::kOuter * kGroupsPerOuter / kThreads;
  static_assert(Shape::kInner % kVec == 0 && (Shape::kOuter * kGroupsPerOuter) % kThreads == 0, "tile / thread split");
  TC regs[kPerThread][kVec];

  // `base`: the tile's first element; `ld`: the global stride of the outer dimension; elements at
  // or past outer_valid / inner_valid are zero. `vector_ok`: base and ld keep 16-byte alignment.
  __device__ __forceinline__ void load(const TS* base, int64_t ld, int64_t outer_valid, int64_t inner_valid,
                                       bool vector_ok) {
#pragma unroll
    for (int g = 0; g < kPerThread; ++g) {
      const int group = static_cast<int>(threadIdx.x) + g * kThreads;
      const int outer = group / kGroupsPerOuter, inner = (group % kGroupsPerOuter) * kVec;
      const TS* p = base + outer * ld + inner;
      if (vector_ok && outer < outer_valid && inner + kVec <= inner_valid) {
        const uint4 raw = *reinterpret_cast<const uint4*>(p);
        TS values[kVec];
        memcpy(values, &raw, sizeof(values));
#pragma unroll
        for (int e = 0; e < kVec; ++e) regs[g][e] = CudaStore<TC>::from(to_acc(values[e]));
      } else {
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          const bool valid = outer < outer_valid && inner + e < inner_valid;
          regs[g][e] = CudaStore<TC>::from(valid ? to_acc(p[e]) : 0.0f);
        }
      }
    }
  }
  __device__ __forceinline__ void store(TC* smem) const {
#pragma unroll
    for (int g = 0; g < kPerThread; ++g) {
      const int group = static_cast<int>(threadIdx.x) + g * kThreads;
      const int outer = group / kGroupsPerOuter, inner = (group % kGroupsPerOuter) * kVec;
#pragma unroll
      for (int e = 0; e < kVec; ++e) smem[outer * Shape::kLd + inner + e] = regs[g][e];
    }
  }
};

// Element (r, c) of a shared tile.
template <class Shape, bool RowMajor, class TC>
__device__ __forceinline__ TC tile_at(const TC* smem, int r, int c) {
  return RowMajor ? smem[r * Shape::kLd + c] : smem[c * Shape::kLd + r];
}

// Writes one C element: alpha * acc + beta * C. C is not read when beta is 0 (it may hold anything).
__device__ __forceinline__ void store_c(float* c, float acc, float alpha, float beta) {
  *c = beta == 0.0f ? alpha * acc : alpha * acc + beta * *c;
}

struct Args {
  int64_t M, N, K;
  int64_t lda, ldb;      // stride of the non-unit dimension of each operand
  bool a_vec, b_vec;     // 16-byte loads allowed
  float alpha, beta;
  float* c;
  int64_t ldc;
};

template <class TC, class TA, class TB, bool ARow, bool BRow>
struct Kernel {
  using Cfg = Config<TC>;
  static constexpr int kDepth = Cfg::kDepth;
  using AShape = TileShape<TC, ARow, kTile, kDepth>;   // A tile: 128 (M) x depth (K)
  using BShape = TileShape<TC, BRow, kDepth, kTile>;   // B tile: depth (K) x 128 (N)
  static constexpr int kStageElems = AShape::kElems + BShape::kElems;
  static constexpr size_t kSmemBytes = 2 * kStageElems * sizeof(TC);
};

template <class TC, class TA, class TB, bool ARow, bool BRow>
__global__ void __launch_bounds__(kThreads) gemm_kernel(const TA* __restrict__ a, const TB* __restrict__ b, Args args) {
  using K = Kernel<TC, TA, TB, ARow, BRow>;
  using AShape = typename K::AShape;
  using BShape = typename K::BShape;
  constexpr int kDepth = K::kDepth;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  TC* stages = reinterpret_cast<TC*>(smem_raw);
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kTile, col0 = static_cast<int64_t>(blockIdx.x) * kTile;

  // The loaders' view of each operand: (outer, inner) with inner the unit-stride dimension.
  TileLoader<TA, TC, AShape> load_a;
  TileLoader<TB, TC, BShape> load_b;
  auto fetch = [&](int64_t k0) {
    if (ARow) load_a.load(a + row0 * args.lda + k0, args.lda, args.M - row0, args.K - k0, args.a_vec);
    else load_a.load(a + k0 * args.lda + row0, args.lda, args.K - k0, args.M - row0, args.a_vec);
    if (BRow) load_b.load(b + k0 * args.ldb + col0, args.ldb, args.K - k0, args.N - col0, args.b_vec);
    else load_b.load(b + col0 * args.ldb + k0, args.ldb, args.N - col0, args.K - k0, args.b_vec);
  };
  auto put = [&](int stage) {
    load_a.store(stages + stage * K::kStageElems);
    load_b.store(stages + stage * K::kStageElems + AShape::kElems);
  };
  const int64_t steps = (args.K + kDepth - 1) / kDepth;

  if constexpr (Config<TC>::kTensorCores) {
    namespace wmma = nvcuda::wmma;
    using ALayout = std::conditional_t<ARow, wmma::row_major, wmma::col_major>;
    using BLayout = std::conditional_t<BRow, wmma::row_major, wmma::col_major>;
    const int warp = static_cast<int>(threadIdx.x) / 32;
    const int wr = warp / 2, wc = warp % 2;  // the warp's 32 x 64 part of the tile
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
    if (steps > 0) {
      fetch(0);
      put(0);
    }
    __syncthreads();
    for (int64_t step = 0; step < steps; ++step) {
      const int stage = static_cast<int>(step & 1);
      if (step + 1 < steps) fetch((step + 1) * kDepth);  // in flight while this step computes
      const TC* a_s = stages + stage * K::kStageElems;
      const TC* b_s = a_s + AShape::kElems;
#pragma unroll
      for (int kk = 0; kk < kDepth; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, TC, ALayout> fa[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, TC, BLayout> fb[4];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int r = wr * 32 + i * 16;
          wmma::load_matrix_sync(fa[i], ARow ? a_s + r * AShape::kLd + kk : a_s + kk * AShape::kLd + r, AShape::kLd);
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int c = wc * 64 + j * 16;
          wmma::load_matrix_sync(fb[j], BRow ? b_s + kk * BShape::kLd + c : b_s + c * BShape::kLd + kk, BShape::kLd);
        }
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
      if (step + 1 < steps) put(stage ^ 1);  // that stage's last readers finished before the barrier below
      __syncthreads();
    }
    // Epilogue through a 16 x 16 fp32 staging square per warp (the stages are free now).
    float* stage_c = reinterpret_cast<float*>(smem_raw) + warp * 256;
    const int lane = static_cast<int>(threadIdx.x) % 32;
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        wmma::store_matrix_sync(stage_c, acc[i][j], 16, wmma::mem_row_major);
        __syncwarp();
        for (int e = lane; e < 256; e += 32) {
          const int64_t r = row0 + wr * 32 + i * 16 + e / 16, c = col0 + wc * 64 + j * 16 + e % 16;
          if (r < args.M && c < args.N) store_c(args.c + r * args.ldc + c, stage_c[e], args.alpha, args.beta);
        }
        __syncwarp();
      }
  } else {
    // FMA units: thread (ty, tx) owns rows ty + 16 r and columns tx + 16 c (r, c < 8): conflict-free
    // shared reads, coalesced stores.
    const int ty = static_cast<int>(threadIdx.x) / 16, tx = static_cast<int>(threadIdx.x) % 16;
    float acc[8][8] = {};
    if (steps > 0) {
      fetch(0);
      put(0);
    }
    __syncthreads();
    for (int64_t step = 0; step < steps; ++step) {
      const int stage = static_cast<int>(step & 1);
      if (step + 1 < steps) fetch((step + 1) * kDepth);
      const TC* a_s = stages + stage * K::kStageElems;
      const TC* b_s = a_s + AShape::kElems;
#pragma unroll 4
      for (int k = 0; k < kDepth; ++k) {
        float av[8], bv[8];
#pragma unroll
        for (int r = 0; r < 8; ++r) av[r] = tile_at<AShape, ARow>(a_s, ty + 16 * r, k);
#pragma unroll
        for (int c = 0; c < 8; ++c) bv[c] = tile_at<BShape, BRow>(b_s, k, tx + 16 * c);
#pragma unroll
        for (int r = 0; r < 8; ++r)
#pragma unroll
          for (int c = 0; c < 8; ++c) acc[r][c] = fmaf(av[r], bv[c], acc[r][c]);
      }
      if (step + 1 < steps) put(stage ^ 1);
      __syncthreads();
    }
#pragma unroll
    for (int r = 0; r < 8; ++r) {
      const int64_t row = row0 + ty + 16 * r;
#pragma unroll
      for (int c = 0; c < 8; ++c) {
        const int64_t col = col0 + tx + 16 * c;
        if (row < args.M && col < args.N) store_c(args.c + row * args.ldc + col, acc[r][c], args.alpha, args.beta);
      }
    }
  }
}

template <class TC, class TA, class TB, bool ARow, bool BRow>
void launch(const TA* a, const TB* b, const Args& args, cudaStream_t stream) {
  using K = Kernel<TC, TA, TB, ARow, BRow>;
  const int64_t row_tiles = (args.M + kTile - 1) / kTile, col_tiles = (args.N + kTile - 1) / kTile;
  FL_CHECK_ARG(row_tiles <= 65535 && col_tiles <= (int64_t(1) << 31) - 1, "fastloss.cuda_gemm: a ", args.M, " x ",
               args.N, " product has too many tiles for one launch");
  auto kernel = gemm_kernel<TC, TA, TB, ARow, BRow>;
  FL_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(K::kSmemBytes)));
  const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(row_tiles));
  kernel<<<grid, kThreads, K::kSmemBytes, stream>>>(a, b, args);
  FL_CUDA_CHECK_LAUNCH(gemm_kernel);
}

template <class T>
bool aligned16(const T* data, int64_t ld) {
  return reinterpret_cast<uintptr_t>(data) % 16 == 0 && (ld * static_cast<int64_t>(sizeof(T))) % 16 == 0;
}

// C = alpha * A B + beta * C on `stream`, computed in TC (float: FMA; __half / __nv_bfloat16: tensor
// cores). Nothing is launched for an empty C; K = 0 gives beta * C (C not read when beta = 0).
template <class TC, class TA, class TB>
void gemm(int64_t M, int64_t N, int64_t K, View<TA> a, View<TB> b, float alpha, float beta, float* c, int64_t ldc,
          cudaStream_t stream) {
  if (M == 0 || N == 0) return;
  FL_CHECK_ARG((a.col_stride == 1 || a.row_stride == 1) && (b.col_stride == 1 || b.row_stride == 1),
               "fastloss.cuda_gemm: each operand needs one unit stride");
  const bool a_row = a.col_stride == 1, b_row = b.col_stride == 1;
  Args args{M, N, K, a_row ? a.row_stride : a.col_stride, b_row ? b.row_stride : b.col_stride, false, false,
            alpha, beta, c, ldc};
  args.a_vec = aligned16(a.data, args.lda);
  args.b_vec = aligned16(b.data, args.ldb);
  if (a_row && b_row) launch<TC, TA, TB, true, true>(a.data, b.data, args, stream);
  else if (a_row) launch<TC, TA, TB, true, false>(a.data, b.data, args, stream);
  else if (b_row) launch<TC, TA, TB, false, true>(a.data, b.data, args, stream);
  else launch<TC, TA, TB, false, false>(a.data, b.data, args, stream);
}

}  // namespace fl::cuda_gemm
