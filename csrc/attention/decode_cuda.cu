// The decode step on CUDA: one query row per (batch, head) against a KV cache (len_q = 1). The
// tiled forward would give each head one block walking every key; here the keys are split over
// blocks (split-KV), each block reduces its share in fp32, and a small kernel combines the splits.
// The per-score math is attention_math.h's, as everywhere.
//
//   LSSA:  split pass (sum_j sp_j v_j, sum_j sp_j)  -> combine (out = acc / Z, stats Z)
//   LSSAR: split pass (Z, max sp) -> combine (Z, xmax into stats) -> split pass (sum u^p v, U)
//          -> combine (out = acc / U, stats U)
// Workspace: per (batch, head, split) D + 2 floats (decode_workspace_bytes).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "attention/attention_kernels.h"
#include "attention/attention_math.h"
#include "attention/cuda_common.cuh"
#include "common/cuda_check.cuh"
#include "common/cuda_numeric.cuh"

namespace fl::attention {
namespace {

using namespace cuda_detail;

constexpr int kDecodeWarps = 4;
constexpr int kDecodeThreads = kDecodeWarps * 32;
constexpr int64_t kMinKeysPerSplit = 128;
constexpr int64_t kBlocksPerSm = 8;  // a decode step is bandwidth-bound: many loads in flight

enum class DecodePass : int { Statistics = 0, Values = 1 };

struct Split {
  int64_t splits, keys_per_split;
};

// Enough splits of the row's visible keys (a window may make them few) for about kBlocksPerSm
// blocks per SM, each with at least kMinKeysPerSplit keys. The allocation (decode_workspace_bytes)
// and the launch both call this, so they agree.
Split choose_split(const AttentionProblem& p, int device) {
  const RowSpan span = row_span(make_params(p).mask, 0);
  const int64_t visible = std::max<int64_t>(1, span.hi - span.lo);
  const int64_t heads = p.batch * p.heads_q;
  const int64_t want = std::max<int64_t>(1, (kBlocksPerSm * cuda_sm_count(device) + heads - 1) / heads);
  const int64_t most = std::max<int64_t>(1, (visible + kMinKeysPerSplit - 1) / kMinKeysPerSplit);
  const int64_t splits = std::min(want, most);
  return Split{splits, (visible + splits - 1) / splits};
}

// The single row's state: before the statistics (pass 1 of LSSAR, or LSSA), or from them.
__device__ __forceinline__ RowState<float> decode_row(const Params& p, int64_t bh, bool from_stats) {
  const RowConstants<float> rc = row_constants<float>(p.mask, p.rule, 0);
  if (!from_stats) return row_state(rc, Reweight{false, 0.0, 0}, 0.f, 0.f, 0.f);
  const float* st = p.stats + bh * p.stats_per_row;
  return row_state(rc, p.rw, st[0], st[1], 1.f);
}

// One block: keys [lo + split * keys_per_split, ...) of one (batch, head); a 1-D grid of
// (batch * heads) x splits blocks, split fastest. Each warp takes every fourth key; each lane holds
// D/32 consecutive dims of q and of the value accumulator, and loads its part of v with k's, before
// the reduction of the dot product.
template <class T, int D>
__global__ void __launch_bounds__(kDecodeThreads) decode_split_kernel(Params p, Split split, DecodePass pass,
                                                                      float* partial) {
  constexpr int kPerLane = D / 32;
  __shared__ float q_s[D];
  __shared__ float reduce_s[kDecodeWarps][D + 2];
  const int64_t bh = blockIdx.x / split.splits, split_index = blockIdx.x % split.splits;
  const int64_t b = bh / p.heads_q, hq = bh % p.heads_q;
  const int64_t kv_row0 = (b * p.heads_kv + hq / p.group) * p.len_k;
  const int warp = threadIdx.x / 32, lane = threadIdx.x & 31;
  const bool values = pass == DecodePass::Values;
  const RowState<float> rs = decode_row(p, bh, values && p.rw.on);
  const Reweight rw = values ? p.rw : Reweight{false, 0.0, 0};
  const int64_t begin = rs.rc.lo + split_index * split.keys_per_split;
  const int64_t end = std::min<int64_t>(rs.rc.hi, begin + split.keys_per_split);
  const T* q = static_cast<const T*>(p.q) + bh * D;
  for (int c = threadIdx.x; c < D; c += kDecodeThreads) q_s[c] = to_acc(q[c]);
  __syncthreads();

  float acc[kPerLane] = {};
  float sum = 0.f, sp_max = 0.f;
  for (int64_t j = begin + warp; j < end; j += kDecodeWarps) {
    const T* k = static_cast<const T*>(p.k) + (kv_row0 + j) * D + lane * kPerLane;
    float v_part[kPerLane] = {};
    if (values) {
      const T* v = static_cast<const T*>(p.v) + (kv_row0 + j) * D + lane * kPerLane;
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) v_part[e] = to_acc(v[e]);
    }
    float dot = 0.f;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) dot += q_s[lane * kPerLane + e] * to_acc(k[e]);
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
    const float w = forward_weight(rs, rw, dot);  // sp in the statistics pass
    sum += w;
    sp_max = fmaxf(sp_max, w);
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) acc[e] += w * v_part[e];
  }
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) reduce_s[warp][lane * kPerLane + e] = acc[e];
  if (lane == 0) {
    reduce_s[warp][D] = sum;  // every lane holds the same sum and max
    reduce_s[warp][D + 1] = sp_max;
  }
  __syncthreads();
  float* out = partial + blockIdx.x * static_cast<int64_t>(D + 2);  // = (bh * splits + split_index) * (D + 2)
  for (int c = threadIdx.x; c < D + 2; c += kDecodeThreads) {
    float total = reduce_s[0][c];
    for (int w = 1; w < kDecodeWarps; ++w) total = c == D + 1 ? fmaxf(total, reduce_s[w][c]) : total + reduce_s[w][c];
    out[c] = total;
  }
}

