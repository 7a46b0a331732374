// fastloss._C: the one file under csrc/ that sees Python. It exposes each
// family's torch-free entry points with pointers passed as integers, so the
// build needs neither torch nor its headers. Python (python/fastloss/) owns
// validation, allocation and the choice of stream.
//
// Registration list: a new family adds its bind_<family>() below.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "common/dtype.h"
#include "common/parallel.h"
#include "common/thread_pool.h"
#include "quant/quant_kernels.h"
#include "spherical/dense_loss.h"
#include "spherical/factored_layer.h"

#if defined(FASTLOSS_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace py = pybind11;

// Families whose bindings live in their own file, csrc/bindings/bind_<family>.cpp.
void bind_ot(py::module_& m);
void bind_attention(py::module_& m);
void bind_metric(py::module_& m);
void bind_simulator(py::module_& m);
void bind_device_error(py::module_& m);

namespace {

template <class T = void>
T* as_ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

#if defined(FASTLOSS_WITH_CUDA)
cudaStream_t as_stream(uintptr_t handle) { return reinterpret_cast<cudaStream_t>(handle); }
#endif

py::dict build_info() {
  py::dict info;
  info["version"] = FASTLOSS_VERSION_STRING;
#if defined(FASTLOSS_WITH_CUDA)
  info["cuda"] = true;
  info["cuda_archs"] = FASTLOSS_CUDA_ARCHS_STRING;
  // The runtime is linked statically: the driver must support this version (0: no driver found).
  int runtime_version = 0, driver_version = 0;
  if (cudaRuntimeGetVersion(&runtime_version) != cudaSuccess) runtime_version = 0;
  if (cudaDriverGetVersion(&driver_version) != cudaSuccess) driver_version = 0;
  cudaGetLastError();
  info["cuda_runtime_version"] = runtime_version;
  info["cuda_driver_version"] = driver_version;
#if defined(FASTLOSS_CUDA_SIMULATED)
  info["cuda_simulated"] = true;  // the _cuda entry points run on the simulated device, on host memory
#else
  info["cuda_simulated"] = false;
#endif
#else
  info["cuda"] = false;
  info["cuda_archs"] = "";
  info["cuda_simulated"] = false;
#endif
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#else
  info["compiler"] = "unknown";
#endif
  info["cpu_threads"] = fl::cpu_thread_count();
  info["cpu_pool"] = fl::cpu_pool_name();
  return info;
}

// ---- spherical family -------------------------------------------------------
fl::spherical::DenseLossProblem dense_problem(int dtype, uintptr_t logits, int64_t rows, int64_t cols,
                                              int64_t row_stride, uintptr_t target, int64_t ignore_index, int kind,
                                              double a, double b, double eps) {
  fl::spherical::DenseLossProblem p;
  p.dtype = fl::dtype_from_code(dtype, "fastloss.spherical");
  p.logits = as_ptr<const void>(logits);
  p.rows = rows;
  p.cols = cols;
  p.row_stride = row_stride;
  p.target = as_ptr<const int64_t>(target);
  p.ignore_index = ignore_index;
  p.params = fl::spherical::LossParams{static_cast<fl::spherical::LossKind>(kind), a, b, eps};
  return p;
}

void bind_spherical(py::module_& m) {
  using namespace fl::spherical;
  m.def(
      "spherical_dense_forward_cpu",
      [](int dtype, uintptr_t logits, int64_t rows, int64_t cols, int64_t row_stride, uintptr_t target,
         int64_t ignore_index, int kind, double a, double b, double eps, uintptr_t loss, uintptr_t coef,
         const std::string& op_name) {
        DenseLossProblem p = dense_problem(dtype, logits, rows, cols, row_stride, target, ignore_index, kind, a, b, eps);
        p.op_name = op_name.c_str();
        dense_loss_forward_cpu(p, as_ptr(loss), as_ptr(coef));
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "spherical_dense_backward_cpu",
      [](int dtype, uintptr_t logits, int64_t rows, int64_t cols, int64_t row_stride, uintptr_t target,
         int64_t ignore_index, uintptr_t grad_loss, int64_t grad_loss_stride, uintptr_t coef,
         uintptr_t grad_logits) {
        dense_loss_backward_cpu(dense_problem(dtype, logits, rows, cols, row_stride, target, ignore_index, 0, 0.0, 0.0, 0.0),
                                as_ptr<const void>(grad_loss), grad_loss_stride, as_ptr<const void>(coef),
                                as_ptr(grad_logits));
      },
      py::call_guard<py::gil_scoped_release>());
#if defined(FASTLOSS_WITH_CUDA)
  m.def("spherical_dense_forward_cuda_workspace_bytes", &dense_loss_forward_cuda_workspace_bytes,
        py::call_guard<py::gil_scoped_release>());
  m.def(
      "spherical_dense_forward_cuda",
      [](int dtype, uintptr_t logits, int64_t rows, int64_t cols, int64_t row_stride, uintptr_t target,
         int64_t ignore_index, int kind, double a, double b, double eps, uintptr_t loss, uintptr_t coef,
         uintptr_t workspace, int64_t workspace_bytes, uintptr_t error_claim, uintptr_t error_words,
         int64_t error_code, int device, uintptr_t stream) {
        DenseLossProblem p = dense_problem(dtype, logits, rows, cols, row_stride, target, ignore_index, kind, a, b, eps);
        p.error = fl::DeviceErrorSlot{as_ptr<int64_t>(error_claim), as_ptr<int64_t>(error_words), error_code};
        dense_loss_forward_cuda(p, as_ptr(loss), as_ptr(coef), as_ptr(workspace), workspace_bytes, device,
                                as_stream(stream));
      },
      py::call_guard<py::gil_scoped_release>());
  m.def(
      "spherical_dense_backward_cuda",
      [](int dtype, uintptr_t logits, int64_t rows, int64_t cols, int64_t row_stride, uintptr_t target,
         int64_t ignore_index, uintptr_t grad_loss, int64_t grad_loss_stride, uintptr_t coef,
         uintptr_t grad_logits, int device, uintptr_t stream) {
        dense_loss_backward_cuda(dense_problem(dtype, logits, rows, cols, row_stride, target, ignore_index, 0, 0.0, 0.0, 0.0),
                                 as_ptr<const void>(grad_loss), grad_loss_stride, as_ptr<const void>(coef),
                                 as_ptr(grad_logits), device, as_stream(stream));
      },
      py::call_guard<py::gil_scoped_release>());
#endif
}

// The factored output layer: one problem object per step, shared by its kernels.
void bind_spherical_factored(py::module_& m) {
  using namespace fl::spherical;
  py::class_<FactoredProblem>(m, "FactoredProblem")
      .def(py::init([](int state_dtype, int weight_dtype, int64_t samples, int64_t targets_per_sample,
                       int64_t features, int64_t classes, uintptr_t h, uintptr_t sh, uintptr_t weight_rows,
                       uintptr_t target, uintptr_t target_weight, int64_t ignore_index, int kind, double a, double b,
                       double eps) {
        FactoredProblem p;
        p.state_dtype = fl::dtype_from_code(state_dtype, "fastloss.SphericalOutputLayer");
        p.weight_dtype = fl::dtype_from_code(weight_dtype, "fastloss.SphericalOutputLayer");
        p.samples = samples;
        p.targets_per_sample = targets_per_sample;
        p.features = features;
        p.classes = classes;
        p.h = as_ptr<const void>(h);
        p.sh = as_ptr<const void>(sh);
        p.weight_rows = as_ptr<const void>(weight_rows);
        p.target = as_ptr<const int64_t>(target);
        p.target_weight = as_ptr<const void>(target_weight);
        p.ignore_index = ignore_index;
        p.params = LossParams{static_cast<LossKind>(kind), a, b, eps};
        p.op_name = "fastloss.SphericalOutputLayer";
        return p;
      }))
      .def("set_error_slot", [](FactoredProblem& p, uintptr_t claim, uintptr_t words, int64_t code) {
        p.error = fl::DeviceErrorSlot{as_ptr<int64_t>(claim), as_ptr<int64_t>(words), code};
      });
  const auto no_gil = py::call_guard<py::gil_scoped_release>();
  m.def(
      "spherical_factored_head_cpu",
      [](const FactoredProblem& p, uintptr_t loss, uintptr_t partials) { factored_head_cpu(p, as_ptr(loss), as_ptr(partials)); },
      no_gil);
  m.def(
      "spherical_factored_prepare_cpu",
      [](const FactoredProblem& p, uintptr_t partials, uintptr_t grad_loss, int64_t grad_stride, uintptr_t ytilde,
         uintptr_t scaled, uintptr_t coef) {
        factored_prepare_cpu(p, as_ptr<const void>(partials), as_ptr<const void>(grad_loss), grad_stride,
                             as_ptr(ytilde), as_ptr(scaled), as_ptr(coef));
      },
      no_gil);
  m.def(
      "spherical_factored_gram_cpu",
      [](const FactoredProblem& p, uintptr_t scaled, uintptr_t hg, uintptr_t mh, uintptr_t gram) {
        factored_gram_cpu(p, as_ptr<const void>(scaled), as_ptr<const void>(hg), as_ptr<const void>(mh), as_ptr(gram));
      },
      no_gil);
  m.def(
      "spherical_factored_scatter_cpu",
      [](const FactoredProblem& p, uintptr_t weight_rows, uintptr_t scaled, uintptr_t r, double lr) {
        factored_scatter_cpu(p, as_ptr(weight_rows), as_ptr<const void>(scaled), as_ptr<const void>(r), lr);
      },
      no_gil);
  m.def(
      "spherical_factored_group_cpu",
      [](const FactoredProblem& p, uintptr_t scaled, uintptr_t order, uintptr_t grouped) {
        factored_group_cpu(p, as_ptr<const void>(scaled), as_ptr<const int64_t>(order), as_ptr(grouped));
      },
      no_gil);
#if defined(FASTLOSS_WITH_CUDA)
  m.def(
      "spherical_factored_group_cuda",
      [](const FactoredProblem& p, uintptr_t scaled, uintptr_t order, uintptr_t grouped, int device, uintptr_t stream) {
        factored_group_cuda(p, as_ptr<const void>(scaled), as_ptr<const int64_t>(order), as_ptr(grouped), device,
                            as_stream(stream));
      },
      no_gil);
  m.def(
      "spherical_factored_head_cuda",
      [](const FactoredProblem& p, uintptr_t loss, uintptr_t partials, int device, uintptr_t stream) {
        factored_head_cuda(p, as_ptr(loss), as_ptr(partials), device, as_stream(stream));
      },
      no_gil);
  m.def(
      "spherical_factored_prepare_cuda",
      [](const FactoredProblem& p, uintptr_t partials, uintptr_t grad_loss, int64_t grad_stride, uintptr_t ytilde,
         uintptr_t scaled, uintptr_t coef, int device, uintptr_t stream) {
        factored_prepare_cuda(p, as_ptr<const void>(partials), as_ptr<const void>(grad_loss), grad_stride,
                              as_ptr(ytilde), as_ptr(scaled), as_ptr(coef), device, as_stream(stream));
      },
      no_gil);
  m.def(
      "spherical_factored_gram_cuda",
      [](const FactoredProblem& p, uintptr_t scaled, uintptr_t hg, uintptr_t mh, uintptr_t gram, int device,
         uintptr_t stream) {
        factored_gram_cuda(p, as_ptr<const void>(scaled), as_ptr<const void>(hg), as_ptr<const void>(mh),
                           as_ptr(gram), device, as_stream(stream));
      },
      no_gil);
  m.def(
      "spherical_factored_scatter_cuda",
      [](const FactoredProblem& p, uintptr_t weight_rows, uintptr_t scaled, uintptr_t r, double lr, uintptr_t order,
         int device, uintptr_t stream) {
        factored_scatter_cuda(p, as_ptr(weight_rows), as_ptr<const void>(scaled), as_ptr<const void>(r), lr,
                              as_ptr<const int64_t>(order), device, as_stream(stream));
      },
      no_gil);
#endif
}

// ---- quant family: mixed 2/4-bit weights -----------------------------------
void bind_quant(py::module_& m) {
  using namespace fl::quant;
  const auto no_gil = py::call_guard<py::gil_scoped_release>();
  m.attr("quant_format_version") = kFormatVersion;
  py::class_<PackedShape>(m, "QuantPackedShape")
      .def(py::init(&make_packed_shape), py::arg("rows"), py::arg("cols"), py::arg("group_size"), py::arg("side_groups"))
      .def_readonly("rows", &PackedShape::rows)
      .def_readonly("cols", &PackedShape::cols)
      .def_readonly("group_size", &PackedShape::group_size)
      .def_readonly("rows_padded", &PackedShape::rows_padded)
      .def_readonly("groups", &PackedShape::groups)
      .def_readonly("k_words", &PackedShape::k_words)
      .def_readonly("side_groups", &PackedShape::side_groups)
      .def_readonly("side_k_words", &PackedShape::side_k_words)
      .def_property_readonly("main_words", &PackedShape::main_words)
      .def_property_readonly("side_words", &PackedShape::side_words)
      .def("validate", [](const PackedShape& s, const std::string& op) { validate_packed_shape(s, op.c_str()); });
  py::class_<PackedWeight>(m, "QuantPackedWeight")
      .def(py::init([](const PackedShape& shape, uintptr_t main, uintptr_t side, uintptr_t side_index, uintptr_t scales,
                       int scale_dtype, uintptr_t zeros) {
        PackedWeight w;
        w.shape = shape;
        w.main = as_ptr<const uint32_t>(main);
        w.side = as_ptr<const uint32_t>(side);
        w.side_index = as_ptr<const int32_t>(side_index);
        w.scales = as_ptr<const void>(scales);
        w.scale_dtype = fl::dtype_from_code(scale_dtype, "fastloss.quant");
        w.zeros = as_ptr<const uint8_t>(zeros);
        return w;
      }));
  auto problem = [](const PackedWeight& w, int dtype, uintptr_t x, int64_t rows, int64_t ldx, uintptr_t bias,
                    uintptr_t y, int64_t ldy) {
    MatmulProblem p;
    p.weight = w;
    p.dtype = fl::dtype_from_code(dtype, "fastloss.quant.matmul");
    p.x = as_ptr<const void>(x);
    p.rows = rows;
    p.ldx = ldx;
    p.bias = as_ptr<const void>(bias);
    p.y = as_ptr(y);
    p.ldy = ldy;
    return p;
  };
  m.def(
      "quant_pack_cpu",
      [](const PackedShape& s, uintptr_t side_index, uintptr_t codes, int64_t ld, uintptr_t main, uintptr_t side) {
        pack_codes_cpu(s, as_ptr<const int32_t>(side_index), as_ptr<const uint8_t>(codes), ld, as_ptr<uint32_t>(main),
                       as_ptr<uint32_t>(side));
      },
      no_gil);
  m.def(
      "quant_unpack_cpu",
      [](const PackedShape& s, uintptr_t side_index, uintptr_t main, uintptr_t side, uintptr_t codes) {
        unpack_codes_cpu(s, as_ptr<const int32_t>(side_index), as_ptr<const uint32_t>(main),
                         as_ptr<const uint32_t>(side), as_ptr<uint8_t>(codes));
      },
      no_gil);
  m.def(
      "quant_dequantize_cpu",
      [](const PackedWeight& w, int out_dtype, uintptr_t out) {
        dequantize_cpu(w, fl::dtype_from_code(out_dtype, "fastloss.quant.dequantize"), as_ptr(out));
      },
      no_gil);
  m.def(
      "quant_matmul_cpu",
      [problem](const PackedWeight& w, int dtype, uintptr_t x, int64_t rows, int64_t ldx, uintptr_t bias, uintptr_t y,
                int64_t ldy) { matmul_cpu(problem(w, dtype, x, rows, ldx, bias, y, ldy)); },
      no_gil);
#if defined(FASTLOSS_WITH_CUDA)
  m.def(
      "quant_pack_cuda",
      [](const PackedShape& s, uintptr_t side_index, uintptr_t codes, int64_t ld, uintptr_t main, uintptr_t side,
         int device, uintptr_t stream) {
        pack_codes_cuda(s, as_ptr<const int32_t>(side_index), as_ptr<const uint8_t>(codes), ld, as_ptr<uint32_t>(main),
                        as_ptr<uint32_t>(side), device, as_stream(stream));
      },
      no_gil);
  m.def(
      "quant_unpack_cuda",
      [](const PackedShape& s, uintptr_t side_index, uintptr_t main, uintptr_t side, uintptr_t codes, int device,
         uintptr_t stream) {
        unpack_codes_cuda(s, as_ptr<const int32_t>(side_index), as_ptr<const uint32_t>(main),
                          as_ptr<const uint32_t>(side), as_ptr<uint8_t>(codes), device, as_stream(stream));
      },
      no_gil);
  m.def(
      "quant_dequantize_cuda",
      [](const PackedWeight& w, int out_dtype, uintptr_t out, int device, uintptr_t stream) {
        dequantize_cuda(w, fl::dtype_from_code(out_dtype, "fastloss.quant.dequantize"), as_ptr(out), device,
                        as_stream(stream));
      },
      no_gil);
  m.def("quant_matmul_cuda_workspace_bytes", &matmul_cuda_workspace_bytes, no_gil);
  m.def(
      "quant_matmul_cuda",
      [problem](const PackedWeight& w, int dtype, uintptr_t x, int64_t rows, int64_t ldx, uintptr_t bias, uintptr_t y,
                int64_t ldy, uintptr_t workspace, int64_t workspace_bytes, int device, uintptr_t stream) {
        matmul_cuda(problem(w, dtype, x, rows, ldx, bias, y, ldy), as_ptr(workspace), workspace_bytes, device,
                    as_stream(stream));
      },
      no_gil);
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastloss kernels (torch-free; called by the ops in fastloss/*.py)";
  m.def("build_info", &build_info, "How this copy of fastloss was built.");
  m.def("set_cpu_thread_limit", &fl::set_cpu_thread_limit, "Caps the threads of the CPU kernels.");
  bind_spherical(m);
  bind_spherical_factored(m);
  bind_quant(m);
  bind_ot(m);
  bind_attention(m);
  bind_metric(m);
  bind_simulator(m);
  bind_device_error(m);
}
