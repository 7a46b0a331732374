// Size and type checks of the factored layer's entry points, shared by CPU and CUDA.
#include "common/error.h"
#include "spherical/dense_loss.h"
#include "spherical/factored_layer.h"

namespace fl {
namespace spherical {

namespace {
bool is_real_float(DType t) { return t == DType::Float32 || t == DType::Float64; }
}  // namespace

void validate_factored_problem(const FactoredProblem& p, const char* where) {
  FL_CHECK_ARG(is_real_float(p.state_dtype), where, ": the state dtype must be float32 or float64, got ",
               dtype_name(p.state_dtype));
  FL_CHECK_ARG(is_real_float(p.weight_dtype), where, ": V must be float32 or float64, got ", dtype_name(p.weight_dtype));
  FL_CHECK_ARG(p.samples >= 0, where, ": samples must be >= 0, got ", p.samples);
  FL_CHECK_ARG(p.targets_per_sample >= 1, where, ": targets per sample must be >= 1, got ", p.targets_per_sample);
  FL_CHECK_ARG(p.features >= 1, where, ": features must be >= 1, got ", p.features);
  FL_CHECK_ARG(p.classes >= 1, where, ": classes must be >= 1, got ", p.classes);
  FL_CHECK_ARG(p.samples == 0 || (p.h && p.sh && p.weight_rows && p.target), where, ": null input pointer");
  validate_loss_params(p.params, where);
}

}  // namespace spherical
}  // namespace fl
