// CPU kernels of softplus attention: FlashAttention-style tiles (64 query rows x 64 keys) that never
// hold more than one score tile per thread, so memory is O(N d) at any length. Inputs are float32 or
// float64 (fastloss.attention upcasts float16/bfloat16 on the CPU); the math is attention_math.h's.
//
// forward:  per (batch, head, row block): [LSSAR: a statistics sweep for Z_i and max_j sp_ij],
//           then the weighted sum of values.
// backward: pass A per (batch, head, row block): D_i, [LSSAR: a sweep for F_i], and dQ;
//           pass B per (batch, kv head, key block): dK and dV over the rows (and q heads) that see
//           the block. No thread writes another's output, so the result is deterministic.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "attention/attention_kernels.h"
#include "attention/attention_math.h"
#include "common/cpu_multiversion.h"
#include "common/cpu_tile_gemm.h"
#include "common/parallel.h"

namespace fl::attention {
namespace {

constexpr int64_t kRows = 64;  // query rows per tile
constexpr int64_t kKeys = 64;  // keys per tile

// Pointers and shapes of one call, typed.
template <class Acc>
struct View {
  const AttentionProblem& p;
  Masking mask;
  ScaleRule rule;
  Reweight rw;
  const Acc* q;
  const Acc* k;
  const Acc* v;
  int64_t dim, group;

