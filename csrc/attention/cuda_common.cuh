// What the softplus-attention CUDA kernels share (attention_cuda.cu: the tiled kernels;
// decode_cuda.cu: the split-KV decode step): the by-value kernel parameters, the dispatch on
// element type and head dim, and the pointer checks. Include only from .cu files.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <type_traits>

#include "attention/attention_kernels.h"
#include "attention/attention_math.h"
#include "common/cuda_check.cuh"

namespace fl::attention::cuda_detail {

// Everything the kernels read about a call (a by-value kernel argument).
struct Params {
  Masking mask;
  ScaleRule rule;
  Reweight rw;
  int64_t heads_q, heads_kv, len_q, len_k, group;
  int stats_per_row;
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* stats;
  const void* grad_out;
  void* grad_q;
  void* grad_k;
  void* grad_v;
  float* row_terms;
};

inline Params make_params(const AttentionProblem& p) {
  Params k{};
  k.mask = Masking{p.len_q, p.len_k, p.cu_seqlens, p.documents, p.causal, p.window};
  k.rule = ScaleRule{p.scale_mode == ScaleMode::Length, std::log(static_cast<double>(p.head_dim)), p.scale,
                     p.reweight_offset_rows};
  k.rw = Reweight{p.reweight(), p.reweight_power, integer_power(p.reweight_power)};
  k.heads_q = p.heads_q;
  k.heads_kv = p.heads_kv;
  k.len_q = p.len_q;
  k.len_k = p.len_k;
  k.group = p.heads_q / p.heads_kv;
  k.stats_per_row = static_cast<int>(p.stats_per_row());
  k.q = p.q;
  k.k = p.k;
  k.v = p.v;
  return k;
}

// Calls fn(T{}, integral_constant<int, D>{}) for the problem's element type (__half or
// __nv_bfloat16) and head dim; anything else is refused with an error naming it.
template <class Fn>
void dispatch(const AttentionProblem& p, Fn&& fn) {
  FL_CHECK_ARG(p.dtype == DType::Float16 || p.dtype == DType::BFloat16, p.op_name,
               ": the CUDA kernels take float16 or bfloat16, got ", dtype_name(p.dtype));
  auto by_dim = [&](auto type_tag) {
    using T = decltype(type_tag);
    switch (p.head_dim) {
      case 32: fn(T{}, std::integral_constant<int, 32>{}); return;
      case 64: fn(T{}, std::integral_constant<int, 64>{}); return;
      case 96: fn(T{}, std::integral_constant<int, 96>{}); return;
      case 128: fn(T{}, std::integral_constant<int, 128>{}); return;
      default: fl::throw_invalid_argument(p.op_name, ": the CUDA kernels take head_dim 32, 64, 96 or 128, got ", p.head_dim);
    }
  };
  if (p.dtype == DType::Float16) by_dim(__half{}); else by_dim(__nv_bfloat16{});
}

inline void check_cuda_problem(const AttentionProblem& p, std::initializer_list<const void*> pointers) {
  validate(p);
  for (const void* ptr : pointers)
    FL_CHECK_ARG(reinterpret_cast<uintptr_t>(ptr) % 16 == 0, p.op_name,
                 ": CUDA tensors must start at a 16-byte aligned address (cp.async tile loads)");
}

}  // namespace fl::attention::cuda_detail

namespace fl::attention {
// The split-KV decode step (decode_cuda.cu): workspace 0 when the problem is not a decode step.
int64_t decode_workspace_bytes(const AttentionProblem& p, int device);
void decode_forward_cuda(const AttentionProblem& p, void* out, void* stats, void* workspace, int64_t workspace_bytes,
                         int device, cudaStream_t stream);
}  // namespace fl::attention
