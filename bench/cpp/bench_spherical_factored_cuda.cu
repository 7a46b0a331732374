// CUDA cases of the factored output layer's kernels (see bench_spherical_factored.h). The scatter
// is timed in its atomic form (the default when determinism is not requested).
#include <vector>

#include "bench_spherical_factored.h"
#include "common/cuda_check.cuh"
#include "cuda_buffer.cuh"
#include "registry.h"

namespace fl_bench {
namespace spherical_factored {
namespace {

class CudaFactoredStep final : public PreparedCase {
 public:
  CudaFactoredStep(const DeviceContext& context, Step step, Shape shape)
      : guard_(context.device),
        device_(context.device),
        stream_(context.stream),
        step_(step),
        m_(static_cast<size_t>(shape.samples)),
        data_(shape),
        h_(data_.h),
        sh_(data_.sh),
        weight_rows_(data_.weight_rows),
        target_(data_.target),
        grad_loss_(data_.grad_loss),
        loss_(m_ * 8),
        partials_(m_ * 3 * 8),
        ytilde_(m_ * static_cast<size_t>(fl::spherical::packed_width(shape.features)) * 8),
        scaled_(m_ * 3 * 8),
        coef_(m_ * 2 * 8),
        square_(std::vector<double>(m_ * m_, 1e-3)),
        gram_(m_ * m_ * 8),
        r_(data_.h) {
    problem_ = data_.problem(h_.get(), sh_.get(), weight_rows_.get(), static_cast<const int64_t*>(target_.get()));
    head();
    prepare();
    FL_CUDA_CHECK(cudaStreamSynchronize(stream_));
  }

  void run() override {
    if (step_ == Step::Head || step_ == Step::All) head();
    if (step_ == Step::Prepare || step_ == Step::All) prepare();
    if (step_ == Step::Gram || step_ == Step::All)
      fl::spherical::factored_gram_cuda(problem_, scaled_.get(), square_.get(), square_.get(), gram_.get(), device_, stream_);
    if (step_ == Step::Scatter || step_ == Step::All)
      fl::spherical::factored_scatter_cuda(problem_, weight_rows_.get(), scaled_.get(), r_.get(), 1e-9, nullptr, device_,
                                           stream_);
  }

  void verify() override {
    FL_CUDA_CHECK(cudaStreamSynchronize(stream_));
    require_finite("loss", loss_.download<double>(m_));
    require_finite("ytilde", ytilde_.download<double>(ytilde_.bytes() / 8));
    if (step_ == Step::Gram || step_ == Step::All) require_finite("gram", gram_.download<double>(m_ * m_));
  }

 private:
  void head() { fl::spherical::factored_head_cuda(problem_, loss_.get(), partials_.get(), device_, stream_); }
  void prepare() {
    fl::spherical::factored_prepare_cuda(problem_, partials_.get(), grad_loss_.get(), 1, ytilde_.get(), scaled_.get(),
                                         coef_.get(), device_, stream_);
  }

  fl::CudaDeviceGuard guard_;  // first member: the buffers below are allocated on context.device
  int device_;
  cudaStream_t stream_;
  Step step_;
  size_t m_;
  StepData data_;
  DeviceBuffer h_, sh_, weight_rows_, target_, grad_loss_, loss_, partials_, ytilde_, scaled_, coef_, square_, gram_, r_;
  fl::spherical::FactoredProblem problem_{};
};

std::vector<CaseSpec> cuda_cases(bool quick) {
  const std::vector<Shape> shapes = quick ? std::vector<Shape>{{5000, 32, 16}}
                                          : std::vector<Shape>{{793471, 512, 128}, {793471, 512, 1024}, {793471, 2048, 1024}};
  return make_cases<CudaFactoredStep>(Device::Cuda, shapes);
}

const FamilyRegistrar registrar("spherical_factored/cuda", &cuda_cases);

}  // namespace
}  // namespace spherical_factored
}  // namespace fl_bench
