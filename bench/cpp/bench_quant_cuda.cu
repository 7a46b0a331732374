// CUDA cases of the quant family: matmul_cuda on a packed weight (bench_quant.h). The
// harness times each sample on the stream; weights larger than L2 stream from HBM.
// Batch 1 and 4 run on the plan's kernel (the CUDA-core GEMV) and on the tensor-core kernel
// forced with FASTLOSS_QUANT_KERNEL=mma; "quant/copy" is a device-to-device copy of 1 GiB,
// whose GB/s is the copy bandwidth that the matmul cases' GB/s are a fraction of.
#include <cstdlib>
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
        workspace_(workspace_bytes(shape, host_.shape, context.device)),
        outputs_(static_cast<size_t>(shape.rows * shape.out_features)),
        kernel_(shape.kernel) {
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
    // The kernel choice is read at each call (plan_launch), so the forced case sets it around it.
    if (kernel_) setenv("FASTLOSS_QUANT_KERNEL", kernel_, 1);
    fl::quant::matmul_cuda(problem_, workspace_.get(), static_cast<int64_t>(workspace_.bytes()), device_, stream_);
    if (kernel_) unsetenv("FASTLOSS_QUANT_KERNEL");
  }

  void verify() override {
    FL_CUDA_CHECK(cudaStreamSynchronize(stream_));
    require_finite("y", y_.download<fl::Half>(outputs_));
  }

 private:
  static size_t workspace_bytes(const Shape& shape, const fl::quant::PackedShape& packed, int device) {
    if (shape.kernel) setenv("FASTLOSS_QUANT_KERNEL", shape.kernel, 1);
    const int64_t bytes = fl::quant::matmul_cuda_workspace_bytes(shape.rows, packed, device);
    if (shape.kernel) unsetenv("FASTLOSS_QUANT_KERNEL");
    return static_cast<size_t>(bytes);
  }

  fl::CudaDeviceGuard guard_;  // first member: the buffers below are allocated on context.device
  int device_;
  cudaStream_t stream_;
  HostData host_;
  DeviceBuffer main_, side_, side_index_, scales_, zeros_, x_, y_, workspace_;
  size_t outputs_;
  const char* kernel_;
  fl::quant::MatmulProblem problem_{};
};

// The copy-bandwidth reference: cudaMemcpyAsync of 1 GiB device to device (2 GiB of traffic).
class CudaCopy final : public PreparedCase {
 public:
  static constexpr size_t kBytes = size_t(1) << 30;
  explicit CudaCopy(const DeviceContext& context)
      : guard_(context.device), stream_(context.stream), from_(kBytes), to_(kBytes) {
    FL_CUDA_CHECK(cudaMemsetAsync(from_.get(), 0, kBytes, stream_));
  }
  void run() override { FL_CUDA_CHECK(cudaMemcpyAsync(to_.get(), from_.get(), kBytes, cudaMemcpyDeviceToDevice, stream_)); }
  void verify() override { FL_CUDA_CHECK(cudaStreamSynchronize(stream_)); }

 private:
  fl::CudaDeviceGuard guard_;
  cudaStream_t stream_;
  DeviceBuffer from_, to_;
};

CaseSpec copy_case() {
  CaseSpec spec;
  spec.name = "quant/copy/1GiB";
  spec.device = Device::Cuda;
  spec.dtype = "uint8";
  spec.rows = 1;
  spec.cols = static_cast<int64_t>(CudaCopy::kBytes);
  spec.bytes = 2 * static_cast<int64_t>(CudaCopy::kBytes);
  spec.prepare = [](const DeviceContext& context) -> std::unique_ptr<PreparedCase> {
    return std::make_unique<CudaCopy>(context);
  };
  return spec;
}

std::vector<CaseSpec> cuda_cases(bool quick) {
  if (quick) return make_cases<CudaMatmul>(Device::Cuda, {{4096, 4096, 1, 0}});
  std::vector<Shape> shapes;
  for (int64_t n : {28672, 8192}) {
    for (int64_t rows : {1, 4}) {
      shapes.push_back({n, 8192, rows, 0});
      shapes.push_back({n, 8192, rows, 0, "mma"});
    }
    shapes.push_back({n, 8192, 16, 0});
  }
  shapes.push_back({28672, 8192, 64, 0});
  shapes.push_back({28672, 8192, 1, 25});
  std::vector<CaseSpec> cases = make_cases<CudaMatmul>(Device::Cuda, shapes);
  cases.push_back(copy_case());
  return cases;
}

const FamilyRegistrar registrar("quant/cuda", &cuda_cases);

}  // namespace
}  // namespace quant
}  // namespace fl_bench
