// Bindings of the softplus-attention family (csrc/attention/). fastloss.attention builds one
// AttentionProblem per call and hands it to the forward and backward entry points.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "attention/attention_kernels.h"
#include "bindings/pointers.h"

#if defined(FASTLOSS_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace py = pybind11;

namespace {

using namespace fl::attention;

using fl::bindings::ptr;

BackwardArgs backward_args(uintptr_t out, uintptr_t grad_out, uintptr_t stats, uintptr_t grad_q, uintptr_t grad_k,
                           uintptr_t grad_v, uintptr_t row_terms) {
  BackwardArgs a;
  a.out = ptr(out);
  a.grad_out = ptr(grad_out);
  a.stats = ptr(stats);
  a.grad_q = ptr(grad_q);
  a.grad_k = ptr(grad_k);
  a.grad_v = ptr(grad_v);
  a.row_terms = ptr(row_terms);
  return a;
}

}  // namespace

void bind_attention(py::module_& m) {
  const auto no_gil = py::call_guard<py::gil_scoped_release>();
  py::class_<AttentionProblem>(m, "AttentionProblem")
      .def(py::init([](int dtype, int64_t batch, int64_t heads_q, int64_t heads_kv, int64_t len_q, int64_t len_k,
                       int64_t head_dim, uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t cu_seqlens,
                       int64_t documents, bool causal, int64_t window, bool length_scale, double scale,
                       double reweight_power, int64_t reweight_offset_rows) {
        AttentionProblem p;
        p.dtype = fl::dtype_from_code(dtype, "fastloss.softplus_attention");
        p.batch = batch;
        p.heads_q = heads_q;
        p.heads_kv = heads_kv;
        p.len_q = len_q;
        p.len_k = len_k;
        p.head_dim = head_dim;
        p.q = ptr<const void>(q);
        p.k = ptr<const void>(k);
        p.v = ptr<const void>(v);
        p.cu_seqlens = ptr<const int32_t>(cu_seqlens);
        p.documents = documents;
        p.causal = causal;
        p.window = window;
        p.scale_mode = length_scale ? ScaleMode::Length : ScaleMode::Fixed;
        p.scale = scale;
        p.reweight_power = reweight_power;
        p.reweight_offset_rows = reweight_offset_rows;
        validate(p);
        return p;
      }));
  m.def(
      "attention_forward_cpu",
      [](const AttentionProblem& p, uintptr_t out, uintptr_t stats, uintptr_t, int64_t) {
        forward_cpu(p, ptr(out), ptr(stats));  // (no workspace on the CPU)
      },
      no_gil);
  m.def(
      "attention_backward_cpu",
      [](const AttentionProblem& p, uintptr_t out, uintptr_t grad_out, uintptr_t stats, uintptr_t grad_q,
         uintptr_t grad_k, uintptr_t grad_v, uintptr_t row_terms) {
        backward_cpu(p, backward_args(out, grad_out, stats, grad_q, grad_k, grad_v, row_terms));
      },
      no_gil);
#if defined(FASTLOSS_WITH_CUDA)
  m.def("attention_forward_cuda_workspace_bytes", &forward_cuda_workspace_bytes, no_gil);
  m.def(
      "attention_forward_cuda",
      [](const AttentionProblem& p, uintptr_t out, uintptr_t stats, uintptr_t workspace, int64_t workspace_bytes,
         int device, uintptr_t stream) {
        forward_cuda(p, ptr(out), ptr(stats), ptr(workspace), workspace_bytes, device,
                     reinterpret_cast<cudaStream_t>(stream));
      },
      no_gil);
  m.def(
      "attention_backward_cuda",
      [](const AttentionProblem& p, uintptr_t out, uintptr_t grad_out, uintptr_t stats, uintptr_t grad_q,
         uintptr_t grad_k, uintptr_t grad_v, uintptr_t row_terms, int device, uintptr_t stream) {
        backward_cuda(p, backward_args(out, grad_out, stats, grad_q, grad_k, grad_v, row_terms), device,
                      reinterpret_cast<cudaStream_t>(stream));
      },
      no_gil);
#endif
}
