// CUDA kernels of softplus attention: FlashAttention-2-style tiles on tensor cores (WMMA, which
// compiles to mma.sync on sm_80+), cp.async tile loads, and the per-score math of attention_math.h.
//
// A block is 4 warps and owns 64 query rows (forward, dQ) or 64 keys (dK/dV); each warp owns 16 of
// them. Score tiles (16 x 64 per warp) go through shared memory in fp32, where the lanes apply the
// softplus (one exponential and a polynomial per score) and write the weights in the input type for
// the next product. Accumulators (out, dQ, dK, dV) stay in WMMA fragments across the key loop.
//
//   forward_kernel     [LSSAR: statistics sweep: Z_i, max_j sp_ij] then out = sum_j w_ij v_j / sum w
//   row_terms_kernel   D_i = dO_i . out_i
//   grad_q_kernel      [LSSAR: a sweep for D_i = sum_j W_ij dp_ij and F_i] then dQ = sum_j g_ij k_j
//   grad_kv_kernel     dK_j = sum_i g_ij q_i, dV_j = sum_i w_ij dO_i over the rows and q heads that see
//                      the block: every output element has one writer, so there are no atomics and
//                      the backward is deterministic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "attention/attention_kernels.h"
#include "attention/attention_math.h"
#include "attention/cuda_common.cuh"
#include "common/cuda_async_copy.cuh"
#include "common/cuda_check.cuh"
#include "common/cuda_numeric.cuh"

namespace fl::attention {
namespace {

namespace wmma = nvcuda::wmma;
using namespace cuda_detail;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kTile = 64;       // query rows or keys per block, and per tile of the inner loop
constexpr int kWarpRows = 16;   // rows (keys) per warp
constexpr int kScoreLd = kTile + 4;   // fp32 score tiles, padded against bank conflicts
constexpr int kWeightLd = kTile + 8;  // 16-bit weight tiles

template <int D>
struct Dims {
  static constexpr int kLd = D + 8;                       // 16-bit input tiles (64 x D)
  static constexpr int kTileElems = kTile * kLd;
  static constexpr int kFrags = D / 16;                    // accumulator fragments per warp row strip
  static constexpr int kStageLd = D + 4;                   // fp32 staging of accumulators
};

template <class T, class Layout>
using FragAT = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, Layout>;
template <class T, class Layout>
using FragBT = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, Layout>;
using FragAcc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// ---- fp16 range of the weight operands (docs/attention.md, "fp16 range") -----------------------
// The weights are computed in fp32 and rounded to the input type for the tensor-core products.
// bfloat16 has fp32's exponent range and takes them as they are. fp16 (largest 65504, smallest
// normal 2^-14) takes them times a power of two that is undone in fp32 after the product:
// - weights known to be at most 1 (A_ij, W_ij, LSSAR's u^p) times the constant 2^14;
// - the others (LSSA's softplus values in the forward, every score gradient) times 2^-e, with e
//   per row (per key in dK) from the row's running largest |weight| (RunningScale).
template <class T>
constexpr bool kRunningScale = std::is_same<T, __half>::value;

// The value weights A_ij, W_ij (dV) and LSSAR's forward weights u^p are at most 1 (about 1/N for
// A and W): in fp16 they go subnormal past N ~ 16k, so they are rounded as 2^14 A (at most 16384
// < 65504) and the product is divided back in fp32.
template <class T>
constexpr float kValueScale = std::is_same<T, __half>::value ? 16384.0f : 1.0f;

// 2^k as a float for k in [-126, 127], 0 below.
__device__ __forceinline__ float pow2(int k) { return k < -126 ? 0.f : __int_as_float((k + 127) << 23); }

// A row's (a key's) power-of-two scale of its fp16 weights: a weight w is stored as w 2^-e.
// Invariant, once a nonzero weight has been seen: every stored |w 2^-e| < 2^15 (< 65504), and the
// row's largest stored |weight| so far is >= 2^8 (e only grows, and is set from the tile max m as
// e = floor(log2 m) - 8, which puts m 2^-e in [2^8, 2^9)). So weights within 2^-22 of the running
// maximum are normal fp16 (relative error 2^-11 as before), and a smaller one is off by at most
// 2^-25 absolutely, 2^-33 of the running maximum. A tile whose largest |weight| reaches 2^(e+15)
// raises e by at least 7, and the accumulator's row is multiplied by 2^(e_old - e_new) in fp32
// (exact), so rescales are rare (at most one per 7 binades of growth) and the sums stay the same.
// Both lanes of a pair hold the same state (their tile maxima are combined first). (e is kept >= -126 so
// that 2^-e is a float: only a row whose largest weight is below 2^-118 gets less than 2^8.)
struct RunningScale {
  static constexpr int kTop = 15;   // stored |weights| < 2^kTop
  static constexpr int kAfter = 8;  // a (re)scaled tile's largest lands in [2^kAfter, 2^(kAfter+1))
  int e = 0;
  bool set = false;  // before the first nonzero weight the accumulator row is 0 and e is unused