// One block per (batch, head): sums the splits. Statistics: Z and xmax into stats. Values: out and
// the normalizer (Z for LSSA, U for LSSAR) into stats.
template <class T, int D>
__global__ void __launch_bounds__(kDecodeThreads) decode_combine_kernel(Params p, Split split, DecodePass pass,
                                                                        const float* partial) {
  const int64_t bh = blockIdx.x;
  const float* parts = partial + bh * split.splits * (D + 2);
  float* st = p.stats + bh * p.stats_per_row;
  if (pass == DecodePass::Statistics) {
    if (threadIdx.x == 0) {
      float z = 0.f, sp_max = 0.f;
      for (int64_t s = 0; s < split.splits; ++s) {
        z += parts[s * (D + 2) + D];
        sp_max = fmaxf(sp_max, parts[s * (D + 2) + D + 1]);
      }
      st[0] = z;
      st[1] = reweight_xmax(row_constants<float>(p.mask, p.rule, 0), z, sp_max);
    }
    return;
  }
  float total = 0.f;
  for (int64_t s = 0; s < split.splits; ++s) total += parts[s * (D + 2) + D];
  const RowState<float> rs = decode_row(p, bh, p.rw.on);
  const bool live = total > 0.f && (!p.rw.on || rs.inv_z > 0.f);
  const float inv = live ? 1.f / total : 0.f;
  T* out = static_cast<T*>(p.out) + bh * D;
  for (int c = threadIdx.x; c < D; c += kDecodeThreads) {
    float acc = 0.f;
    for (int64_t s = 0; s < split.splits; ++s) acc += parts[s * (D + 2) + c];
    out[c] = CudaStore<T>::from(acc * inv);
  }
  if (threadIdx.x == 0) st[p.rw.on ? 2 : 0] = total;
}

}  // namespace

int64_t decode_workspace_bytes(const AttentionProblem& p, int device) {
  if (p.len_q != 1 || p.cu_seqlens != nullptr || p.batch * p.heads_q == 0) return 0;
  const Split split = choose_split(p, device);
  return p.batch * p.heads_q * split.splits * (p.head_dim + 2) * static_cast<int64_t>(sizeof(float));
}

void decode_forward_cuda(const AttentionProblem& p, void* out, void* stats, void* workspace, int64_t workspace_bytes,
                         int device, cudaStream_t stream) {
  const Split split = choose_split(p, device);
  const int64_t heads = p.batch * p.heads_q;
  FL_CHECK_ARG(workspace_bytes >= decode_workspace_bytes(p, device) && workspace != nullptr, p.op_name,
               ": the decode workspace is too small");
  FL_CHECK_ARG(heads * split.splits < (int64_t(1) << 31), p.op_name, ": too many heads for one decode launch");
  Params params = make_params(p);
  params.out = out;
  params.stats = static_cast<float*>(stats);
  float* partial = static_cast<float*>(workspace);
  dispatch(p, [&](auto type_tag, auto dim_tag) {
    using T = decltype(type_tag);
    constexpr int D = decltype(dim_tag)::value;
    const unsigned split_grid = static_cast<unsigned>(heads * split.splits);
    if (p.reweight()) {
      decode_split_kernel<T, D><<<split_grid, kDecodeThreads, 0, stream>>>(params, split, DecodePass::Statistics,
                                                                          partial);
      FL_CUDA_CHECK_LAUNCH(decode_split_kernel);
      decode_combine_kernel<T, D><<<static_cast<unsigned>(heads), kDecodeThreads, 0, stream>>>(
          params, split, DecodePass::Statistics, partial);
      FL_CUDA_CHECK_LAUNCH(decode_combine_kernel);
    }
    decode_split_kernel<T, D><<<split_grid, kDecodeThreads, 0, stream>>>(params, split, DecodePass::Values, partial);
    FL_CUDA_CHECK_LAUNCH(decode_split_kernel);
    decode_combine_kernel<T, D><<<static_cast<unsigned>(heads), kDecodeThreads, 0, stream>>>(params, split,
                                                                                              DecodePass::Values,
                                                                                              partial);
    FL_CUDA_CHECK_LAUNCH(decode_combine_kernel);
  });
}

}  // namespace fl::attention
