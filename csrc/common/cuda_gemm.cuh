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
  // 8 16-bit elements (16 bytes). The FMA path reads single floats: an odd stride spreads the banks.
  static constexpr int kPad = kTensorCores ? 8 : 1;
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

// The operands of a product: A (M x K) and B (K x N), each with the stride of its non-unit dimension.
template <class TA, class TB>
struct Operands {
  const TA* a;
  const TB* b;
  int64_t M, N, K;
  int64_t lda, ldb;
  bool a_vec, b_vec;  // 16-byte loads allowed (base and stride keep 16-byte alignment)
};

template <class TC, bool ARow, bool BRow>
struct TileProduct {
  using Cfg = Config<TC>;
  static constexpr int kDepth = Cfg::kDepth;
  using AShape = TileShape<TC, ARow, kTile, kDepth>;  // A tile: 128 (M) x depth (K)
  using BShape = TileShape<TC, BRow, kDepth, kTile>;  // B tile: depth (K) x 128 (N)
  static constexpr int kStageElems = AShape::kElems + BShape::kElems;
  // The fp32 result tile, row stride kTileLd; it reuses the operand stages' memory.
  static constexpr int kTileLd = kTile + 4;
  static constexpr size_t kStagesBytes = 2 * kStageElems * sizeof(TC);
  static constexpr size_t kTileBytes = size_t(kTile) * kTileLd * sizeof(float);
  static constexpr size_t kSmemBytes = kStagesBytes > kTileBytes ? kStagesBytes : kTileBytes;
};