  // Takes the tile's largest |weight| (fp32, both lanes) and returns the factor for the row's
  // accumulator: 1 when e stays.
  __device__ __forceinline__ float update(float tile_max) {
    if (!(tile_max > 0.f && tile_max <= 3.402823466e38f)) return 1.f;  // 0, inf or NaN: e stays
    const int t = ((__float_as_int(tile_max) >> 23) & 0xff) - 127;   // floor(log2), -127 if subnormal
    if (set && t - e < kTop) return 1.f;
    const int e_new = t - kAfter < -126 ? -126 : t - kAfter;  // 2^-e stays a normal float
    const float factor = set ? pow2(e - e_new) : 1.f;
    e = e_new;
    set = true;
    return factor;
  }
  __device__ __forceinline__ float inverse() const { return pow2(-e); }  // stored = w * inverse()
  __device__ __forceinline__ float undo() const { return pow2(e); }      // applied after the product
};

// The largest of the lane pair's two values (lanes 2r and 2r + 1 share row r of a warp).
__device__ __forceinline__ float pair_max(float v) { return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1)); }

// Loads rows [0, rows_valid) of a 64 x D tile (rows D elements apart in global memory) into shared
// memory with row stride D + 8; missing rows are zero-filled. Asynchronous: commit and wait after.
template <class T, int D>
__device__ __forceinline__ void load_tile_async(T* smem, const T* global, int64_t rows_valid) {
  constexpr int kChunksPerRow = D * static_cast<int>(sizeof(T)) / 16;
  for (int c = threadIdx.x; c < kTile * kChunksPerRow; c += kThreads) {
    const int r = c / kChunksPerRow, part = c % kChunksPerRow;
    const bool valid = r < rows_valid;
    cp_async16(smem + r * Dims<D>::kLd + part * 8, valid ? global + static_cast<int64_t>(r) * D + part * 8 : global,
               valid ? 16 : 0);
  }
}

// acc (16 x 64 strip of a warp, 4 fragments) = A (16 x D, row-major, ld) * B^T where B is 64 x D
// row-major (so B^T is col-major): a score tile, q k^T or dO v^T (or k q^T, v dO^T).
template <class T, int D>
__device__ __forceinline__ void strip_times_tile_t(const T* a, const T* b, FragAcc (&acc)[4]) {
#pragma unroll
  for (int n = 0; n < 4; ++n) wmma::fill_fragment(acc[n], 0.0f);
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    FragAT<T, wmma::row_major> fa;
    wmma::load_matrix_sync(fa, a + kk * 16, Dims<D>::kLd);
#pragma unroll
    for (int n = 0; n < 4; ++n) {
      FragBT<T, wmma::col_major> fb;
      wmma::load_matrix_sync(fb, b + n * 16 * Dims<D>::kLd + kk * 16, Dims<D>::kLd);
      wmma::mma_sync(acc[n], fa, fb, acc[n]);
    }
  }
}

template <int D>
__device__ __forceinline__ void store_strip(float* dst, FragAcc (&acc)[4]) {
#pragma unroll
  for (int n = 0; n < 4; ++n) wmma::store_matrix_sync(dst + n * 16, acc[n], kScoreLd, wmma::mem_row_major);
}

// acc (16 x D) += W (16 x 64 weights, row-major, ld kWeightLd) * B (64 x D tile, row-major).
template <class T, int D>
__device__ __forceinline__ void weights_times_tile(const T* w, const T* b, FragAcc (&acc)[Dims<D>::kFrags]) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    FragAT<T, wmma::row_major> fa;
    wmma::load_matrix_sync(fa, w + kk * 16, kWeightLd);
#pragma unroll
    for (int n = 0; n < Dims<D>::kFrags; ++n) {
      FragBT<T, wmma::row_major> fb;
      wmma::load_matrix_sync(fb, b + kk * 16 * Dims<D>::kLd + n * 16, Dims<D>::kLd);
      wmma::mma_sync(acc[n], fa, fb, acc[n]);
    }
  }
}

// Multiplies row r of a warp's 16 x D accumulator strip by the factor that the lanes of pair r hold,
// through `stage` (a free 16 x 64 fp32 score tile of the warp, ld kScoreLd), four fragments at a
// time: the layout of a fragment's elements is unspecified, so rows are scaled in memory. Call it
// from the whole warp, only when some factor differs from 1 (RunningScale says so rarely).
template <int D>
__device__ __forceinline__ void scale_strip_rows(FragAcc (&acc)[Dims<D>::kFrags], float* stage, float factor) {
  const int lane = threadIdx.x & 31;
  __syncwarp();  // the lanes' reads of the tile in `stage` are done
#pragma unroll
  for (int n0 = 0; n0 < Dims<D>::kFrags; n0 += 4) {
#pragma unroll
    for (int n = n0; n < n0 + 4 && n < Dims<D>::kFrags; ++n)
      wmma::store_matrix_sync(stage + (n - n0) * 16, acc[n], kScoreLd, wmma::mem_row_major);
    __syncwarp();
    const int columns = (Dims<D>::kFrags - n0 < 4 ? Dims<D>::kFrags - n0 : 4) * 16;
    for (int c = lane & 1; c < columns; c += 2) stage[(lane / 2) * kScoreLd + c] *= factor;
    __syncwarp();
#pragma unroll
    for (int n = n0; n < n0 + 4 && n < Dims<D>::kFrags; ++n)
      wmma::load_matrix_sync(acc[n], stage + (n - n0) * 16, kScoreLd, wmma::mem_row_major);
    __syncwarp();
  }
}

