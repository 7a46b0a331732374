// CUDA cases of the ot family: solve_cuda with a fixed iteration count (bench_ot.h), so the
// loop reads nothing back and every sample launches the same kernels.
#include <memory>
#include <vector>

#include "bench_ot.h"
#include "common/cuda_check.cuh"
#include "cuda_buffer.cuh"
#include "registry.h"

namespace fl_bench {
namespace ot {
namespace {

class CudaSolve final : public PreparedCase {
 public:
  CudaSolve(const DeviceContext& context, const Shape& shape)
      : guard_(context.device),
        device_(context.device),
        stream_(context.stream),
        host_(shape),
        cost_(host_.cost),
        x_(host_.x),
        y_(host_.y),
        log_a_(host_.log_a),
        log_b_(host_.log_b),
        f_(static_cast<size_t>(shape.batch * shape.n) * 4),
        g_(static_cast<size_t>(shape.batch * shape.m) * 4),
        n_iter_(static_cast<size_t>(shape.batch) * 4),
        error_(static_cast<size_t>(shape.batch) * 4),
        outputs_(static_cast<size_t>(shape.batch * shape.n)) {
    args_ = solve_args(shape, cost_.get(), x_.get(), y_.get(), log_a_.get(), log_b_.get(), f_.get(), g_.get(),
                       static_cast<int32_t*>(n_iter_.get()), error_.get(), nullptr);
    workspace_ = std::make_unique<DeviceBuffer>(static_cast<size_t>(fl::ot::solve_workspace_bytes(args_.geom)));
    args_.workspace = workspace_->get();
  }

  void run() override {
    FL_CUDA_CHECK(cudaMemsetAsync(f_.get(), 0, f_.bytes(), stream_));
    FL_CUDA_CHECK(cudaMemsetAsync(g_.get(), 0, g_.bytes(), stream_));
    fl::ot::solve_cuda(args_, device_, stream_);
  }

  void verify() override {
    FL_CUDA_CHECK(cudaStreamSynchronize(stream_));
    require_finite("f", f_.download<float>(outputs_));
  }

 private:
  fl::CudaDeviceGuard guard_;  // first member: the buffers below are allocated on context.device
  int device_;
  cudaStream_t stream_;
  HostData host_;
  DeviceBuffer cost_, x_, y_, log_a_, log_b_, f_, g_, n_iter_, error_;
  std::unique_ptr<DeviceBuffer> workspace_;
  size_t outputs_;
  fl::ot::SolveArgs args_;
};

std::vector<CaseSpec> cuda_cases(bool quick) {
  if (quick) return make_cases<CudaSolve>(Device::Cuda, {{1, 4096, 4096, 3}});
  return make_cases<CudaSolve>(Device::Cuda, {{1, 10000, 10000, 0},
                                              {1, 10000, 10000, 3},
                                              {1, 10000, 10000, 64},
                                              {1, 10000, 10000, 128},
                                              {1, 100000, 100000, 3},
                                              {1, 100000, 100000, 64},
                                              {64, 512, 512, 0}});
}

const FamilyRegistrar registrar("ot/cuda", &cuda_cases);

}  // namespace
}  // namespace ot
}  // namespace fl_bench
