// CUDA cases of the attention family (bench_attention.h): bf16, d = 128, causal, forward or
// forward + backward, at the FA3 paper's 16k tokens per batch (B x N = 16384, 16 heads).
#include <cuda_bf16.h>

#include <memory>
#include <vector>

#include "bench_attention.h"
#include "common/cuda_check.cuh"
#include "cuda_buffer.cuh"
#include "registry.h"

namespace fl_bench {
namespace attention {
namespace {

class CudaAttention final : public PreparedCase {
 public:
  CudaAttention(const DeviceContext& context, const Shape& shape)
      : guard_(context.device),
        device_(context.device),
        stream_(context.stream),
        shape_(shape),
        count_(static_cast<size_t>(shape.batch * shape.heads * shape.len * shape.dim)),
        q_(random_rows<fl::BFloat16>(shape, 1, true)),
        k_(random_rows<fl::BFloat16>(shape, 2, true)),
        v_(random_rows<fl::BFloat16>(shape, 3, false)),
        grad_out_(random_rows<fl::BFloat16>(shape, 4, false)),
        out_(count_ * 2),
        grad_q_(count_ * 2),
        grad_k_(count_ * 2),
        grad_v_(count_ * 2),
        stats_(static_cast<size_t>(shape.batch * shape.heads * shape.len * 3) * 4),
        row_terms_(static_cast<size_t>(shape.batch * shape.heads * shape.len * 2) * 4) {
    problem_ = problem(shape, fl::DType::BFloat16, q_.get(), k_.get(), v_.get());
    workspace_bytes_ = fl::attention::forward_cuda_workspace_bytes(problem_, device_);
    workspace_ = std::make_unique<DeviceBuffer>(static_cast<size_t>(workspace_bytes_));
  }
  void run() override {
    fl::attention::forward_cuda(problem_, out_.get(), stats_.get(), workspace_->get(), workspace_bytes_, device_,
                                stream_);
    if (!shape_.backward) return;
    fl::attention::BackwardArgs a;
    a.out = out_.get();
    a.grad_out = grad_out_.get();
    a.stats = stats_.get();
    a.grad_q = grad_q_.get();
    a.grad_k = grad_k_.get();
    a.grad_v = grad_v_.get();
    a.row_terms = row_terms_.get();
    fl::attention::backward_cuda(problem_, a, device_, stream_);
  }
  void verify() override {
    FL_CUDA_CHECK(cudaStreamSynchronize(stream_));
    require_finite("out", out_.download<fl::BFloat16>(count_));
    if (shape_.backward) {
      require_finite("grad_q", grad_q_.download<fl::BFloat16>(count_));
      require_finite("grad_k", grad_k_.download<fl::BFloat16>(count_));
      require_finite("grad_v", grad_v_.download<fl::BFloat16>(count_));
    }
  }

 private:
  fl::CudaDeviceGuard guard_;  // first member: the buffers below are allocated on context.device
  int device_;
  cudaStream_t stream_;
  Shape shape_;
  size_t count_;
  DeviceBuffer q_, k_, v_, grad_out_, out_, grad_q_, grad_k_, grad_v_, stats_, row_terms_;
  fl::attention::AttentionProblem problem_;
  int64_t workspace_bytes_ = 0;
  std::unique_ptr<DeviceBuffer> workspace_;
};

std::vector<CaseSpec> cuda_cases(bool quick) {
  if (quick) return make_cases<CudaAttention>(Device::Cuda, "bfloat16", 2, {{1, 4, 1024, 128, true, true}});
  std::vector<Shape> shapes;
  for (int64_t len : {1024, 4096, 16384})
    for (bool reweight : {false, true})
      for (bool backward : {false, true}) shapes.push_back({16384 / len, 16, len, 128, reweight, backward});
  return make_cases<CudaAttention>(Device::Cuda, "bfloat16", 2, shapes);
}

const FamilyRegistrar registrar("attention/cuda", &cuda_cases);

}  // namespace
}  // namespace attention
}  // namespace fl_bench