// Writes a warp's 16 x D accumulator strip to rows [row0, row0 + 16) of `dst` (rows D apart),
// times scale[r], through the fp32 staging area `stage` (16 x (D + 4)). Rows past `rows_valid`
// are skipped.
template <class T, int D>
__device__ __forceinline__ void write_strip(FragAcc (&acc)[Dims<D>::kFrags], float* stage, T* dst,
                                            int64_t rows_valid, const float* scale) {
#pragma unroll
  for (int n = 0; n < Dims<D>::kFrags; ++n)
    wmma::store_matrix_sync(stage + n * 16, acc[n], Dims<D>::kStageLd, wmma::mem_row_major);
  __syncwarp();
  const int lane = threadIdx.x & 31;
  for (int e = lane; e < kWarpRows * D; e += 32) {
    const int r = e / D, c = e % D;
    if (r < rows_valid) dst[static_cast<int64_t>(r) * D + c] = CudaStore<T>::from(stage[r * Dims<D>::kStageLd + c] * scale[r]);
  }
}

// Shared-memory layout of a kernel: `tiles` 16-bit 64 x D tiles, `scores` fp32 64 x 68 tiles,
// `weights` 16-bit 64 x 72 tiles, and 64 row states. Every part starts 128-byte aligned.
template <class T, int D>
struct Smem {
  int tiles, scores, weights;
  __host__ __device__ size_t tiles_bytes() const { return size_t(tiles) * Dims<D>::kTileElems * sizeof(T); }
  __host__ __device__ size_t scores_bytes() const { return size_t(scores) * kTile * kScoreLd * sizeof(float); }
  __host__ __device__ size_t weights_bytes() const { return size_t(weights) * kTile * kWeightLd * sizeof(T); }
  __host__ __device__ size_t bytes() const {
    return tiles_bytes() + scores_bytes() + weights_bytes() + kTile * sizeof(RowState<float>);
  }
  __device__ T* tile(unsigned char* base, int i) const { return reinterpret_cast<T*>(base) + i * Dims<D>::kTileElems; }
  __device__ float* score(unsigned char* base, int i) const {
    return reinterpret_cast<float*>(base + tiles_bytes()) + i * kTile * kScoreLd;
  }
  __device__ T* weight(unsigned char* base, int i) const {
    return reinterpret_cast<T*>(base + tiles_bytes() + scores_bytes()) + i * kTile * kWeightLd;
  }
  __device__ RowState<float>* rows(unsigned char* base) const {
    return reinterpret_cast<RowState<float>*>(base + tiles_bytes() + scores_bytes() + weights_bytes());
  }
};

// The state of query row `row` (a row past the end sees no keys), from the saved statistics when
// `stats` is given (second forward sweep, backward).
__device__ __forceinline__ RowState<float> load_row_state(const Params& p, int64_t head_row0, int64_t row,
                                                          bool from_stats) {
  if (row >= p.len_q) {
    RowState<float> dead;
    dead.rc = RowConstants<float>{0, 0, 0.f, 0.f, 0.f};
    return dead;
  }
  const RowConstants<float> rc = row_constants<float>(p.mask, p.rule, row);
  if (!from_stats) return row_state(rc, Reweight{false, 0.0, 0}, 0.f, 0.f, 0.f);
  const float* st = p.stats + (head_row0 + row) * p.stats_per_row;
  RowState<float> s = p.rw.on ? row_state(rc, p.rw, st[0], st[1], st[2]) : row_state(rc, p.rw, st[0], 0.f, 0.f);
  s.d = p.row_terms[(head_row0 + row) * 2];
  s.f = p.row_terms[(head_row0 + row) * 2 + 1];
  return s;
}

// Decodes a flat block index into (batch, head, first row or key); the last row blocks (the longest
// under causal masking) are scheduled first.
struct BlockCoords {
  int64_t b, head, start;
};
__device__ __forceinline__ BlockCoords block_coords(int64_t length, int64_t heads) {
  const int64_t blocks = (length + kTile - 1) / kTile;
  const int64_t flat = blockIdx.x;
  const int64_t bh = flat / blocks;
  return BlockCoords{bh / heads, bh % heads, (blocks - 1 - flat % blocks) * kTile};
}

// A row-block kernel's place: the first row r0 of its 64, how many exist, and the row offsets of
// its (batch, q head) in q-shaped tensors and of the matching kv head in k-shaped ones.
struct RowBlock {
  int64_t head_row0, kv_row0, r0, rows_valid;
};
__device__ __forceinline__ RowBlock row_block(const Params& p) {
  const BlockCoords at = block_coords(p.len_q, p.heads_q);
  RowBlock rb;
  rb.head_row0 = (at.b * p.heads_q + at.head) * p.len_q;
  rb.kv_row0 = (at.b * p.heads_kv + at.head / p.group) * p.len_k;
  rb.r0 = at.start;
  rb.rows_valid = std::min<int64_t>(kTile, p.len_q - at.start);
  return rb;
}

// ---- forward ----------------------------------------------------------------------------------

