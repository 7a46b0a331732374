// Argument checks shared by the CPU and CUDA entry points: they run before anything is
// written, so a rejected call leaves every output untouched.
#include "common/error.h"
#include "quant/quant_kernels.h"

namespace fl {
namespace quant {

void validate_packed_shape(const PackedShape& s, const char* op_name) {
  const bool power_of_two = s.group_size > 0 && (s.group_size & (s.group_size - 1)) == 0;
  FL_CHECK_ARG(power_of_two && s.group_size >= kWordCols, op_name,
               ": group_size must be a power of two >= 64 (the packed word tile is 64 columns), got ",
               s.group_size);
  FL_CHECK_ARG(s.rows >= 1 && s.cols >= 1, op_name, ": the weight must have at least one row and one column, got ",
               s.rows, " x ", s.cols);
  const PackedShape expected = make_packed_shape(s.rows, s.cols, s.group_size, s.side_groups);
  FL_CHECK_ARG(s.rows_padded == expected.rows_padded && s.groups == expected.groups &&
                   s.k_words == expected.k_words && s.side_k_words == expected.side_k_words,
               op_name, ": inconsistent packed shape for a ", s.rows, " x ", s.cols, " weight");
  FL_CHECK_ARG(s.side_groups >= 0 && s.side_groups <= s.groups, op_name, ": ", s.side_groups,
               " 4-bit K-blocks out of ", s.groups);
}

void validate_matmul(const MatmulProblem& p, bool cuda) {
  const PackedWeight& w = p.weight;
  validate_packed_shape(w.shape, p.op_name);
  FL_CHECK_ARG(w.scale_dtype == DType::Float16 || w.scale_dtype == DType::BFloat16, p.op_name,
               ": scales must be float16 or bfloat16, got ", dtype_name(w.scale_dtype));
  FL_CHECK_ARG(p.rows >= 0, p.op_name, ": negative row count");
  FL_CHECK_ARG(p.ldx >= w.shape.cols && p.ldy >= w.shape.rows, p.op_name, ": row strides ", p.ldx, ", ", p.ldy,
               " shorter than the rows");
  if (cuda) {
    FL_CHECK_ARG(p.dtype == w.scale_dtype, p.op_name, ": x is ", dtype_name(p.dtype), " but the weight's scales are ",
                 dtype_name(w.scale_dtype), "; convert one of them (QuantizedWeight.to(dtype))");
    FL_CHECK_ARG(p.ldx % 8 == 0 && reinterpret_cast<uintptr_t>(p.x) % 16 == 0, p.op_name,
                 ": the CUDA kernel reads x in 16-byte chunks; its rows must be 16-byte aligned");
    const auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
    FL_CHECK_ARG(aligned(w.main) && aligned(w.side) && aligned(w.scales) && aligned(w.zeros), p.op_name,
                 ": the packed arrays (main, side, scales, zeros) must be 16-byte aligned for the CUDA kernel's copies");
  } else {
    FL_CHECK_ARG(p.dtype == DType::Float32 || p.dtype == DType::Float16 || p.dtype == DType::BFloat16, p.op_name,
                 ": x must be float32, float16 or bfloat16, got ", dtype_name(p.dtype));
  }
}

}  // namespace quant
}  // namespace fl