  explicit View(const AttentionProblem& prob)
      : p(prob),
        q(static_cast<const Acc*>(prob.q)),
        k(static_cast<const Acc*>(prob.k)),
        v(static_cast<const Acc*>(prob.v)),
        dim(prob.head_dim),
        group(prob.heads_q / prob.heads_kv) {
    mask = Masking{prob.len_q, prob.len_k, prob.cu_seqlens, prob.documents, prob.causal, prob.window};
    rule = ScaleRule{prob.scale_mode == ScaleMode::Length, std::log(static_cast<double>(prob.head_dim)), prob.scale,
                     prob.reweight_offset_rows};
    rw = Reweight{prob.reweight(), prob.reweight_power, integer_power(prob.reweight_power)};
  }
  // Offsets of (b, head, row 0) in the q-shaped and k-shaped tensors.
  int64_t q_offset(int64_t b, int64_t hq) const { return (b * p.heads_q + hq) * p.len_q * dim; }
  int64_t k_offset(int64_t b, int64_t hkv) const { return (b * p.heads_kv + hkv) * p.len_k * dim; }
  int64_t row_index(int64_t b, int64_t hq, int64_t row) const { return (b * p.heads_q + hq) * p.len_q + row; }
};

// Scratch of one thread for one tile loop.
template <class Acc>
struct Scratch {
  std::vector<Acc> kt, vt, s, dp, w, g, wt, gt;
  explicit Scratch(int64_t dim)
      : kt(dim * kKeys), vt(dim * kKeys), s(kRows * kKeys), dp(kRows * kKeys), w(kRows * kKeys), g(kRows * kKeys),
        wt(kKeys * kRows), gt(kKeys * kRows) {}
};

// sc.s = q k^T for keys [j0, j0 + count) of the head; with dout, also sc.dp = dO v^T. (Helpers, not
// lambdas: a lambda is its own function, which GCC may leave un-inlined and so without AVX2.)
template <class Acc>
FL_CPU_INLINE void score_tile(const Acc* q, int64_t rows, const Acc* k, int64_t j0, int64_t count, int64_t dim,
                              Scratch<Acc>& sc) {
  tile_transpose(count, dim, k + j0 * dim, dim, sc.kt.data(), kKeys);
  tile_gemm(rows, count, dim, q, dim, sc.kt.data(), kKeys, sc.s.data(), kKeys, false);
}
template <class Acc>
FL_CPU_INLINE void score_and_dp_tile(const Acc* q, const Acc* dout, int64_t rows, const Acc* k, const Acc* v,
                                     int64_t j0, int64_t count, int64_t dim, Scratch<Acc>& sc) {
  score_tile(q, rows, k, j0, count, dim, sc);
  tile_transpose(count, dim, v + j0 * dim, dim, sc.vt.data(), kKeys);
  tile_gemm(rows, count, dim, dout, dim, sc.vt.data(), kKeys, sc.dp.data(), kKeys, false);
}

// The score math of attention_math.h over one row of a tile, pass by pass so that every loop is
// branch-free and vectorizes (the per-score composition, as on the GPU, stays scalar on the CPU).

// sp and sig of the row's scores; for LSSAR also u. Invisible scores get sp = u = 0. (Two loops:
// a branch on `reweight` inside one keeps GCC from vectorizing it.)
template <class Acc>
FL_CPU_INLINE void row_softplus(const RowState<Acc>& row, bool reweight, const Acc* s, int64_t count, int64_t lo,
                                int64_t hi, Acc* sp, Acc* sig, Acc* u) {
  const Acc c = row.rc.scale;
#pragma omp simd
  for (int64_t t = 0; t < count; ++t) {
    Acc value, slope;
    softplus_and_sigmoid(c * s[t], value, slope);
    sp[t] = t >= lo && t < hi ? value : Acc(0);
    sig[t] = slope;
  }
  if (!reweight) return;
  const RowState<Acc> local = row;  // field loads out of the loop
#pragma omp simd
  for (int64_t t = 0; t < count; ++t) {
    const Acc base = reweight_base(local, sp[t]);
    u[t] = t >= lo && t < hi ? base : Acc(0);
  }
}

// out[t] = u[t]^(p-1) (power_pm1), as passes of power_step over the row.
template <class Acc>
FL_CPU_INLINE void row_power_pm1(const Reweight& rw, const Acc* u, int64_t count, Acc* out) {
  if (rw.integer_p == 0) {
    for (int64_t t = 0; t < count; ++t) out[t] = power_pm1(u[t], rw);
    return;
  }
  Acc base[kKeys];
#pragma omp simd
  for (int64_t t = 0; t < count; ++t) {
    out[t] = Acc(1);
    base[t] = u[t];
  }
  for (int e = rw.integer_p - 1; e > 0; e >>= 1) {
    const bool bit = (e & 1) != 0;
#pragma omp simd
    for (int64_t t = 0; t < count; ++t) power_step(out[t], base[t], bit);
  }
#pragma omp simd
  for (int64_t t = 0; t < count; ++t) out[t] = u[t] > Acc(0) ? out[t] : Acc(0);
}

// ---- forward ----------------------------------------------------------------------------------

template <class Acc>
FL_CPU_MULTIVERSION void forward_block(const View<Acc>& view, int64_t b, int64_t hq, int64_t r0, int64_t rows,
                                       Scratch<Acc>& sc, std::vector<Acc>& acc, Acc* out, Acc* stats) {
  const int64_t dim = view.dim;
  const Acc* q = view.q + view.q_offset(b, hq) + r0 * dim;
  const Acc* k = view.k + view.k_offset(b, hq / view.group);
  const Acc* v = view.v + view.k_offset(b, hq / view.group);
  RowState<Acc> row[kRows];
  Acc z[kRows], sp_max[kRows], u_sum[kRows];
  for (int64_t r = 0; r < rows; ++r) {
    row[r] = row_state(row_constants<Acc>(view.mask, view.rule, r0 + r), Reweight{false, 0, 0}, Acc(0), Acc(0), Acc(0));
    z[r] = sp_max[r] = u_sum[r] = Acc(0);
  }
  const int64_t key_lo = row[0].rc.lo, key_hi = row[rows - 1].rc.hi;

  if (view.rw.on) {  // statistics sweep: Z_i and max_j sp_ij
    for (int64_t j0 = key_lo; j0 < key_hi; j0 += kKeys) {
      const int64_t count = std::min(kKeys, key_hi - j0);
      score_tile(q, rows, k, j0, count, dim, sc);
      for (int64_t r = 0; r < rows; ++r) {
        Acc* sp = sc.w.data() + r * kKeys;
        row_softplus(row[r], false, sc.s.data() + r * kKeys, count, row[r].rc.lo - j0, row[r].rc.hi - j0, sp,
                     sc.g.data(), sc.dp.data());
        Acc zr = 0, mr = sp_max[r];
#pragma omp simd reduction(+ : zr) reduction(max : mr)
        for (int64_t t = 0; t < count; ++t) {
          zr += sp[t];  // invisible scores are 0, and every sp >= 0
          mr = sp[t] > mr ? sp[t] : mr;
        }
        z[r] += zr;
        sp_max[r] = mr;
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const Acc xmax = reweight_xmax(row[r].rc, z[r], sp_max[r]);
      // The sum U is not known yet: a unit placeholder; the pass below normalizes by its own sum.
      row[r] = row_state(row[r].rc, view.rw, z[r], xmax, Acc(1));
      sp_max[r] = xmax;
    }
  }

  std::fill(acc.begin(), acc.begin() + rows * dim, Acc(0));
  for (int64_t j0 = key_lo; j0 < key_hi; j0 += kKeys) {
    const int64_t count = std::min(kKeys, key_hi - j0);
    score_tile(q, rows, k, j0, count, dim, sc);
    for (int64_t r = 0; r < rows; ++r) {
      Acc* w = sc.w.data() + r * kKeys;
      Acc* u = sc.dp.data() + r * kKeys;
      row_softplus(row[r], view.rw.on, sc.s.data() + r * kKeys, count, row[r].rc.lo - j0, row[r].rc.hi - j0, w,
                   sc.g.data() + r * kKeys, u);
      if (view.rw.on) {  // w = u^(p-1) u
        row_power_pm1(view.rw, u, count, w);
#pragma omp simd
        for (int64_t t = 0; t < count; ++t) w[t] *= u[t];
      }
      Acc sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t t = 0; t < count; ++t) sum += w[t];
      u_sum[r] += sum;
    }
    tile_gemm(rows, dim, count, sc.w.data(), kKeys, v + j0 * dim, dim, acc.data(), dim, true);
  }

  for (int64_t r = 0; r < rows; ++r) {
    // u_sum is the sum of the weights: Z for LSSA, U for LSSAR (whose dead rows have inv_z = 0).
    const Acc inv = u_sum[r] > Acc(0) && (!view.rw.on || row[r].inv_z > Acc(0)) ? Acc(1) / u_sum[r] : Acc(0);
    Acc* orow = out + (view.q_offset(b, hq) + (r0 + r) * dim);
    for (int64_t t = 0; t < dim; ++t) orow[t] = acc[r * dim + t] * inv;
    Acc* st = stats + view.row_index(b, hq, r0 + r) * view.p.stats_per_row();
    if (view.rw.on) {
      st[0] = z[r];
      st[1] = sp_max[r];
      st[2] = u_sum[r];
    } else {
      st[0] = u_sum[r];
    }
  }
}

template <class Acc>
void forward_typed(const AttentionProblem& p, Acc* out, Acc* stats) {
  const View<Acc> view(p);
  const int64_t blocks = (p.len_q + kRows - 1) / kRows;
  const int64_t items = p.batch * p.heads_q * blocks;
  parallel_for(items, 1, [&](int64_t begin, int64_t end) {
    Scratch<Acc> sc(p.head_dim);
    std::vector<Acc> acc(kRows * p.head_dim);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / blocks, r0 = (item % blocks) * kRows;
      forward_block(view, bh / p.heads_q, bh % p.heads_q, r0, std::min(kRows, p.len_q - r0), sc, acc, out, stats);
    }
  });
}

// ---- backward ---------------------------------------------------------------------------------

// The row states of rows [r0, r0 + rows) of head (b, hq) from the saved statistics and D_i, F_i.
template <class Acc>
void load_rows(const View<Acc>& view, const Acc* stats, const Acc* row_terms, int64_t b, int64_t hq, int64_t r0,
               int64_t rows, RowState<Acc>* row) {
  const int64_t per = view.p.stats_per_row();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t index = view.row_index(b, hq, r0 + r);
    const Acc* st = stats + index * per;
    const RowConstants<Acc> rc = row_constants<Acc>(view.mask, view.rule, r0 + r);
    row[r] = view.rw.on ? row_state(rc, view.rw, st[0], st[1], st[2]) : row_state(rc, view.rw, st[0], Acc(0), Acc(0));
    row[r].d = row_terms[index * 2];
    row[r].f = row_terms[index * 2 + 1];
  }
}