template <class T, int D>
__global__ void __launch_bounds__(kThreads) forward_kernel(Params p) {
  extern __shared__ __align__(128) unsigned char smem[];
  constexpr Smem<T, D> L{3, 1, 1};
  const RowBlock rb = row_block(p);
  const int64_t head_row0 = rb.head_row0, kv_row0 = rb.kv_row0, r0 = rb.r0, rows_valid = rb.rows_valid;
  T* q_s = L.tile(smem, 0);
  T* k_s = L.tile(smem, 1);
  T* v_s = L.tile(smem, 2);
  RowState<float>* rows = L.rows(smem);
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  float* s_w = L.score(smem, 0) + warp * kWarpRows * kScoreLd;
  T* w_w = L.weight(smem, 0) + warp * kWarpRows * kWeightLd;
  const T* q = static_cast<const T*>(p.q) + (head_row0 + r0) * D;
  const T* k = static_cast<const T*>(p.k) + kv_row0 * D;
  const T* v = static_cast<const T*>(p.v) + kv_row0 * D;

  load_tile_async<T, D>(q_s, q, rows_valid);
  cp_async_commit();
  if (threadIdx.x < kTile) rows[threadIdx.x] = load_row_state(p, head_row0, r0 + threadIdx.x, false);
  __syncthreads();
  const int64_t key_lo = rows[0].rc.lo, key_hi = rows[rows_valid - 1].rc.hi;
  const int my_row = warp * kWarpRows + lane / 2;  // each lane pair shares a row, 32 of its 64 columns each
  const int half = lane & 1;  // the lane pair interleaves its row's columns (no shared bank)

  float z = 0.f, sp_max = 0.f;
  if (p.rw.on) {  // statistics sweep
    const RowState<float> rs = rows[my_row];
    for (int64_t j0 = key_lo; j0 < key_hi; j0 += kTile) {
      load_tile_async<T, D>(k_s, k + j0 * D, key_hi - j0);
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();
      FragAcc acc[4];
      strip_times_tile_t<T, D>(q_s + warp * kWarpRows * Dims<D>::kLd, k_s, acc);
      store_strip<D>(s_w, acc);
      __syncwarp();
      for (int c = 0; c < 32; ++c) {
        const int64_t j = j0 + 2 * c + half;
        if (j >= rs.rc.lo && j < rs.rc.hi) {
          const float sp = forward_weight(rs, Reweight{false, 0.0, 0}, s_w[(lane / 2) * kScoreLd + 2 * c + half]);
          z += sp;
          sp_max = fmaxf(sp_max, sp);
        }
      }
      __syncthreads();  // k_s is reloaded next
    }
    z += __shfl_xor_sync(0xffffffffu, z, 1);
    sp_max = fmaxf(sp_max, __shfl_xor_sync(0xffffffffu, sp_max, 1));
    const float xmax = reweight_xmax(rs.rc, z, sp_max);
    __syncwarp();
    if ((lane & 1) == 0) rows[my_row] = row_state(rs.rc, p.rw, z, xmax, 1.f);
    sp_max = xmax;
    __syncwarp();
  }

  FragAcc acc_o[Dims<D>::kFrags];
#pragma unroll
  for (int n = 0; n < Dims<D>::kFrags; ++n) wmma::fill_fragment(acc_o[n], 0.0f);
  const RowState<float> rs = rows[my_row];
  float w_sum = 0.f;
  // fp16: LSSAR's weights u^p <= 1 are stored times 2^14; LSSA's softplus values, which have no
  // bound known in advance (about e^(c s) for c s << 0, up to |c s| for unnormalized q, k), times
  // the row's running scale.
  RunningScale running;
  const bool by_running = kRunningScale<T> && !p.rw.on;
  for (int64_t j0 = key_lo; j0 < key_hi; j0 += kTile) {
    load_tile_async<T, D>(k_s, k + j0 * D, key_hi - j0);  // keys no row sees are never read
    cp_async_commit();
    load_tile_async<T, D>(v_s, v + j0 * D, key_hi - j0);
    cp_async_commit();
    cp_async_wait<1>();  // q and k are in; v may still be on its way
    __syncthreads();
    FragAcc acc[4];
    strip_times_tile_t<T, D>(q_s + warp * kWarpRows * Dims<D>::kLd, k_s, acc);
    store_strip<D>(s_w, acc);
    __syncwarp();
    float w_mul = kValueScale<T>, factor = 1.f;
    if (by_running) {  // the softplus is increasing: the tile's largest weight is sp(max_j c s_ij)
      float x_max = -INFINITY;
      for (int c = 0; c < 32; ++c) {
        const int64_t j = j0 + 2 * c + half;
        if (j >= rs.rc.lo && j < rs.rc.hi) x_max = fmaxf(x_max, rs.rc.scale * s_w[(lane / 2) * kScoreLd + 2 * c + half]);
      }
      float sp_top, sig_top;
      softplus_and_sigmoid(pair_max(x_max), sp_top, sig_top);
      factor = running.update(sp_top);
      w_mul = running.inverse();
    }
    for (int c = 0; c < 32; ++c) {
      const int64_t j = j0 + 2 * c + half;
      const bool visible = j >= rs.rc.lo && j < rs.rc.hi;
      const float w = visible ? forward_weight(rs, p.rw, s_w[(lane / 2) * kScoreLd + 2 * c + half]) : 0.f;
      w_sum += w;
      w_w[(lane / 2) * kWeightLd + 2 * c + half] = CudaStore<T>::from(kRunningScale<T> ? w * w_mul : w);
    }
    if (by_running && __any_sync(0xffffffffu, factor != 1.f)) scale_strip_rows<D>(acc_o, s_w, factor);
    cp_async_wait<0>();
    __syncthreads();
    weights_times_tile<T, D>(w_w, v_s, acc_o);
    __syncthreads();  // k_s and v_s are reloaded next
  }
  w_sum += __shfl_xor_sync(0xffffffffu, w_sum, 1);

  // Normalize and write: w_sum is Z (LSSA) or U (LSSAR; a dead row has inv_z = 0 and outputs 0).
  float* scale = L.score(smem, 0) + warp * kWarpRows * kScoreLd;  // 16 floats per warp, after its last use
  __syncthreads();
  if ((lane & 1) == 0) {
    const bool live = w_sum > 0.f && (!p.rw.on || rs.inv_z > 0.f);
    const float undo = by_running ? running.undo() : 1.f / kValueScale<T>;  // the weights' fp16 scale
    scale[lane / 2] = live ? undo / w_sum : 0.f;
    const int64_t row = r0 + my_row;
    if (row < p.len_q) {
      float* st = p.stats + (head_row0 + row) * p.stats_per_row;
      if (p.rw.on) {
        st[0] = z;
        st[1] = sp_max;
        st[2] = w_sum;
      } else {
        st[0] = w_sum;
      }
    }
  }
  __syncwarp();
  float* stage = reinterpret_cast<float*>(k_s) + warp * kWarpRows * Dims<D>::kStageLd;
  write_strip<T, D>(acc_o, stage, static_cast<T*>(p.out) + (head_row0 + r0 + warp * kWarpRows) * D,
                    rows_valid - warp * kWarpRows, scale);
}

