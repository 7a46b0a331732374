// Softplus attention (LSSA, and LSSAR with re-weighting): torch-free entry points.
//
// Layout: q is (batch, heads_q, len_q, head_dim), k and v are (batch, heads_kv, len_k, head_dim),
// all contiguous; heads_q is a multiple of heads_kv (GQA / MQA). Query row i sits at key position
// i + len_k - len_q (bottom-right alignment), so len_q = 1 is a decode step against a KV cache.
// With cu_seqlens (batch = 1, len_q = len_k), rows and keys are packed documents and nothing crosses
// a document boundary. Every row sees one contiguous interval of keys (attention_rows.h).
//
// Math (attention_math.h), per row i with visible keys j:
//   s_ij = c_i * (q_i . k_j),  c_i = log(head_dim) * log(N_i) ("length" scale) or a fixed scale,
//   sp_ij = softplus(s_ij), Z_i = sum_j sp_ij, A_ij = sp_ij / Z_i                      (LSSA)
//   x_ij = N_i A_ij - o_i, u_ij = relu(x_ij) / max_j x_ij, W_ij = u_ij^p / sum_j u_ij^p  (LSSAR)
//   out_i = sum_j A_ij v_j (LSSA) or sum_j W_ij v_j (LSSAR; a row with max_j x_ij <= 0 gives 0).
// q and k arrive already l2-normalized when the caller wants cosine scores: the normalization and
// its gradient stay in torch.
#pragma once

#include <cstdint>

#include "common/dtype.h"

#if defined(FASTLOSS_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace fl::attention {

enum class ScaleMode : int { Length = 0, Fixed = 1 };

struct AttentionProblem {
  DType dtype = DType::Float32;  // of q, k, v, out, grad_out and the gradients
  int64_t batch = 0, heads_q = 0, heads_kv = 0, len_q = 0, len_k = 0, head_dim = 0;
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  // Packed documents: `documents + 1` increasing offsets from 0 to len_k (nullptr: one per batch).
  const int32_t* cu_seqlens = nullptr;
  int64_t documents = 0;
  bool causal = true;
  int64_t window = 0;  // > 0: a row sees at most this many keys (causal) or keys within window - 1 of it
  ScaleMode scale_mode = ScaleMode::Length;
  double scale = 0.0;           // the fixed scale (ScaleMode::Fixed)
  double reweight_power = 0.0;  // p of LSSAR; 0 is LSSA
  int64_t reweight_offset_rows = 3;  // rows at document positions below this have o_i = 0
  const char* op_name = "fastloss.softplus_attention";

  bool reweight() const { return reweight_power > 0.0; }
  // Per-row statistics saved by the forward for the backward, in the accumulator type:
  // LSSA: Z; LSSAR: Z, max_j x_ij, sum_j u_ij^p. Stored as (batch, heads_q, len_q, stats_per_row).
  int64_t stats_per_row() const { return reweight() ? 3 : 1; }
};

// Raises std::invalid_argument naming the argument when the problem is inconsistent. Every entry
// point calls it before touching memory.
void validate(const AttentionProblem& p);

// out: like q. stats: (batch, heads_q, len_q, stats_per_row) in the accumulator type.
void forward_cpu(const AttentionProblem& p, void* out, void* stats);

// grad_q like q; grad_k, grad_v like k. row_terms: (batch, heads_q, len_q, 2) accumulator workspace
// (D_i = dO_i . out_i and, for LSSAR, F_i). No atomics: dQ and dK/dV are separate passes, so the
// result is the same at every run.
struct BackwardArgs {
  const void* out = nullptr;
  const void* grad_out = nullptr;
  const void* stats = nullptr;
  void* grad_q = nullptr;
  void* grad_k = nullptr;
  void* grad_v = nullptr;
  void* row_terms = nullptr;
};
void backward_cpu(const AttentionProblem& p, const BackwardArgs& a);

#if defined(FASTLOSS_WITH_CUDA)
// float16 / bfloat16 with head_dim in {32, 64, 96, 128} on tensor cores (WMMA); float32 and other
// head dims are refused with an error naming them. A decode step (len_q = 1, no cu_seqlens) splits
// the keys over blocks and needs forward_cuda_workspace_bytes() of workspace (0 otherwise).
int64_t forward_cuda_workspace_bytes(const AttentionProblem& p, int device);
void forward_cuda(const AttentionProblem& p, void* out, void* stats, void* workspace, int64_t workspace_bytes,
                  int device, cudaStream_t stream);
void backward_cuda(const AttentionProblem& p, const BackwardArgs& a, int device, cudaStream_t stream);
#endif

}  // namespace fl::attention
