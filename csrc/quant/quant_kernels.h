// Entry points of the 2/4-bit weight family: packing, dequantization and the fused
// matmul y = x W^T + bias, on CPU and CUDA. The format is in packed_layout.h.
#pragma once

#include <cstdint>

#include "common/dtype.h"
#include "common/stream.h"
#include "quant/packed_layout.h"

namespace fl {
namespace quant {

// The arrays of a packed weight, as a QuantizedWeight holds them.
struct PackedWeight {
  PackedShape shape;
  const uint32_t* main = nullptr;       // [N_pad / 8][k_words][32]
  const uint32_t* side = nullptr;       // [N_pad / 8][side_k_words][32]
  const int32_t* side_index = nullptr;  // [G]: rank among the 4-bit K-blocks, -1 for a 2-bit K-block
  const void* scales = nullptr;         // [G][N_pad], scale_dtype
  DType scale_dtype = DType::Float16;   // Float16 or BFloat16
  const uint8_t* zeros = nullptr;       // [G][N_pad]
};

// y[m, n] = sum_k x[m, k] * w[n, k] + bias[n] for m < rows, with w the dequantized weight
// before its output rounding (the kernels apply each group's scale to the group's sum).
struct MatmulProblem {
  PackedWeight weight;
  DType dtype = DType::Float16;  // of x, y and bias
  const void* x = nullptr;       // [rows][ldx], K columns read
  int64_t rows = 0;              // M
  int64_t ldx = 0;
  const void* bias = nullptr;    // [N] or null
  void* y = nullptr;             // [rows][ldy], N columns written
  int64_t ldy = 0;
  const char* op_name = "fastloss.quant.matmul";
};

// Raise std::invalid_argument naming `op_name` when the arrays cannot describe a packed weight.
void validate_packed_shape(const PackedShape& shape, const char* op_name);
void validate_matmul(const MatmulProblem& p, bool cuda);

// ---- CPU ----
// A scale as float, from a host float16 / bfloat16 array.
inline float host_scale(const void* scales, DType dtype, int64_t index) {
  if (dtype == DType::Float16) return to_float(static_cast<const Half*>(scales)[index]);
  return to_float(static_cast<const BFloat16*>(scales)[index]);
}

// codes: [N][ld] uint8, values < 4 in 2-bit K-blocks and < 16 in 4-bit ones (the caller checks);
// writes every word of main and side, the padding included (zero codes).
void pack_codes_cpu(const PackedShape& shape, const int32_t* side_index, const uint8_t* codes, int64_t ld,
                    uint32_t* main, uint32_t* side);
// codes: [N][K] uint8.
void unpack_codes_cpu(const PackedShape& shape, const int32_t* side_index, const uint32_t* main, const uint32_t* side,
                      uint8_t* codes);
// out: [N][K] of out_dtype (float32, float16, bfloat16 or float64).
void dequantize_cpu(const PackedWeight& w, DType out_dtype, void* out);
void matmul_cpu(const MatmulProblem& p);

// ---- CUDA ---- (same contracts; x needs ldx % 8 == 0 and 16-byte alignment, and so do the
// packed arrays (main, side, scales, zeros), which cp.async copies in 16-byte chunks; the dtype
// of x must be the scale dtype.)
void pack_codes_cuda(const PackedShape& shape, const int32_t* side_index, const uint8_t* codes, int64_t ld,
                     uint32_t* main, uint32_t* side, int device, cudaStream_t stream);
void unpack_codes_cuda(const PackedShape& shape, const int32_t* side_index, const uint32_t* main,
                       const uint32_t* side, uint8_t* codes, int device, cudaStream_t stream);
void dequantize_cuda(const PackedWeight& w, DType out_dtype, void* out, int device, cudaStream_t stream);
// The partial sums of row blocks shared by two CTAs need float32 scratch space: the caller
// allocates this many bytes.
int64_t matmul_cuda_workspace_bytes(int64_t rows, const PackedShape& shape, int device);
void matmul_cuda(const MatmulProblem& p, void* workspace, int64_t workspace_bytes, int device, cudaStream_t stream);

}  // namespace quant
}  // namespace fl
