// Size and hyper-parameter checks shared by the CPU and CUDA entry points.
#include <cmath>

#include "common/error.h"
#include "spherical/dense_loss.h"

namespace fl {
namespace spherical {

void validate_dense_shape(const DenseLossProblem& p, const char* where) {
  FL_CHECK_ARG(p.rows >= 0, where, ": rows must be >= 0, got ", p.rows);
  FL_CHECK_ARG(p.cols >= 1, where, ": logits must have at least one column, got ", p.cols);
  FL_CHECK_ARG(p.row_stride >= p.cols || p.rows <= 1, where, ": row_stride (", p.row_stride, ") must be >= cols (",
               p.cols, ")");
  FL_CHECK_ARG(p.rows == 0 || (p.logits != nullptr && p.target != nullptr), where, ": null logits or target pointer");
}

void validate_loss_params(const LossParams& params, const char* where) {
  const LossParams& p = params;
  switch (p.kind) {
    case LossKind::ZLoss:
      FL_CHECK_ARG(std::isfinite(p.a) && p.a > 0, where, ": a must be a finite number > 0, got ",
                   p.a);
      FL_CHECK_ARG(std::isfinite(p.b), where, ": b must be finite, got ", p.b);
      FL_CHECK_ARG(std::isfinite(p.eps) && p.eps >= 0, where,
                   ": eps must be a finite number >= 0, got ", p.eps);
      break;
    case LossKind::SphericalSoftmax:
      FL_CHECK_ARG(std::isfinite(p.eps) && p.eps > 0, where,
                   ": eps must be a finite number > 0, got ", p.eps);
      break;
    case LossKind::TaylorSoftmax:
    case LossKind::SquaredError:
      break;
    default:
      throw_invalid_argument(where, ": unknown loss kind ", static_cast<int>(p.kind));
  }
}

}  // namespace spherical
}  // namespace fl