// The score math of one tile of the backward: sc.s = q k^T and sc.dp = dO v^T in. Without `sums`:
// sc.g (score gradients) and sc.w (value weights) out. With `sums` (LSSAR's pre-pass): only the
// per-row sums for D_i and F_i.
template <class Acc>
FL_CPU_INLINE void tile_score_grads(const View<Acc>& view, const RowState<Acc>* row, int64_t rows, int64_t j0,
                                    int64_t count, Scratch<Acc>& sc, RowTermSums<Acc>* sums) {
  Acc sp[kKeys], sig[kKeys], u[kKeys], u_pm1[kKeys];
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t lo = row[r].rc.lo - j0, hi = row[r].rc.hi - j0;
    row_softplus(row[r], view.rw.on, sc.s.data() + r * kKeys, count, lo, hi, sp, sig, u);
    if (view.rw.on) {
      row_power_pm1(view.rw, u, count, u_pm1);
    } else {
      std::fill(u, u + count, Acc(0));
      std::fill(u_pm1, u_pm1 + count, Acc(0));
    }
    const Acc* dprow = sc.dp.data() + r * kKeys;
    if (sums != nullptr) {  // invisible scores have sp = u = 0, so they add nothing
      Acc w_dp = 0, a_pm1_dp = 0, a_pm1 = 0;
      const RowState<Acc> local = row[r];
#pragma omp simd reduction(+ : w_dp, a_pm1_dp, a_pm1)
      for (int64_t t = 0; t < count; ++t) {
        RowTermSums<Acc> one;
        add_row_terms(one, local, sp[t], u[t], u_pm1[t], dprow[t]);
        w_dp += one.w_dp;
        a_pm1_dp += one.a_pm1_dp;
        a_pm1 += one.a_pm1;
      }
      sums[r].w_dp += w_dp;
      sums[r].a_pm1_dp += a_pm1_dp;
      sums[r].a_pm1 += a_pm1;
      continue;
    }
    Acc* grow = sc.g.data() + r * kKeys;
    Acc* wrow = sc.w.data() + r * kKeys;
#pragma omp simd
    for (int64_t t = 0; t < count; ++t) {
      const ScoreGrad<Acc> sg = score_grad_parts(row[r], view.rw.on, sp[t], sig[t], u[t], u_pm1[t], dprow[t]);
      const bool visible = t >= lo && t < hi;
      grow[t] = visible ? sg.grad : Acc(0);
      wrow[t] = visible ? sg.value_weight : Acc(0);
    }
  }
}

