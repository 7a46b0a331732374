// Pairwise metric-learning and contrastive losses: torch-free entry points.
//
// Every loss here is a function of the similarity matrix S = X Y^T (rows: queries x_i, columns:
// references y_j; Y is X itself unless a separate reference set is given) and of which pairs are
// positive, negative or excluded (the self pair). Its gradient is two products with W = dL/dS
// (the General Pair Weighting view of the Multi-Similarity paper): dX = W Y, dY = W^T X.
//
// The kernels walk blocks of query rows. For each block they compute the block's rows of S (never
// the whole matrix: memory O(rows_per_block x m) per thread), the per-row loss terms, and in the
// backward the rows of W and the two products. Labels are int64 vectors, never n x m masks.
// Normalization of the embeddings (cosine similarity) is done by the caller, in torch.
#pragma once

#include <cstdint>

#include "common/device_error.h"
#include "common/dtype.h"
#include "common/stream.h"

namespace fl::metric {

enum class LossKind : int {
  InfoNCE = 0,           // p0 = logit scale; targets (or the diagonal) are the positives
  NTXent = 1,            // p0 = temperature
  SupCon = 2,            // p0 = temperature
  MultiSimilarity = 3,   // p0 = alpha, p1 = beta, p2 = base, p3 = epsilon; option = 1: mining
  Circle = 4,            // p0 = m, p1 = gamma
  Contrastive = 5,       // p0 = pos_margin, p1 = neg_margin; option = 0: euclidean, 1: cosine
  Triplet = 6,           // p0 = margin, p1 = mining margin; option = TripletMining
  AUC = 7,               // p0 = temperature; targets (or the diagonal) are the positives
  DecoupledSoftmax = 8,  // p0 = temperature; positives as per-row lists (pos_ptr, pos_idx)
};

enum class TripletMining : int { All = 0, BatchHard = 1, SemiHard = 2 };

// Per-row statistics saved by the forward for the backward (accumulator type).
constexpr int kRowStats = 4;
// Per-row outputs: two sub-losses (most losses use the first only; contrastive: positive and
// negative pairs) and two counts (what the PML-style reducers divide by).
constexpr int kRowTerms = 2;

struct PairProblem {
  DType dtype = DType::Float32;  // of x and y (CPU: float32 or float64)
  int64_t n = 0, m = 0, dim = 0;
  const void* x = nullptr;  // (n, dim)
  const void* y = nullptr;  // (m, dim)
  const int64_t* labels_x = nullptr;  // (n): class labels of the rows (label-based losses)
  const int64_t* labels_y = nullptr;  // (m)
  const int64_t* targets = nullptr;   // (n): the positive column of each row (InfoNCE, AUC); null = i
  const int64_t* pos_ptr = nullptr;   // (n + 1): row i's positives are pos_idx[pos_ptr[i] .. pos_ptr[i + 1])
  const int64_t* pos_idx = nullptr;
  int64_t self_offset = -1;  // the pair (i, i + self_offset) is the self pair, neither positive nor negative; -1: none
  LossKind kind = LossKind::InfoNCE;
  double p0 = 0, p1 = 0, p2 = 0, p3 = 0;
  int option = 0;
  bool symmetric = false;  // InfoNCE: also the column losses (CLIP), from the same rows of S
  const char* op_name = "fastloss.metric";
  // CUDA forward: an index outside its range (targets or pos_idx outside [0, m), a pos_ptr that
  // decreases or leaves pos_idx) is reported here as (which: 0 targets, 1 pos_idx, 2 pos_ptr, position,
  // value); the kernels give a NaN row (targets) or skip the entry (pos_idx) as before.
  DeviceErrorSlot error;
  int64_t pos_entries = 0;  // the length of pos_idx, for that check
};

void validate(const PairProblem& p);

// row_terms (n, kRowTerms) losses, row_counts (n, kRowTerms), row_stats (n, kRowStats),
// col_terms (m) and col_stats (m) when symmetric (else unused); all in the accumulator type.
// With unit_grad_x set (single-term losses, not symmetric), the forward also writes the gradient of
// sum_i row_terms[i][0] with respect to x (n, dim), y (m, dim) and the scale (1), and row_active (n):
// 1 where row i's gradient row is not all zero. A backward whose upstream gradient is the same c for
// every active row is then c times these (fastloss.metric checks that), with no second pass.
struct ForwardOut {
  void* row_terms = nullptr;
  void* row_counts = nullptr;
  void* row_stats = nullptr;
  void* col_terms = nullptr;
  void* col_stats = nullptr;
  void* unit_grad_x = nullptr;
  void* unit_grad_y = nullptr;
  void* unit_grad_scale = nullptr;
  void* row_active = nullptr;
};
void forward_cpu(const PairProblem& p, const ForwardOut& out);

// grad_row (n, kRowTerms) and grad_col (m) are the upstream gradients of row_terms and col_terms.
// grad_x like x, grad_y like y (accumulator type), grad_scale: one accumulator (InfoNCE: the
// gradient with respect to the logit scale; else 0).
struct BackwardArgs {
  const void* row_stats = nullptr;
  const void* col_stats = nullptr;
  const void* grad_row = nullptr;
  const void* grad_col = nullptr;
  void* grad_x = nullptr;
  void* grad_y = nullptr;
  void* grad_scale = nullptr;
};
void backward_cpu(const PairProblem& p, const BackwardArgs& a);

#if defined(FASTLOSS_WITH_CUDA)
// The same entry points on the GPU (metric_cuda.cu): x and y in float32, float16 or bfloat16 (every
// output in float32). S is computed in chunks of query rows (the chunk's rows of S, their pair
// classes and, with a gradient, their rows of W live in the workspace, whose size
// cuda_workspace_bytes gives and which is bounded by a fixed budget), so the rows see whole rows of
// S exactly as on the CPU. No atomics: deterministic.
int64_t cuda_workspace_bytes(const PairProblem& p, bool gradient);
// The workspace budget of the chunks of rows (0: the default, 256 MB). Tests set a small one to run
// many chunks on small batches.
void set_cuda_chunk_budget(int64_t bytes);
void forward_cuda(const PairProblem& p, const ForwardOut& out, void* workspace, int64_t workspace_bytes, int device,
                  cudaStream_t stream);
void backward_cuda(const PairProblem& p, const BackwardArgs& a, void* workspace, int64_t workspace_bytes, int device,
                   cudaStream_t stream);
#endif

}  // namespace fl::metric