// ---- backward ---------------------------------------------------------------------------------

template <class T>
__global__ void row_terms_kernel(Params p, int64_t total_rows, int dim) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x & 31;
  if (row >= total_rows) return;
  const T* o = static_cast<const T*>(p.out) + row * dim;
  const T* g = static_cast<const T*>(p.grad_out) + row * dim;
  float d = 0.f;
  for (int c = lane; c < dim; c += 32) d += to_acc(o[c]) * to_acc(g[c]);
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) d += __shfl_xor_sync(0xffffffffu, d, offset);
  if (lane == 0) {
    p.row_terms[row * 2] = d;
    p.row_terms[row * 2 + 1] = 0.f;
  }
}

template <class T, int D>
__global__ void __launch_bounds__(kThreads) grad_q_kernel(Params p) {
  extern __shared__ __align__(128) unsigned char smem[];
  constexpr Smem<T, D> L{4, 2, 1};
  const RowBlock rb = row_block(p);
  const int64_t head_row0 = rb.head_row0, kv_row0 = rb.kv_row0, r0 = rb.r0, rows_valid = rb.rows_valid;
  T* q_s = L.tile(smem, 0);
  T* do_s = L.tile(smem, 1);
  T* k_s = L.tile(smem, 2);
  T* v_s = L.tile(smem, 3);
  RowState<float>* rows = L.rows(smem);
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  float* s_w = L.score(smem, 0) + warp * kWarpRows * kScoreLd;
  float* dp_w = L.score(smem, 1) + warp * kWarpRows * kScoreLd;
  T* g_w = L.weight(smem, 0) + warp * kWarpRows * kWeightLd;
  const T* k = static_cast<const T*>(p.k) + kv_row0 * D;
  const T* v = static_cast<const T*>(p.v) + kv_row0 * D;

  load_tile_async<T, D>(q_s, static_cast<const T*>(p.q) + (head_row0 + r0) * D, rows_valid);
  load_tile_async<T, D>(do_s, static_cast<const T*>(p.grad_out) + (head_row0 + r0) * D, rows_valid);
  cp_async_commit();
  if (threadIdx.x < kTile) rows[threadIdx.x] = load_row_state(p, head_row0, r0 + threadIdx.x, true);
  __syncthreads();
  const int64_t key_lo = rows[0].rc.lo, key_hi = rows[rows_valid - 1].rc.hi;
  const int my_row = warp * kWarpRows + lane / 2;
  const int half = lane & 1;  // the lane pair interleaves its row's columns (no shared bank)

  // One tile of scores and dO v^T for the warp's rows, in s_w and dp_w.
  auto score_tiles = [&](int64_t j0) {
    load_tile_async<T, D>(k_s, k + j0 * D, key_hi - j0);
    load_tile_async<T, D>(v_s, v + j0 * D, key_hi - j0);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    FragAcc acc[4];
    strip_times_tile_t<T, D>(q_s + warp * kWarpRows * Dims<D>::kLd, k_s, acc);
    store_strip<D>(s_w, acc);
    strip_times_tile_t<T, D>(do_s + warp * kWarpRows * Dims<D>::kLd, v_s, acc);
    store_strip<D>(dp_w, acc);
    __syncwarp();
  };

  if (p.rw.on) {  // D_i and F_i (attention_math.h's RowTermSums) need the whole row first
    const RowState<float> rs = rows[my_row];
    RowTermSums<float> sums;
    for (int64_t j0 = key_lo; j0 < key_hi; j0 += kTile) {
      score_tiles(j0);
      for (int c = 0; c < 32; ++c) {
        const int64_t j = j0 + 2 * c + half;
        if (j >= rs.rc.lo && j < rs.rc.hi) {
          const int e = (lane / 2) * kScoreLd + 2 * c + half;
          float sp, sig;
          softplus_and_sigmoid(rs.rc.scale * s_w[e], sp, sig);
          const float u = reweight_base(rs, sp);
          add_row_terms(sums, rs, sp, u, power_pm1(u, p.rw), dp_w[e]);
        }
      }
      __syncthreads();
    }
    sums.w_dp += __shfl_xor_sync(0xffffffffu, sums.w_dp, 1);
    sums.a_pm1_dp += __shfl_xor_sync(0xffffffffu, sums.a_pm1_dp, 1);
    sums.a_pm1 += __shfl_xor_sync(0xffffffffu, sums.a_pm1, 1);
    __syncwarp();
    if ((lane & 1) == 0) {
      float d, f;
      finish_row_terms(rs, sums, d, f);
      rows[my_row].d = d;
      rows[my_row].f = f;
      if (r0 + my_row < p.len_q) {
        p.row_terms[(head_row0 + r0 + my_row) * 2] = d;
        p.row_terms[(head_row0 + r0 + my_row) * 2 + 1] = f;
      }
    }
    __syncwarp();
  }

  FragAcc acc_dq[Dims<D>::kFrags];
#pragma unroll
  for (int n = 0; n < Dims<D>::kFrags; ++n) wmma::fill_fragment(acc_dq[n], 0.0f);
  const RowState<float> rs = rows[my_row];
  RunningScale running;  // fp16
  for (int64_t j0 = key_lo; j0 < key_hi; j0 += kTile) {
    score_tiles(j0);
    if constexpr (kRunningScale<T>) {
      // The gradients have no bound known in advance (LSSAR's grow as 1/xmax, LSSA's shrink as
      // sigmoid(c s) for c s << 0): they are computed into dp_w first, then stored times the
      // row's running scale.
      float g_max = 0.f;
      for (int c = 0; c < 32; ++c) {
        const int64_t j = j0 + 2 * c + half;
        const int e = (lane / 2) * kScoreLd + 2 * c + half;
        const float g = (j >= rs.rc.lo && j < rs.rc.hi) ? score_grad(rs, p.rw, s_w[e], dp_w[e]).grad_times_z : 0.f;
        dp_w[e] = g;
        g_max = fmaxf(g_max, fabsf(g));
      }
      const float factor = running.update(pair_max(g_max));
      if (__any_sync(0xffffffffu, factor != 1.f)) scale_strip_rows<D>(acc_dq, s_w, factor);
      const float g_mul = running.inverse();
      for (int c = 0; c < 32; ++c)
        g_w[(lane / 2) * kWeightLd + 2 * c + half] = CudaStore<T>::from(dp_w[(lane / 2) * kScoreLd + 2 * c + half] * g_mul);
    } else {
      for (int c = 0; c < 32; ++c) {
        const int64_t j = j0 + 2 * c + half;
        const int e = (lane / 2) * kScoreLd + 2 * c + half;
        // Without the row's 1/Z (applied when dQ is written), as for fp16.
        const float g = (j >= rs.rc.lo && j < rs.rc.hi) ? score_grad(rs, p.rw, s_w[e], dp_w[e]).grad_times_z : 0.f;
        g_w[(lane / 2) * kWeightLd + 2 * c + half] = CudaStore<T>::from(g);
      }
    }
    __syncwarp();
    weights_times_tile<T, D>(g_w, k_s, acc_dq);
    __syncthreads();
  }
  float* inv_z = L.score(smem, 0) + warp * kWarpRows * kScoreLd;
  __syncthreads();
  if (half == 0) inv_z[lane / 2] = kRunningScale<T> ? rs.inv_z * running.undo() : rs.inv_z;
  __syncwarp();
  float* stage = reinterpret_cast<float*>(k_s) + warp * kWarpRows * Dims<D>::kStageLd;
  write_strip<T, D>(acc_dq, stage, static_cast<T*>(p.grad_q) + (head_row0 + r0 + warp * kWarpRows) * D,
                    rows_valid - warp * kWarpRows, inv_z);
}