// The 128 x 128 tile of A B at (row0, col0) in fp32, left in shared memory (the returned pointer,
// row stride TileProduct::kTileLd; elements past M or N are 0) for every thread of the block.
// `smem` holds TileProduct::kSmemBytes. The caller must not be reading a previous tile from `smem`
// (a __syncthreads between an epilogue and the next call).
template <class TC, bool ARow, bool BRow, class TA, class TB>
__device__ __forceinline__ float* tile_product(const Operands<TA, TB>& op, int64_t row0, int64_t col0,
                                               unsigned char* smem) {
  using P = TileProduct<TC, ARow, BRow>;
  using AShape = typename P::AShape;
  using BShape = typename P::BShape;
  constexpr int kDepth = P::kDepth;
  TC* stages = reinterpret_cast<TC*>(smem);
  float* tile = reinterpret_cast<float*>(smem);

  // The loaders' view of each operand: (outer, inner) with inner the unit-stride dimension.
  TileLoader<TA, TC, AShape> load_a;
  TileLoader<TB, TC, BShape> load_b;
  auto fetch = [&](int64_t k0) {
    if (ARow) load_a.load(op.a + row0 * op.lda + k0, op.lda, op.M - row0, op.K - k0, op.a_vec);
    else load_a.load(op.a + k0 * op.lda + row0, op.lda, op.K - k0, op.M - row0, op.a_vec);
    if (BRow) load_b.load(op.b + k0 * op.ldb + col0, op.ldb, op.K - k0, op.N - col0, op.b_vec);
    else load_b.load(op.b + col0 * op.ldb + k0, op.ldb, op.N - col0, op.K - k0, op.b_vec);
  };
  auto put = [&](int stage) {
    load_a.store(stages + stage * P::kStageElems);
    load_b.store(stages + stage * P::kStageElems + AShape::kElems);
  };
  const int64_t steps = (op.K + kDepth - 1) / kDepth;
  if (steps > 0) {
    fetch(0);
    put(0);
  }
  __syncthreads();

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
    for (int64_t step = 0; step < steps; ++step) {
      const int stage = static_cast<int>(step & 1);
      if (step + 1 < steps) fetch((step + 1) * kDepth);  // in flight while this step computes
      const TC* a_s = stages + stage * P::kStageElems;
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
    // The stages are free now (the barrier above): the result tile takes their place.
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
        wmma::store_matrix_sync(tile + (wr * 32 + i * 16) * P::kTileLd + wc * 64 + j * 16, acc[i][j], P::kTileLd,
                                wmma::mem_row_major);
  } else {
    // FMA units: thread (ty, tx) owns rows ty + 16 r and columns tx + 16 c (r, c < 8): conflict-free
    // shared reads.
    const int ty = static_cast<int>(threadIdx.x) / 16, tx = static_cast<int>(threadIdx.x) % 16;
    float acc[8][8] = {};
    for (int64_t step = 0; step < steps; ++step) {
      const int stage = static_cast<int>(step & 1);
      if (step + 1 < steps) fetch((step + 1) * kDepth);
      const TC* a_s = stages + stage * P::kStageElems;
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
    for (int r = 0; r < 8; ++r)
#pragma unroll
      for (int c = 0; c < 8; ++c) tile[(ty + 16 * r) * P::kTileLd + tx + 16 * c] = acc[r][c];
  }
  __syncthreads();
  return tile;
}

// Writes one C element: alpha * acc + beta * C. C is not read when beta is 0 (it may hold anything).
__device__ __forceinline__ void store_c(float* c, float acc, float alpha, float beta) {
  *c = beta == 0.0f ? alpha * acc : alpha * acc + beta * *c;
}

template <class TC, bool ARow, bool BRow, class TA, class TB>
__global__ void __launch_bounds__(kThreads) gemm_kernel(Operands<TA, TB> op, float alpha, float beta,
                                                        float* __restrict__ c, int64_t ldc) {
  using P = TileProduct<TC, ARow, BRow>;
  extern __shared__ __align__(128) unsigned char smem[];
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kTile, col0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const float* tile = tile_product<TC, ARow, BRow>(op, row0, col0, smem);
  for (int e = static_cast<int>(threadIdx.x); e < kTile * kTile; e += kThreads) {
    const int r = e / kTile, col = e % kTile;  // consecutive threads, consecutive columns: coalesced
    if (row0 + r < op.M && col0 + col < op.N)
      store_c(c + (row0 + r) * ldc + col0 + col, tile[r * P::kTileLd + col], alpha, beta);
  }
}

// The operands of A B for the kernels, from strided views (one unit stride each), and whether
// each is row-major (unit stride along its columns).
template <class TA, class TB>
Operands<TA, TB> operands(int64_t M, int64_t N, int64_t K, View<TA> a, View<TB> b, bool& a_row, bool& b_row) {
  FL_CHECK_ARG((a.col_stride == 1 || a.row_stride == 1) && (b.col_stride == 1 || b.row_stride == 1),
               "fastloss.cuda_gemm: each operand needs one unit stride");
  a_row = a.col_stride == 1;
  b_row = b.col_stride == 1;
  Operands<TA, TB> op{a.data, b.data, M, N, K, a_row ? a.row_stride : a.col_stride,
                      b_row ? b.row_stride : b.col_stride, false, false};
  auto aligned16 = [](const void* data, int64_t ld, size_t elem) {
    return reinterpret_cast<uintptr_t>(data) % 16 == 0 && (ld * static_cast<int64_t>(elem)) % 16 == 0;
  };
  op.a_vec = aligned16(a.data, op.lda, sizeof(TA));
  op.b_vec = aligned16(b.data, op.ldb, sizeof(TB));
  return op;
}

// Calls fn(std::bool_constant<ARow>{}, std::bool_constant<BRow>{}) for the runtime layouts.
template <class Fn>
void dispatch_layouts(bool a_row, bool b_row, Fn&& fn) {
  if (a_row && b_row) fn(std::true_type{}, std::true_type{});
  else if (a_row) fn(std::true_type{}, std::false_type{});
  else if (b_row) fn(std::false_type{}, std::true_type{});
  else fn(std::false_type{}, std::false_type{});
}

inline dim3 tile_grid(int64_t M, int64_t N) {
  const int64_t row_tiles = (M + kTile - 1) / kTile, col_tiles = (N + kTile - 1) / kTile;
  FL_CHECK_ARG(row_tiles <= 65535 && col_tiles <= (int64_t(1) << 31) - 1, "fastloss.cuda_gemm: a ", M, " x ", N,
               " product has too many tiles for one launch");
  return dim3(static_cast<unsigned>(col_tiles), static_cast<unsigned>(row_tiles));
}

// C = alpha * A B + beta * C on `stream`, computed in TC (float: FMA; __half / __nv_bfloat16: tensor
// cores). Nothing is launched for an empty C; K = 0 gives beta * C (C not read when beta = 0).
template <class TC, class TA, class TB>
void gemm(int64_t M, int64_t N, int64_t K, View<TA> a, View<TB> b, float alpha, float beta, float* c, int64_t ldc,
          cudaStream_t stream) {
  if (M == 0 || N == 0) return;
  bool a_row, b_row;
  const Operands<TA, TB> op = operands(M, N, K, a, b, a_row, b_row);
  const dim3 grid = tile_grid(M, N);
  dispatch_layouts(a_row, b_row, [&](auto a_layout, auto b_layout) {
    constexpr bool kARow = decltype(a_layout)::value, kBRow = decltype(b_layout)::value;
    constexpr size_t kSmem = TileProduct<TC, kARow, kBRow>::kSmemBytes;
    auto kernel = gemm_kernel<TC, kARow, kBRow, TA, TB>;
    FL_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmem)));
    kernel<<<grid, kThreads, kSmem, stream>>>(op, alpha, beta, c, ldc);
    FL_CUDA_CHECK_LAUNCH(gemm_kernel);
  });
}

}  // namespace fl::cuda_gemm
