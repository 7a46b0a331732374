// CUDA cases of the spherical family: dense_loss_forward_cuda / _backward_cuda,
// through the public entry points of spherical/dense_loss.h only. The host
// element type picks the dtype; fl::BFloat16 has __nv_bfloat16's layout, so the
// same host buffers are uploaded as they are.
#include <vector>

#include "bench_data.h"
#include "bench_spherical.h"
#include "common/cuda_check.cuh"
#include "cuda_buffer.cuh"
#include "registry.h"

namespace fl_bench {
namespace spherical {
namespace {

template <class T>
class CudaDenseLoss final : public PreparedCase {
  using Acc = typename fl::AccType<T>::type;

 public:
  CudaDenseLoss(const DeviceContext& context, const fl::spherical::LossParams& params, Pass pass, Shape shape)
      : guard_(context.device),
        device_(context.device),
        stream_(context.stream),
        pass_(pass),
        rows_(static_cast<size_t>(shape.rows)),
        elements_(static_cast<size_t>(shape.rows * shape.cols)),
        logits_(random_logits<T>(shape.rows * shape.cols)),
        target_(random_targets(shape.rows, shape.cols)),
        loss_(rows_ * sizeof(Acc)),
        coef_(rows_ * fl::spherical::kCoefficientsPerRow * sizeof(Acc)),
        grad_loss_(std::vector<Acc>(rows_, Acc(1))),
        grad_(pass == Pass::Forward ? 0 : elements_ * sizeof(T)),
        // Sized by the library, as a caller must: long rows split across blocks need it.
        workspace_(static_cast<size_t>(
            fl::spherical::dense_loss_forward_cuda_workspace_bytes(shape.rows, shape.cols, context.device))) {
    problem_ = make_problem(DTypeOf<T>::value, logits_.get(), shape, static_cast<const int64_t*>(target_.get()),
                            params);
    // Backward alone still needs the coefficients that a forward pass saves.
    if (pass_ == Pass::Backward) {
      forward();
      FL_CUDA_CHECK(cudaStreamSynchronize(stream_));
    }
  }

  void run() override {
    if (pass_ != Pass::Backward) forward();
    if (pass_ != Pass::Forward) backward();
  }

  void verify() override {
    FL_CUDA_CHECK(cudaStreamSynchronize(stream_));
    require_finite("loss", loss_.download<Acc>(rows_));
    if (pass_ != Pass::Forward) require_finite("grad_logits", grad_.download<T>(elements_));
  }

 private:
  void forward() {
    fl::spherical::dense_loss_forward_cuda(problem_, loss_.get(), coef_.get(), workspace_.get(),
                                           static_cast<int64_t>(workspace_.bytes()), device_, stream_);
  }
  void backward() {
    fl::spherical::dense_loss_backward_cuda(problem_, grad_loss_.get(), 1, coef_.get(), grad_.get(), device_,
                                            stream_);
  }

  fl::CudaDeviceGuard guard_;  // first member: the buffers below are allocated on context.device
  int device_;
  cudaStream_t stream_;
  Pass pass_;
  size_t rows_;
  size_t elements_;
  DeviceBuffer logits_;
  DeviceBuffer target_;
  DeviceBuffer loss_;
  DeviceBuffer coef_;
  DeviceBuffer grad_loss_;
  DeviceBuffer grad_;
  DeviceBuffer workspace_;
  fl::spherical::DenseLossProblem problem_{};
};

std::vector<CaseSpec> cuda_cases(bool quick) {
  // Default: an LLM-size vocabulary, a very long row with few of them (the
  // split-row path), and many short rows (the warp-per-row path).
  const std::vector<Shape> shapes =
      quick ? std::vector<Shape>{{8, 4096}} : std::vector<Shape>{{64, 131072}, {16, 1048576}, {8192, 512}};
  return make_cases<CudaDenseLoss>(Device::Cuda, shapes);
}

const FamilyRegistrar registrar("spherical/cuda", &cuda_cases);

}  // namespace
}  // namespace spherical
}  // namespace fl_bench