// Pass A: D_i (LSSA: dO_i . out_i; LSSAR: from the pre-pass), F_i (LSSAR) and dQ for one row block.
template <class Acc>
FL_CPU_MULTIVERSION void backward_rows(const View<Acc>& view, const BackwardArgs& a, int64_t b, int64_t hq, int64_t r0,
                                       int64_t rows, Scratch<Acc>& sc, std::vector<Acc>& acc) {
  const int64_t dim = view.dim;
  const int64_t qo = view.q_offset(b, hq) + r0 * dim;
  const Acc* q = view.q + qo;
  const Acc* out = static_cast<const Acc*>(a.out) + qo;
  const Acc* dout = static_cast<const Acc*>(a.grad_out) + qo;
  const Acc* k = view.k + view.k_offset(b, hq / view.group);
  const Acc* v = view.v + view.k_offset(b, hq / view.group);
  Acc* row_terms = static_cast<Acc*>(a.row_terms);
  for (int64_t r = 0; r < rows; ++r) {
    Acc d = 0;
#pragma omp simd reduction(+ : d)
    for (int64_t t = 0; t < dim; ++t) d += dout[r * dim + t] * out[r * dim + t];
    const int64_t index = view.row_index(b, hq, r0 + r);
    row_terms[index * 2] = d;
    row_terms[index * 2 + 1] = 0;
  }
  RowState<Acc> row[kRows];
  load_rows(view, static_cast<const Acc*>(a.stats), row_terms, b, hq, r0, rows, row);
  const int64_t key_lo = row[0].rc.lo, key_hi = row[rows - 1].rc.hi;

  if (view.rw.on) {  // D_i and F_i need the whole row before any score gradient
    RowTermSums<Acc> sums[kRows];
    for (int64_t j0 = key_lo; j0 < key_hi; j0 += kKeys) {
      const int64_t count = std::min(kKeys, key_hi - j0);
      score_and_dp_tile(q, dout, rows, k, v, j0, count, dim, sc);
      tile_score_grads(view, row, rows, j0, count, sc, sums);
    }
    for (int64_t r = 0; r < rows; ++r) {
      finish_row_terms(row[r], sums[r], row[r].d, row[r].f);
      const int64_t index = view.row_index(b, hq, r0 + r);
      row_terms[index * 2] = row[r].d;
      row_terms[index * 2 + 1] = row[r].f;
    }
  }

  std::fill(acc.begin(), acc.begin() + rows * dim, Acc(0));
  for (int64_t j0 = key_lo; j0 < key_hi; j0 += kKeys) {
    const int64_t count = std::min(kKeys, key_hi - j0);
    score_and_dp_tile(q, dout, rows, k, v, j0, count, dim, sc);
    tile_score_grads(view, row, rows, j0, count, sc, static_cast<RowTermSums<Acc>*>(nullptr));
    tile_gemm(rows, dim, count, sc.g.data(), kKeys, k + j0 * dim, dim, acc.data(), dim, true);
  }
  Acc* dq = static_cast<Acc*>(a.grad_q) + qo;
  std::copy(acc.begin(), acc.begin() + rows * dim, dq);
}