template <class T, int D>
__global__ void __launch_bounds__(kThreads) grad_kv_kernel(Params p) {
  extern __shared__ __align__(128) unsigned char smem[];
  constexpr Smem<T, D> L{4, 2, 2};
  const BlockCoords at = block_coords(p.len_k, p.heads_kv);
  const int64_t kv_row0 = (at.b * p.heads_kv + at.head) * p.len_k;
  const int64_t j0 = at.start, keys_valid = std::min<int64_t>(kTile, p.len_k - j0);
  T* k_s = L.tile(smem, 0);
  T* v_s = L.tile(smem, 1);
  T* q_s = L.tile(smem, 2);
  T* do_s = L.tile(smem, 3);
  RowState<float>* rows = L.rows(smem);
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  float* st_w = L.score(smem, 0) + warp * kWarpRows * kScoreLd;   // scores, keys x rows
  float* dpt_w = L.score(smem, 1) + warp * kWarpRows * kScoreLd;  // v dO^T, keys x rows
  T* wt_w = L.weight(smem, 0) + warp * kWarpRows * kWeightLd;
  T* gt_w = L.weight(smem, 1) + warp * kWarpRows * kWeightLd;

  load_tile_async<T, D>(k_s, static_cast<const T*>(p.k) + (kv_row0 + j0) * D, keys_valid);
  load_tile_async<T, D>(v_s, static_cast<const T*>(p.v) + (kv_row0 + j0) * D, keys_valid);
  cp_async_commit();
  int64_t first, last;
  rows_seeing_keys(p.mask, j0, j0 + keys_valid, first, last);
  FragAcc acc_dk[Dims<D>::kFrags], acc_dv[Dims<D>::kFrags];
#pragma unroll
  for (int n = 0; n < Dims<D>::kFrags; ++n) {
    wmma::fill_fragment(acc_dk[n], 0.0f);
    wmma::fill_fragment(acc_dv[n], 0.0f);
  }
  const int my_key = warp * kWarpRows + lane / 2;  // each lane pair shares a key, 32 rows each
  const int64_t key = j0 + my_key;
  const int half = lane & 1;  // the lane pair interleaves the rows (no shared bank)
  RunningScale running;  // fp16: the key's score gradients (dK), over every row and q head it sees
  for (int64_t hq = at.head * p.group; hq < (at.head + 1) * p.group; ++hq) {
    const int64_t head_row0 = (at.b * p.heads_q + hq) * p.len_q;
    for (int64_t r0 = first; r0 < last; r0 += kTile) {
      const int64_t rows_valid = std::min<int64_t>(kTile, last - r0);  // rows that see no key are not read
      __syncthreads();  // the previous tile's q_s, do_s and rows are done with
      load_tile_async<T, D>(q_s, static_cast<const T*>(p.q) + (head_row0 + r0) * D, rows_valid);
      load_tile_async<T, D>(do_s, static_cast<const T*>(p.grad_out) + (head_row0 + r0) * D, rows_valid);
      cp_async_commit();
      if (threadIdx.x < kTile) rows[threadIdx.x] = load_row_state(p, head_row0, r0 + threadIdx.x, true);
      cp_async_wait<0>();
      __syncthreads();
      FragAcc acc[4];
      strip_times_tile_t<T, D>(k_s + warp * kWarpRows * Dims<D>::kLd, q_s, acc);
      store_strip<D>(st_w, acc);
      strip_times_tile_t<T, D>(v_s + warp * kWarpRows * Dims<D>::kLd, do_s, acc);
      store_strip<D>(dpt_w, acc);
      __syncwarp();
      float g_max = 0.f;
      for (int c = 0; c < 32; ++c) {
        const RowState<float>& rs = rows[2 * c + half];
        const int e = (lane / 2) * kScoreLd + 2 * c + half;
        ScoreGrad<float> sg{0.f, 0.f, 0.f};
        if (key >= rs.rc.lo && key < rs.rc.hi) sg = score_grad(rs, p.rw, st_w[e], dpt_w[e]);
        wt_w[(lane / 2) * kWeightLd + 2 * c + half] = CudaStore<T>::from(sg.value_weight * kValueScale<T>);
        if constexpr (kRunningScale<T>) {  // stored times the key's running scale below
          dpt_w[e] = sg.grad;
          g_max = fmaxf(g_max, fabsf(sg.grad));
        } else {
          gt_w[(lane / 2) * kWeightLd + 2 * c + half] = CudaStore<T>::from(sg.grad);
        }
      }
      if constexpr (kRunningScale<T>) {
        const float factor = running.update(pair_max(g_max));
        if (__any_sync(0xffffffffu, factor != 1.f)) scale_strip_rows<D>(acc_dk, st_w, factor);
        const float g_mul = running.inverse();
        for (int c = 0; c < 32; ++c)
          gt_w[(lane / 2) * kWeightLd + 2 * c + half] = CudaStore<T>::from(dpt_w[(lane / 2) * kScoreLd + 2 * c + half] * g_mul);
      }
      __syncwarp();
      weights_times_tile<T, D>(wt_w, do_s, acc_dv);
      weights_times_tile<T, D>(gt_w, q_s, acc_dk);
    }
  }
  cp_async_wait<0>();  // (a block that saw no rows still has its k/v loads in flight)
  __syncthreads();
  float* unit = reinterpret_cast<float*>(rows);  // 64 undoings of the keys' scales, then 64 of kValueScale
  if (half == 0) unit[my_key] = kRunningScale<T> ? running.undo() : 1.f;
  if (threadIdx.x < kTile) unit[kTile + threadIdx.x] = 1.f / kValueScale<T>;
  __syncthreads();
  float* stage = L.score(smem, 0) + warp * kWarpRows * Dims<D>::kStageLd;
  const int64_t out_row = (kv_row0 + j0 + warp * kWarpRows) * D;
  write_strip<T, D>(acc_dk, stage, static_cast<T*>(p.grad_k) + out_row, keys_valid - warp * kWarpRows,
                    unit + warp * kWarpRows);
  __syncthreads();
  write_strip<T, D>(acc_dv, stage, static_cast<T*>(p.grad_v) + out_row, keys_valid - warp * kWarpRows,
                    unit + kTile + warp * kWarpRows);
}

