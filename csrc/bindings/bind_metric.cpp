// Bindings of the metric family (csrc/metric/): fastloss.metric builds one PairProblem per call.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "bindings/pointers.h"
#include "metric/metric_kernels.h"

#if defined(FASTLOSS_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace py = pybind11;

namespace {

using namespace fl::metric;

using fl::bindings::ptr;

ForwardOut forward_out(uintptr_t row_terms, uintptr_t row_counts, uintptr_t row_stats, uintptr_t col_terms,
                       uintptr_t col_stats, uintptr_t unit_grad_x, uintptr_t unit_grad_y, uintptr_t unit_grad_scale,
                       uintptr_t row_active) {
  ForwardOut out;
  out.row_terms = ptr(row_terms);
  out.row_counts = ptr(row_counts);
  out.row_stats = ptr(row_stats);
  out.col_terms = ptr(col_terms);
  out.col_stats = ptr(col_stats);
  out.unit_grad_x = ptr(unit_grad_x);
  out.unit_grad_y = ptr(unit_grad_y);
  out.unit_grad_scale = ptr(unit_grad_scale);
  out.row_active = ptr(row_active);
  return out;
}

BackwardArgs backward_args(uintptr_t row_stats, uintptr_t col_stats, uintptr_t grad_row, uintptr_t grad_col,
                           uintptr_t grad_x, uintptr_t grad_y, uintptr_t grad_scale) {
  BackwardArgs a;
  a.row_stats = ptr<const void>(row_stats);
  a.col_stats = ptr<const void>(col_stats);
  a.grad_row = ptr<const void>(grad_row);
  a.grad_col = ptr<const void>(grad_col);
  a.grad_x = ptr(grad_x);
  a.grad_y = ptr(grad_y);
  a.grad_scale = ptr(grad_scale);
  return a;
}

}  // namespace

void bind_metric(py::module_& m) {
  const auto no_gil = py::call_guard<py::gil_scoped_release>();
  py::class_<PairProblem>(m, "PairProblem")
      .def(py::init([](int dtype, int64_t n, int64_t rows_m, int64_t dim, uintptr_t x, uintptr_t y, uintptr_t labels_x,
                       uintptr_t labels_y, uintptr_t targets, uintptr_t pos_ptr, uintptr_t pos_idx, int64_t self_offset,
                       int kind, double p0, double p1, double p2, double p3, int option, bool symmetric) {
        PairProblem p;
        p.dtype = fl::dtype_from_code(dtype, "fastloss.metric");
        p.n = n;
        p.m = rows_m;
        p.dim = dim;
        p.x = ptr<const void>(x);
        p.y = ptr<const void>(y);
        p.labels_x = ptr<const int64_t>(labels_x);
        p.labels_y = ptr<const int64_t>(labels_y);
        p.targets = ptr<const int64_t>(targets);
        p.pos_ptr = ptr<const int64_t>(pos_ptr);
        p.pos_idx = ptr<const int64_t>(pos_idx);
        p.self_offset = self_offset;
        p.kind = static_cast<LossKind>(kind);
        p.p0 = p0;
        p.p1 = p1;
        p.p2 = p2;
        p.p3 = p3;
        p.option = option;
        p.symmetric = symmetric;
        validate(p);
        return p;
      }))
      .def("set_error_slot", [](PairProblem& p, uintptr_t claim, uintptr_t words, int64_t code, int64_t pos_entries) {
        p.error = fl::DeviceErrorSlot{ptr<int64_t>(claim), ptr<int64_t>(words), code};
        p.pos_entries = pos_entries;
      });
  // The CPU and CUDA entry points take the same arguments; the CPU needs no workspace.
  m.def(
      "metric_forward_cpu",
      [](const PairProblem& p, uintptr_t row_terms, uintptr_t row_counts, uintptr_t row_stats, uintptr_t col_terms,
         uintptr_t col_stats, uintptr_t unit_grad_x, uintptr_t unit_grad_y, uintptr_t unit_grad_scale,
         uintptr_t row_active, uintptr_t, int64_t) {
        forward_cpu(p, forward_out(row_terms, row_counts, row_stats, col_terms, col_stats, unit_grad_x, unit_grad_y,
                                   unit_grad_scale, row_active));
      },
      no_gil);
  m.def(
      "metric_backward_cpu",
      [](const PairProblem& p, uintptr_t row_stats, uintptr_t col_stats, uintptr_t grad_row, uintptr_t grad_col,
         uintptr_t grad_x, uintptr_t grad_y, uintptr_t grad_scale, uintptr_t, int64_t) {
        backward_cpu(p, backward_args(row_stats, col_stats, grad_row, grad_col, grad_x, grad_y, grad_scale));
      },
      no_gil);
#if defined(FASTLOSS_WITH_CUDA)
  m.def("metric_cuda_workspace_bytes", &cuda_workspace_bytes, no_gil);
  m.def("metric_cuda_set_chunk_budget", &set_cuda_chunk_budget);
  m.def(
      "metric_forward_cuda",
      [](const PairProblem& p, uintptr_t row_terms, uintptr_t row_counts, uintptr_t row_stats, uintptr_t col_terms,
         uintptr_t col_stats, uintptr_t unit_grad_x, uintptr_t unit_grad_y, uintptr_t unit_grad_scale,
         uintptr_t row_active, uintptr_t workspace, int64_t workspace_bytes, int device, uintptr_t stream) {
        forward_cuda(p, forward_out(row_terms, row_counts, row_stats, col_terms, col_stats, unit_grad_x, unit_grad_y,
                                    unit_grad_scale, row_active),
                     ptr(workspace), workspace_bytes, device, reinterpret_cast<cudaStream_t>(stream));
      },
      no_gil);
  m.def(
      "metric_backward_cuda",
      [](const PairProblem& p, uintptr_t row_stats, uintptr_t col_stats, uintptr_t grad_row, uintptr_t grad_col,
         uintptr_t grad_x, uintptr_t grad_y, uintptr_t grad_scale, uintptr_t workspace, int64_t workspace_bytes,
         int device, uintptr_t stream) {
        backward_cuda(p, backward_args(row_stats, col_stats, grad_row, grad_col, grad_x, grad_y, grad_scale),
                      ptr(workspace), workspace_bytes, device, reinterpret_cast<cudaStream_t>(stream));
      },
      no_gil);
#endif
}
