// CUDA cases of the quant family: matmul_cuda on a packed weight (bench_quant.h). The
// harness times each sample on the stream; weights larger than L2 stream from HBM.
#include <vector>

#include "bench_quant.h"
#include "common/cuda_check.cuh"
#include "cuda_buffer.cuh"
#include "registry.h"

namespace fl_bench {
namespace quant {
namespace {

class CudaMatmul final : public PreparedCase {
 public:
  CudaMatmul(const DeviceContext& context, const Shape& shape)
      : guard_(context.device),
        device_(context.device),
        stream_(context.stream),
        host_(shape),
        main_(host_.main),
        side_(host_.side.empty() ? std::vector<uint32_t>{0u} : host_.side),
        side_index_(host_.side_index),
        scales_(host_.scales),
        zeros_(host_.zeros),
        x_(host_.x),
        y_(static_cast<size_t>(shape.rows * shape.out_features) * 2),
        workspace_(static_cast<size_t>(fl::quant::matmul_cuda_workspace_bytes(shape.rows, host_.shape, context.device))),
        outputs_(static_cast<size_t>(shape.rows * shape.out_features)) {
    problem_.weight = fl::quant::PackedWeight{host_.shape,
                                              static_cast<const uint32_t*>(main_.get()),
                                              static_cast<const uint32_t*>(side_.get()),
                                              static_cast<const int32_t*>(side_index_.get()),
                                              scales_.get(),
                                              fl::DType::Float16,
                                              static_cast<const uint8_t*>(zeros_.get())};
    problem_.dtype = fl::DType::Float16;
    problem_.x = x_.get();
    problem_.rows = shape.rows;
    problem_.ldx = shape.in_features;
    problem_.y = y_.get();
    problem_.ldy = shape.out_features;
  }

  void run() override {
    fl::quant::matmul_cuda(problem_, workspace_.get(), static_cast<int64_t>(workspace_.bytes()), device_, stream_);
  }

  void verify() override {
    FL_CUDA_CHECK(cudaStreamSynchronize(stream_));
    require_finite("y", y_.download<fl::Half>(outputs_));
  }

 private:
  fl::CudaDeviceGuard guard_;  // first member: the buffers below are allocated on context.device
  int device_;
  cudaStream_t stream_;
  HostData host_;
  DeviceBuffer main_, side_, side_index_, scales_, zeros_, x_, y_, workspace_;
  size_t outputs_;
  fl::quant::MatmulProblem problem_{};
};

std::vector<CaseSpec> cuda_cases(bool quick) {
  if (quick) return make_cases<CudaMatmul>(Device::Cuda, {{4096, 4096, 1, 0}});
  std::vector<Shape> shapes;
  for (int64_t rows : {1, 16, 64}) shapes.push_back({28672, 8192, rows, 0});
  shapes.push_back({28672, 8192, 1, 25});
  for (int64_t rows : {1, 16}) shapes.push_back({8192, 8192, rows, 0});
  return make_cases<CudaMatmul>(Device::Cuda, shapes);
}

const FamilyRegistrar registrar("quant/cuda", &cuda_cases);

}  // namespace
}  // namespace quant
}  // namespace fl_bench
