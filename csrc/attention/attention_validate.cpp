// Checks of an AttentionProblem, shared by the CPU and CUDA entry points. The Python layer checks
// the same things first with torch's words; these keep the C++ API safe on its own.
#include "attention/attention_kernels.h"
#include "common/error.h"

namespace fl::attention {

void validate(const AttentionProblem& p) {
  const char* fn = p.op_name;
  FL_CHECK_ARG(p.batch >= 0 && p.len_q >= 0 && p.len_k >= 0, fn, ": sizes must be >= 0");
  FL_CHECK_ARG(p.head_dim >= 1, fn, ": head_dim must be >= 1, got ", p.head_dim);
  FL_CHECK_ARG(p.heads_kv >= 1 && p.heads_q >= 1 && p.heads_q % p.heads_kv == 0, fn,
               ": the query heads (", p.heads_q, ") must be a multiple of the key/value heads (", p.heads_kv, ")");
  FL_CHECK_ARG(p.len_q <= p.len_k, fn, ": query rows are aligned to the last keys, so len_q (", p.len_q,
               ") must be <= len_k (", p.len_k, ")");
  FL_CHECK_ARG(p.len_q == 0 || p.len_k >= 1, fn, ": there are queries but no keys");
  FL_CHECK_ARG(p.window >= 0, fn, ": window must be >= 0 (0: none), got ", p.window);
  FL_CHECK_ARG(p.reweight_power == 0.0 || p.reweight_power >= 1.0, fn, ": reweight must be >= 1, got ",
               p.reweight_power);
  FL_CHECK_ARG(p.reweight_offset_rows >= 0, fn, ": reweight_offset_rows must be >= 0");
  if (p.cu_seqlens != nullptr) {
    FL_CHECK_ARG(p.batch == 1 && p.len_q == p.len_k, fn,
                 ": with cu_seqlens the documents are packed into batch 1 with len_q == len_k");
    FL_CHECK_ARG(p.documents >= 1, fn, ": cu_seqlens must hold at least one document");
    // cu_seqlens itself (0 first, increasing, len_k last) is checked where it is readable: the
    // Python layer on the host, before a CUDA launch.
  }
  FL_CHECK_ARG(p.batch * p.heads_q * p.len_q == 0 || (p.q != nullptr && p.k != nullptr && p.v != nullptr), fn,
               ": null tensor pointer");
}

}  // namespace fl::attention
