// Elementary functions for FL_HD code, overloaded for float and double so that
// the same source picks the float instructions in float and the double ones in double.
#pragma once

#include <math.h>

#include "common/host_device.h"

namespace fl {

FL_HD float fl_exp(float x) { return expf(x); }
FL_HD double fl_exp(double x) { return exp(x); }
FL_HD float fl_log(float x) { return logf(x); }
FL_HD double fl_log(double x) { return log(x); }
FL_HD float fl_log1p(float x) { return log1pf(x); }
FL_HD double fl_log1p(double x) { return log1p(x); }
FL_HD float fl_sqrt(float x) { return sqrtf(x); }
FL_HD double fl_sqrt(double x) { return sqrt(x); }
FL_HD float fl_abs(float x) { return fabsf(x); }
FL_HD double fl_abs(double x) { return fabs(x); }

// log(1 + e^x) without overflow for large x or loss of precision for very negative x.
template <class Acc>
FL_HD Acc softplus(Acc x) {
  const Acc positive_part = x > Acc(0) ? x : Acc(0);
  return positive_part + fl_log1p(fl_exp(-fl_abs(x)));
}

// 1 / (1 + e^-x), stable for either sign of x.
template <class Acc>
FL_HD Acc sigmoid(Acc x) {
  if (x >= Acc(0)) return Acc(1) / (Acc(1) + fl_exp(-x));
  const Acc e = fl_exp(x);
  return e / (Acc(1) + e);
}

template <class Acc>
FL_HD Acc quiet_nan() {
  return Acc(0) / Acc(0);
}

}  // namespace fl
