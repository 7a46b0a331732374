// Per-sample math of the factored output layer, shared by its CPU and CUDA kernels.
//
// A sample j has K target entries (class c_k, weight w_k; entries equal to ignore_index are
// padding) and, from the state, its target outputs A_k = o_{c_k}, the row sum s = sum_k o_k and
// the row square-sum q = sum_k o_k^2 of its D outputs o = W h_j. The sample's loss is
//   squared error:  ||o - y||^2 = q - 2 sum_k w_k A_k + ||y||^2   with y = sum_k w_k e_{c_k}
//   other heads:    sum_k w_k F(A_k, s, q)                          (F: spherical_heads.h)
// and the layer needs its partials (dL/dA_k, dL/ds, dL/dq): everything else of the update is
// linear algebra on the d x d state.
//
// Row layouts (the Python layer builds them with one GEMM each, against the packed state
// S = [U; omega^T; wbar^T; Q], (2d+2) x d):
//   sh row     = S h_j          = [U h_j (d) | omega.h_j | wbar.h_j (= s_j) | Q h_j (d)]
//   ytilde row (backward input) = [V^T ydot_j (d) | ybar_j | gs_j | 2 gq_j h_j (d)], so that
//                                 dL/dh_j = S^T ytilde_j.
//   partials row               = [dL/dA_1 .. dL/dA_K | dL/ds | dL/dq]
#pragma once

#include <cstdint>

#include "common/host_device.h"
#include "common/math.h"
#include "common/moments.h"
#include "spherical/spherical_heads.h"

namespace fl {
namespace spherical {

// Offsets inside an sh / ytilde row of width 2d + 2.
FL_HD int64_t packed_width(int64_t d) { return 2 * d + 2; }
FL_HD int64_t omega_slot(int64_t d) { return d; }       // sh: omega.h   ytilde: ybar
FL_HD int64_t wbar_slot(int64_t d) { return d + 1; }    // sh: s         ytilde: gs
FL_HD int64_t quad_offset(int64_t d) { return d + 2; }  // sh: Q h       ytilde: 2 gq h

FL_HD bool entry_is_target(int64_t c, int64_t classes) { return c >= 0 && c < classes; }

template <class T>
struct SamplePartials {
  T loss;
  T d_sum;             // dL/ds
  T d_sum_of_squares;  // dL/dq
};

// Loss and partials of one sample. outputs[k] = A_k on entry; grad_outputs[k] = dL/dA_k on exit
// (the two may alias). An entry that is neither a class in [0, D) nor ignore_index gives a NaN
// loss and no gradient (the CUDA path cannot raise; the CPU path checked before).
template <class T>
FL_HD SamplePartials<T> sample_head(const LossParams& params, const int64_t* classes_of, const T* weights,
                                    const T* outputs, T* grad_outputs, int64_t K, int64_t ignore_index,
                                    int64_t classes, T s, T q) {
  SamplePartials<T> out{T(0), T(0), T(0)};
  bool any_target = false;
  bool bad_entry = false;
  const Moments<T> row = moments_from_shifted_sums(T(0), T(classes), s, q);
  for (int64_t k = 0; k < K; ++k) {
    const int64_t c = classes_of[k];
    const T a = outputs[k];
    const T w = weights ? weights[k] : T(1);
    T g = T(0);
    if (entry_is_target(c, classes)) {
      any_target = true;
      if (params.kind == LossKind::SquaredError) {
        // -2 w_k A_k, plus w_k (sum of w_l over the entries l < k of the same class, twice, and w_k):
        // the cross terms of ||y||^2 when a class repeats within the sample.
        T same_class = T(0);
        for (int64_t l = 0; l < k; ++l)
          if (classes_of[l] == c) same_class += weights ? weights[l] : T(1);
        out.loss += w * (w + T(2) * same_class) - T(2) * w * a;
        g = T(-2) * w;
      } else {
        const HeadResult<T> head = evaluate_head<T>(params, a, row);
        out.loss += w * head.loss;
        out.d_sum += w * head.grad.d_sum();
        out.d_sum_of_squares += w * head.grad.d_sum_of_squares();
        g = w * head.grad.g_target;
      }
    } else if (c != ignore_index) {
      bad_entry = true;
    }
    grad_outputs[k] = g;
  }
  if (params.kind == LossKind::SquaredError && any_target) {
    out.loss += q;
    out.d_sum_of_squares = T(1);
  }
  if (bad_entry) out.loss = quiet_nan<T>();
  return out;
}

// One entry of M = G^T G (m x m), G = dL/dO the D x m gradient on the outputs, which the Q update
// needs as Q <- Q - eta (gradH^T h + h^T gradH) + eta^2 h^T M h (rows form). With
// hg_ij = h_i . gradH_j and mh_ij = h_i . Q h_j (symmetric):
//   M_ij = D gs_i gs_j + (Ydot^T Ydot)_ij + gs_i ybar_j + ybar_i gs_j
//          + 2 gq_i hg_ij + 2 gq_j hg_ji - 4 gq_i gq_j mh_ij.
template <class T>
FL_HD T gram_entry(const int64_t* classes_i, const T* partials_i, const int64_t* classes_j, const T* partials_j,
                   int64_t K, int64_t classes, T hg_ij, T hg_ji, T mh_ij) {
  const T gs_i = partials_i[K], gq_i = partials_i[K + 1];
  const T gs_j = partials_j[K], gq_j = partials_j[K + 1];
  T ybar_i = T(0), ybar_j = T(0), sparse = T(0);
  for (int64_t k = 0; k < K; ++k) {
    ybar_i += partials_i[k];
    ybar_j += partials_j[k];
    if (!entry_is_target(classes_i[k], classes)) continue;
    for (int64_t l = 0; l < K; ++l)
      if (classes_j[l] == classes_i[k]) sparse += partials_i[k] * partials_j[l];
  }
  return T(classes) * gs_i * gs_j + sparse + gs_i * ybar_j + ybar_i * gs_j + T(2) * gq_i * hg_ij +
         T(2) * gq_j * hg_ji - T(4) * gq_i * gq_j * mh_ij;
}

// Sum over the sorted entries of one class, starting at `position` when it is the class's first:
// value(e) * row(sample of e)[i] for one feature i. Returns false (and leaves `sum`) otherwise.
// Shared by the scatter into V and the grouped rows of the Q update, on CPU and CUDA.
template <class T, class Row>
FL_HD bool class_segment_sum(const int64_t* target, const int64_t* order, int64_t entries, int64_t position, int64_t K,
                             const T* scaled, Row row, T& sum) {
  const int64_t c = target[order[position]];
  if (position > 0 && target[order[position - 1]] == c) return false;
  T acc = T(0);
  for (int64_t s = position; s < entries && target[order[s]] == c; ++s) {
    const int64_t e = order[s];
    acc += scaled[(e / K) * (K + 2) + e % K] * row(e / K);
  }
  sum = acc;
  return true;
}

}  // namespace spherical
}  // namespace fl
