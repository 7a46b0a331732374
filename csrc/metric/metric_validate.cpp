// Checks of a PairProblem shared by every entry point (the Python layer checks the same first, with
// torch's words; index contents are checked where they are readable: fastloss.metric on the host).
#include "common/error.h"
#include "metric/metric_kernels.h"

namespace fl::metric {

void validate(const PairProblem& p) {
  const char* fn = p.op_name;
  FL_CHECK_ARG(p.n >= 0 && p.m >= 0 && p.dim >= 1, fn, ": need n, m >= 0 and dim >= 1, got ", p.n, ", ", p.m, ", ",
               p.dim);
  FL_CHECK_ARG(static_cast<int>(p.kind) >= 0 && static_cast<int>(p.kind) <= 8, fn, ": unknown loss kind");
  FL_CHECK_ARG(p.n == 0 || p.m >= 1, fn, ": there are query rows but no references");
  FL_CHECK_ARG(p.n == 0 || (p.x != nullptr && p.y != nullptr), fn, ": null embeddings");
  const bool labelled = p.kind != LossKind::InfoNCE && p.kind != LossKind::AUC && p.kind != LossKind::DecoupledSoftmax;
  FL_CHECK_ARG(!labelled || p.n == 0 || (p.labels_x != nullptr && p.labels_y != nullptr), fn, ": labels are required");
  FL_CHECK_ARG(p.kind != LossKind::DecoupledSoftmax || p.pos_ptr != nullptr, fn, ": positive lists are required");
  FL_CHECK_ARG(!p.symmetric || (p.kind == LossKind::InfoNCE && p.n == p.m && p.targets == nullptr), fn,
               ": the symmetric loss needs InfoNCE on a square batch with the diagonal as positives");
  FL_CHECK_ARG(p.targets != nullptr || (p.kind != LossKind::InfoNCE && p.kind != LossKind::AUC) || p.n <= p.m, fn,
               ": with the diagonal as positives there must be at least as many references as queries");
  FL_CHECK_ARG(p.kind != LossKind::Triplet || (p.option >= 0 && p.option <= 2), fn, ": unknown triplet mining");
}

}  // namespace fl::metric
