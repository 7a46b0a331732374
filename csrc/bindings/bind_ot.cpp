// Bindings of the optimal-transport family (csrc/ot/). A Geometry is built once per call in Python
// (fastloss.ot._ops) and passed to every entry point; pointers travel as integers.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "bindings/pointers.h"
#include "ot/ot_kernels.h"

#if defined(FASTLOSS_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace py = pybind11;

namespace {

using namespace fl::ot;

using fl::bindings::ptr;

SoftminArgs softmin_args(const Geometry& geom, bool transpose, double eps, double damping, uintptr_t h,
                         uintptr_t log_w, uintptr_t out, uintptr_t old, uintptr_t log_w_dst, uintptr_t row_err) {
  SoftminArgs a;
  a.geom = geom;
  a.transpose = transpose;
  a.eps = eps;
  a.damping = damping;
  a.h = ptr(h);
  a.log_w = ptr(log_w);
  a.out = ptr(out);
  a.old = ptr(old);
  a.log_w_dst = ptr(log_w_dst);
  a.row_err = ptr(row_err);
  return a;
}

SolveArgs solve_args(const Geometry& geom, uintptr_t log_a, uintptr_t log_b, uintptr_t f, uintptr_t g, double eps,
                     double eps_start, double eps_scaling, double rho, double tol, int64_t max_iter,
                     int64_t check_every, uintptr_t n_iter, uintptr_t error, uintptr_t workspace) {
  SolveArgs a;
  a.geom = geom;
  a.log_a = ptr(log_a);
  a.log_b = ptr(log_b);
  a.f = ptr(f);
  a.g = ptr(g);
  a.eps = eps;
  a.eps_start = eps_start;
  a.eps_scaling = eps_scaling;
  a.rho = rho;
  a.tol = tol;
  a.max_iter = max_iter;
  a.check_every = check_every;
  a.n_iter = ptr<int32_t>(n_iter);
  a.error = ptr(error);
  a.workspace = ptr(workspace);
  return a;
}

TransportArgs transport_args(const Geometry& geom, bool transpose, double eps, uintptr_t f, uintptr_t g,
                             uintptr_t log_a, uintptr_t log_b, uintptr_t mass, uintptr_t cost, uintptr_t grad,
                             uintptr_t src_weight) {
  TransportArgs a;
  a.geom = geom;
  a.transpose = transpose;
  a.eps = eps;
  a.f = ptr(f);
  a.g = ptr(g);
  a.log_a = ptr(log_a);
  a.log_b = ptr(log_b);
  a.mass = ptr(mass);
  a.cost = ptr(cost);
  a.grad = ptr(grad);
  a.src_weight = ptr(src_weight);
  return a;
}

PlanArgs plan_args(const Geometry& geom, double eps, uintptr_t f, uintptr_t g, uintptr_t log_a, uintptr_t log_b,
                   uintptr_t plan) {
  PlanArgs a;
  a.geom = geom;
  a.eps = eps;
  a.f = ptr(f);
  a.g = ptr(g);
  a.log_a = ptr(log_a);
  a.log_b = ptr(log_b);
  a.plan = ptr(plan);
  return a;
}

SparseDualArgs sparse_args(const Geometry& geom, double gamma, int64_t k, uintptr_t alpha, uintptr_t beta,
                           uintptr_t row_sum, uintptr_t col_sum, uintptr_t col_cost, uintptr_t col_sq,
                           uintptr_t threshold) {
  SparseDualArgs a;
  a.geom = geom;
  a.gamma = gamma;
  a.k = k;
  a.alpha = ptr(alpha);
  a.beta = ptr(beta);
  a.row_sum = ptr(row_sum);
  a.col_sum = ptr(col_sum);
  a.col_cost = ptr(col_cost);
  a.col_sq = ptr(col_sq);
  a.threshold = ptr(threshold);
  return a;
}

// <name>_cpu(args...) and, in a CUDA build, <name>_cuda(args..., device, stream): the arguments are
// those of the builder that makes the entry point's argument struct.
template <class Args, class... Params>
void def_cpu(py::module_& m, const std::string& name, Args (*build)(Params...), void (*kernel)(const Args&)) {
  m.def((name + "_cpu").c_str(), [build, kernel](Params... params) { kernel(build(params...)); },
        py::call_guard<py::gil_scoped_release>());
}

#if defined(FASTLOSS_WITH_CUDA)
template <class Args, class... Params>
void def_cuda(py::module_& m, const std::string& name, Args (*build)(Params...),
              void (*kernel)(const Args&, int, cudaStream_t)) {
  m.def(
      (name + "_cuda").c_str(),
      [build, kernel](Params... params, int device, uintptr_t stream) {
        kernel(build(params...), device, reinterpret_cast<cudaStream_t>(stream));
      },
      py::call_guard<py::gil_scoped_release>());
}
#endif

}  // namespace

void bind_ot(py::module_& m) {
  py::class_<Geometry>(m, "OtGeometry")
      .def(py::init([](int dtype, int64_t batch, int64_t n, int64_t m_, int64_t dim, int p, uintptr_t cost,
                       uintptr_t x, uintptr_t y) {
             Geometry g;
             g.dtype = fl::dtype_from_code(dtype, "fastloss.ot");
             g.batch = batch;
             g.n = n;
             g.m = m_;
             g.dim = dim;
             g.p = p;
             g.cost = ptr(cost);
             g.x = ptr(x);
             g.y = ptr(y);
             return g;
           }),
           py::arg("dtype"), py::arg("batch"), py::arg("n"), py::arg("m"), py::arg("dim"), py::arg("p"),
           py::arg("cost"), py::arg("x"), py::arg("y"));
  m.def("ot_solve_workspace_bytes", &solve_workspace_bytes);

  def_cpu(m, "ot_softmin", &softmin_args, &softmin_cpu);
  def_cpu(m, "ot_solve", &solve_args, &solve_cpu);
  def_cpu(m, "ot_transport", &transport_args, &transport_cpu);
  def_cpu(m, "ot_plan", &plan_args, &plan_cpu);
  def_cpu(m, "ot_sparse_dual", &sparse_args, &sparse_dual_cpu);
#if defined(FASTLOSS_WITH_CUDA)
  def_cuda(m, "ot_softmin", &softmin_args, &softmin_cuda);
  def_cuda(m, "ot_solve", &solve_args, &solve_cuda);
  def_cuda(m, "ot_transport", &transport_args, &transport_cuda);
  def_cuda(m, "ot_plan", &plan_args, &plan_cuda);
  def_cuda(m, "ot_sparse_dual", &sparse_args, &sparse_dual_cuda);
#endif
}
