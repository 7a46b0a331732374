// Calls fn(TypeTag<State>, TypeTag<Weight>) for the element types of a FactoredProblem.
#pragma once

#include "common/dtype.h"
#include "common/error.h"
#include "spherical/factored_layer.h"

namespace fl {
namespace spherical {

template <class Fn>
void dispatch_factored_types(const FactoredProblem& p, const char* where, Fn&& fn) {
  auto with_weight = [&](auto state_tag) {
    if (p.weight_dtype == DType::Float32) return fn(state_tag, TypeTag<float>{});
    if (p.weight_dtype == DType::Float64) return fn(state_tag, TypeTag<double>{});
    throw_invalid_argument(where, ": V must be float32 or float64");
  };
  if (p.state_dtype == DType::Float32) return with_weight(TypeTag<float>{});
  if (p.state_dtype == DType::Float64) return with_weight(TypeTag<double>{});
  throw_invalid_argument(where, ": the state dtype must be float32 or float64");
}

}  // namespace spherical
}  // namespace fl