// ---- host side --------------------------------------------------------------------------------

template <class Kernel>
void launch(Kernel kernel, size_t smem_bytes, int64_t blocks, const Params& params, cudaStream_t stream) {
  FL_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes)));
  kernel<<<static_cast<unsigned>(blocks), kThreads, smem_bytes, stream>>>(params);
  FL_CUDA_CHECK_LAUNCH(softplus_attention_kernel);
}

// The opt-in shared-memory limit of `device` (227 KB on H100, 163 KB on A100, 99 KB on sm_86/89):
// every kernel of a call is checked before the first launch, so a refused call changes nothing.
void require_shared_memory(const AttentionProblem& p, int device, size_t bytes, const char* pass) {
  int limit = 0;
  FL_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  FL_CHECK_ARG(bytes <= static_cast<size_t>(limit), p.op_name, ": the ", pass, " kernel for head_dim ", p.head_dim,
               " needs ", bytes, " bytes of shared memory per block and this GPU allows ", limit,
               " (the backward needs an sm_80/sm_90-class GPU for head_dim 96 and 128)");
}

int64_t blocks_of(int64_t length, int64_t heads, int64_t batch) {
  const int64_t blocks = (length + kTile - 1) / kTile * heads * batch;
  FL_CHECK_ARG(blocks < (int64_t(1) << 31), "fastloss.softplus_attention: too many blocks for one launch");
  return blocks;
}

}  // namespace