// Pass B: dK and dV of one key block, over every q head of its group and every row that sees it.
template <class Acc>
FL_CPU_MULTIVERSION void backward_keys(const View<Acc>& view, const BackwardArgs& a, int64_t b, int64_t hkv,
                                       int64_t j0, int64_t count, Scratch<Acc>& sc, std::vector<Acc>& dk,
                                       std::vector<Acc>& dv) {
  const int64_t dim = view.dim;
  const int64_t ko = view.k_offset(b, hkv) + j0 * dim;
  tile_transpose(count, dim, view.k + ko, dim, sc.kt.data(), kKeys);
  tile_transpose(count, dim, view.v + ko, dim, sc.vt.data(), kKeys);
  std::fill(dk.begin(), dk.begin() + count * dim, Acc(0));
  std::fill(dv.begin(), dv.begin() + count * dim, Acc(0));
  int64_t first, last;
  rows_seeing_keys(view.mask, j0, j0 + count, first, last);
  RowState<Acc> row[kRows];
  for (int64_t hq = hkv * view.group; hq < (hkv + 1) * view.group; ++hq) {
    for (int64_t r0 = first; r0 < last; r0 += kRows) {
      const int64_t rows = std::min(kRows, last - r0);
      const int64_t qo = view.q_offset(b, hq) + r0 * dim;
      const Acc* q = view.q + qo;
      const Acc* dout = static_cast<const Acc*>(a.grad_out) + qo;
      load_rows(view, static_cast<const Acc*>(a.stats), static_cast<const Acc*>(a.row_terms), b, hq, r0, rows, row);
      tile_gemm(rows, count, dim, q, dim, sc.kt.data(), kKeys, sc.s.data(), kKeys, false);
      tile_gemm(rows, count, dim, dout, dim, sc.vt.data(), kKeys, sc.dp.data(), kKeys, false);
      tile_score_grads(view, row, rows, j0, count, sc, static_cast<RowTermSums<Acc>*>(nullptr));
      tile_transpose(rows, count, sc.g.data(), kKeys, sc.gt.data(), kRows);
      tile_transpose(rows, count, sc.w.data(), kKeys, sc.wt.data(), kRows);
      tile_gemm(count, dim, rows, sc.gt.data(), kRows, q, dim, dk.data(), dim, true);
      tile_gemm(count, dim, rows, sc.wt.data(), kRows, dout, dim, dv.data(), dim, true);
    }
  }
  std::copy(dk.begin(), dk.begin() + count * dim, static_cast<Acc*>(a.grad_k) + ko);
  std::copy(dv.begin(), dv.begin() + count * dim, static_cast<Acc*>(a.grad_v) + ko);
}

