// Row moments (count, mean, centred sum of squares) computed without the
// catastrophic cancellation of q/n - mean^2. Each worker (a CPU chunk, a CUDA
// thread) sums x - shift with a shift taken from its own data, turns that into
// (n, mean, m2), and workers are combined with Chan et al.'s pairwise update.
// Shared by the CPU and CUDA kernels of every family that needs a mean/variance.
#pragma once

#include <cmath>

#include "common/host_device.h"

namespace fl {

template <class Acc>
struct Moments {
  Acc n;     // number of elements
  Acc mean;  // their mean
  Acc m2;    // sum of squared deviations from the mean

  FL_HD Acc sum() const { return n * mean; }
  // sum of squares; both terms are >= 0, so this sum cannot cancel
  FL_HD Acc sum_of_squares() const { return m2 + n * mean * mean; }
  FL_HD Acc variance() const { return n > Acc(0) ? m2 / n : Acc(0); }
};

template <class Acc>
FL_HD Moments<Acc> merge_moments(const Moments<Acc>& a, const Moments<Acc>& b) {
  if (a.n == Acc(0)) return b;
  if (b.n == Acc(0)) return a;
  const Acc n = a.n + b.n;
  const Acc delta = b.mean - a.mean;
  const Acc weight_b = b.n / n;
  Moments<Acc> out;
  out.n = n;
  out.mean = a.mean + delta * weight_b;
  out.m2 = a.m2 + b.m2 + delta * delta * a.n * weight_b;
  return out;
}

// Sums of (x - shift) and (x - shift)^2 for one worker.
template <class Acc>
struct ShiftedSums {
  Acc shift;
  Acc n;
  Acc s;
  Acc q;

  FL_HD explicit ShiftedSums(Acc shift_value = Acc(0)) : shift(shift_value), n(0), s(0), q(0) {}

  FL_HD void push(Acc x) {
    const Acc d = x - shift;
    n += Acc(1);
    s += d;
    q += d * d;
  }

  FL_HD Moments<Acc> moments() const;
};

// (n, mean, m2) of n values whose deviations from `shift` sum to s and square-sum to q.
template <class Acc>
FL_HD Moments<Acc> moments_from_shifted_sums(Acc shift, Acc n, Acc s, Acc q) {
  Moments<Acc> out;
  out.n = n;
  if (n == Acc(0)) {
    out.mean = Acc(0);
    out.m2 = Acc(0);
    return out;
  }
  const Acc mean_shifted = s / n;
  out.mean = shift + mean_shifted;
  const Acc m2 = q - s * mean_shifted;
  out.m2 = m2 > Acc(0) ? m2 : Acc(0);
  return out;
}

template <class Acc>
FL_HD Moments<Acc> ShiftedSums<Acc>::moments() const {
  return moments_from_shifted_sums(shift, n, s, q);
}

}  // namespace fl