int64_t forward_cuda_workspace_bytes(const AttentionProblem& p, int device) {
  CudaDeviceGuard guard(device);
  return decode_workspace_bytes(p, device);
}

void forward_cuda(const AttentionProblem& p, void* out, void* stats, void* workspace, int64_t workspace_bytes,
                  int device, cudaStream_t stream) {
  check_cuda_problem(p, {p.q, p.k, p.v, out});
  if (p.batch * p.heads_q * p.len_q == 0) return;
  CudaDeviceGuard guard(device);
  if (decode_workspace_bytes(p, device) > 0) {  // one row per head: split the keys instead
    decode_forward_cuda(p, out, stats, workspace, workspace_bytes, device, stream);
    return;
  }
  Params params = make_params(p);
  params.out = out;
  params.stats = static_cast<float*>(stats);
  dispatch(p, [&](auto type_tag, auto dim_tag) {
    using T = decltype(type_tag);
    constexpr int D = decltype(dim_tag)::value;
    constexpr Smem<T, D> layout{3, 1, 1};
    require_shared_memory(p, device, layout.bytes(), "forward");
    launch(forward_kernel<T, D>, layout.bytes(), blocks_of(p.len_q, p.heads_q, p.batch), params, stream);
  });
}

void backward_cuda(const AttentionProblem& p, const BackwardArgs& a, int device, cudaStream_t stream) {
  check_cuda_problem(p, {p.q, p.k, p.v, a.out, a.grad_out, a.grad_q, a.grad_k, a.grad_v});
  CudaDeviceGuard guard(device);
  if (p.batch * p.heads_q * p.len_q == 0) {  // no query rows: the keys and values get no gradient
    const size_t bytes = static_cast<size_t>(p.batch * p.heads_kv * p.len_k * p.head_dim) * dtype_size(p.dtype);
    if (bytes > 0) {
      FL_CUDA_CHECK(cudaMemsetAsync(a.grad_k, 0, bytes, stream));
      FL_CUDA_CHECK(cudaMemsetAsync(a.grad_v, 0, bytes, stream));
    }
    return;
  }
  Params params = make_params(p);
  params.out = const_cast<void*>(a.out);
  params.stats = static_cast<float*>(const_cast<void*>(a.stats));
  params.grad_out = a.grad_out;
  params.grad_q = a.grad_q;
  params.grad_k = a.grad_k;
  params.grad_v = a.grad_v;
  params.row_terms = static_cast<float*>(a.row_terms);
  dispatch(p, [&](auto type_tag, auto dim_tag) {
    using T = decltype(type_tag);
    constexpr int D = decltype(dim_tag)::value;
    constexpr Smem<T, D> q_layout{4, 2, 1};
    constexpr Smem<T, D> kv_layout{4, 2, 2};
    require_shared_memory(p, device, q_layout.bytes(), "dQ");
    require_shared_memory(p, device, kv_layout.bytes(), "dK/dV");
    const int64_t total_rows = p.batch * p.heads_q * p.len_q;
    const int64_t term_blocks = (total_rows + kWarps - 1) / kWarps;
    FL_CHECK_ARG(term_blocks < (int64_t(1) << 31), p.op_name, ": too many rows for one launch");
    row_terms_kernel<T><<<static_cast<unsigned>(term_blocks), kThreads, 0, stream>>>(params, total_rows, D);
    FL_CUDA_CHECK_LAUNCH(row_terms_kernel);
    launch(grad_q_kernel<T, D>, q_layout.bytes(), blocks_of(p.len_q, p.heads_q, p.batch), params, stream);
    launch(grad_kv_kernel<T, D>, kv_layout.bytes(), blocks_of(p.len_k, p.heads_kv, p.batch), params, stream);
  });
}

}  // namespace fl::attention