template <class Acc>
void backward_typed(const AttentionProblem& p, const BackwardArgs& a) {
  const View<Acc> view(p);
  const int64_t row_blocks = (p.len_q + kRows - 1) / kRows;
  parallel_for(p.batch * p.heads_q * row_blocks, 1, [&](int64_t begin, int64_t end) {
    Scratch<Acc> sc(p.head_dim);
    std::vector<Acc> acc(kRows * p.head_dim);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / row_blocks, r0 = (item % row_blocks) * kRows;
      backward_rows(view, a, bh / p.heads_q, bh % p.heads_q, r0, std::min(kRows, p.len_q - r0), sc, acc);
    }
  });
  const int64_t key_blocks = (p.len_k + kKeys - 1) / kKeys;
  parallel_for(p.batch * p.heads_kv * key_blocks, 1, [&](int64_t begin, int64_t end) {
    Scratch<Acc> sc(p.head_dim);
    std::vector<Acc> dk(kKeys * p.head_dim), dv(kKeys * p.head_dim);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t bh = item / key_blocks, j0 = (item % key_blocks) * kKeys;
      backward_keys(view, a, bh / p.heads_kv, bh % p.heads_kv, j0, std::min(kKeys, p.len_k - j0), sc, dk, dv);
    }
  });
}

void require_cpu_problem(const AttentionProblem& p) {
  validate(p);
  FL_CHECK_ARG(p.dtype == DType::Float32 || p.dtype == DType::Float64, p.op_name,
               ": the CPU kernels take float32 or float64 (the Python layer upcasts 16-bit inputs), got ",
               dtype_name(p.dtype));
  if (p.cu_seqlens != nullptr) {  // host memory here: the offsets are checked before any row uses them
    FL_CHECK_ARG(p.cu_seqlens[0] == 0 && p.cu_seqlens[p.documents] == p.len_k, p.op_name,
                 ": cu_seqlens must start at 0 and end at the packed length ", p.len_k);
    for (int64_t d = 0; d < p.documents; ++d)
      FL_CHECK_ARG(p.cu_seqlens[d] < p.cu_seqlens[d + 1], p.op_name, ": cu_seqlens must be strictly increasing");
  }
}

}  // namespace

void forward_cpu(const AttentionProblem& p, void* out, void* stats) {
  require_cpu_problem(p);
  if (p.batch * p.heads_q * p.len_q == 0) return;
  if (p.dtype == DType::Float64) {
    forward_typed(p, static_cast<double*>(out), static_cast<double*>(stats));
  } else {
    forward_typed(p, static_cast<float*>(out), static_cast<float*>(stats));
  }
}

void backward_cpu(const AttentionProblem& p, const BackwardArgs& a) {
  require_cpu_problem(p);
  if (p.batch * p.heads_q * p.len_q == 0) {  // no query rows: the keys and values get no gradient
    const size_t bytes = static_cast<size_t>(p.batch * p.heads_kv * p.len_k * p.head_dim) * dtype_size(p.dtype);
    if (bytes > 0) {
      std::memset(a.grad_k, 0, bytes);
      std::memset(a.grad_v, 0, bytes);
    }
    return;
  }
  if (p.dtype == DType::Float64) {
    backward_typed<double>(p, a);
  } else {
    backward_typed<float>(p, a);
  }
}

}  // namespace fl::attention
