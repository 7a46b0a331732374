// CUDA cases of the metric family (bench_metric.h): the issue's GPU goals through
// metric/metric_kernels.h. Symmetric CLIP in bfloat16 (forward with the column terms, then the
// backward of the mean of both directions) and the Multi-Similarity loss with mining in float32
// (the forward with its fused gradient, as fastloss.metric runs it under autograd).
#include <cuda_bf16.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "bench_data.h"
#include "bench_metric.h"
#include "common/cuda_check.cuh"
#include "cuda_buffer.cuh"
#include "harness.h"
#include "metric/metric_kernels.h"
#include "registry.h"

namespace fl_bench {
namespace metric {
namespace {

using fl::metric::LossKind;

template <class T>
class CudaPairLoss final : public PreparedCase {
 public:
  CudaPairLoss(const DeviceContext& context, const Shape& shape)
      : guard_(context.device),
        device_(context.device),
        stream_(context.stream),
        shape_(shape),
        n_(shape.batch),
        x_(unit_rows<T>(n_, shape.dim, 20261123)),
        labels_(random_labels(n_, 20261124)),
        terms_(static_cast<size_t>(n_ * fl::metric::kRowTerms) * 4),
        counts_(terms_.bytes()),
        stats_(static_cast<size_t>(n_ * fl::metric::kRowStats) * 4),
        col_terms_(static_cast<size_t>(n_) * 4),
        col_stats_(static_cast<size_t>(n_) * 4),
        grad_row_(std::vector<float>(static_cast<size_t>(n_ * fl::metric::kRowTerms), upstream(shape))),
        grad_col_(std::vector<float>(static_cast<size_t>(n_), upstream(shape))),
        grad_x_(static_cast<size_t>(n_ * shape.dim) * 4),
        grad_y_(grad_x_.bytes()),
        grad_scale_(4),
        active_(static_cast<size_t>(n_) * 4) {
    p_ = problem(shape, DTypeOf<T>::value, x_.get(), static_cast<const int64_t*>(labels_.get()));
    // Both passes share one workspace, as large as the larger needs.
    workspace_bytes_ = std::max(fl::metric::cuda_workspace_bytes(p_, false), fl::metric::cuda_workspace_bytes(p_, true));
    workspace_ = std::make_unique<DeviceBuffer>(static_cast<size_t>(workspace_bytes_));
  }
  void run() override {
    fl::metric::ForwardOut out;
    out.row_terms = terms_.get();
    out.row_counts = counts_.get();
    out.row_stats = stats_.get();
    if (shape_.symmetric) {
      out.col_terms = col_terms_.get();
      out.col_stats = col_stats_.get();
    } else {  // the fused gradient: no backward pass
      out.unit_grad_x = grad_x_.get();
      out.unit_grad_y = grad_y_.get();
      out.unit_grad_scale = grad_scale_.get();
      out.row_active = active_.get();
    }
    fl::metric::forward_cuda(p_, out, workspace_->get(), workspace_bytes_, device_, stream_);
    if (!shape_.symmetric) return;
    fl::metric::BackwardArgs a;
    a.row_stats = stats_.get();
    a.col_stats = col_stats_.get();
    a.grad_row = grad_row_.get();
    a.grad_col = grad_col_.get();
    a.grad_x = grad_x_.get();
    a.grad_y = grad_y_.get();
    a.grad_scale = grad_scale_.get();
    fl::metric::backward_cuda(p_, a, workspace_->get(), workspace_bytes_, device_, stream_);
  }
  void verify() override {
    FL_CUDA_CHECK(cudaStreamSynchronize(stream_));
    const size_t count = static_cast<size_t>(n_ * shape_.dim);
    require_finite("row terms", terms_.download<float>(static_cast<size_t>(n_ * fl::metric::kRowTerms)));
    require_finite("grad_x", grad_x_.download<float>(count));
    require_finite("grad_y", grad_y_.download<float>(count));
  }

 private:
  // The mean over both directions (CLIP) or over the rows.
  static float upstream(const Shape& shape) {
    return 1.0f / static_cast<float>((shape.symmetric ? 2 : 1) * shape.batch);
  }

  fl::CudaDeviceGuard guard_;  // first member: the buffers below are allocated on context.device
  int device_;
  cudaStream_t stream_;
  Shape shape_;
  int64_t n_;
  DeviceBuffer x_, labels_, terms_, counts_, stats_, col_terms_, col_stats_, grad_row_, grad_col_, grad_x_, grad_y_,
      grad_scale_, active_;
  fl::metric::PairProblem p_;
  int64_t workspace_bytes_ = 0;
  std::unique_ptr<DeviceBuffer> workspace_;
};

template <class T>
CaseSpec make_case(const Shape& shape, const char* dtype, int64_t element_bytes) {
  CaseSpec spec;
  spec.name = std::string("metric/") + shape.name + "/fwd+bwd/B=" + std::to_string(shape.batch);
  spec.device = Device::Cuda;
  spec.dtype = dtype;
  spec.rows = shape.batch;
  spec.cols = shape.dim;
  spec.bytes = 3 * shape.batch * shape.dim * element_bytes;
  spec.prepare = [shape](const DeviceContext& context) -> std::unique_ptr<PreparedCase> {
    return std::make_unique<CudaPairLoss<T>>(context, shape);
  };
  return spec;
}

std::vector<CaseSpec> cuda_cases(bool quick) {
  const int64_t clip_batch = quick ? 4096 : 65536, ms_batch = quick ? 256 : 1024;
  return {
      make_case<fl::BFloat16>({"clip_symmetric", LossKind::InfoNCE, clip_batch, 768, 1.0 / 0.07, 0, 0, 0, 0, true},
                              "bfloat16", 2),
      make_case<float>({"multi_similarity+mining", LossKind::MultiSimilarity, ms_batch, 512, 2.0, 50.0, 0.5, 0.1, 1,
                        false},
                       "float32", 4),
  };
}

const FamilyRegistrar registrar("metric/cuda", &cuda_cases);

}  // namespace
}  // namespace metric
}  // namespace fl_bench
