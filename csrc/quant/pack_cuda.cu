// CUDA packing, unpacking and dequantization of the mixed 2/4-bit format: one thread per
// 32-bit word of the main array, with the bit positions of packed_layout.h.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "common/cuda_check.cuh"
#include "common/cuda_numeric.cuh"
#include "quant/quant_kernels.h"

namespace fl {
namespace quant {
namespace {

constexpr int kThreads = 256;

struct WordCoordinates {
  int64_t row_tile, k_word;
  int lane;
};

__device__ __forceinline__ WordCoordinates word_coordinates(const PackedShape& s, int64_t index) {
  WordCoordinates c;
  c.lane = static_cast<int>(index % kLanes);
  const int64_t tile = index / kLanes;
  c.k_word = tile % s.k_words;
  c.row_tile = tile / s.k_words;
  return c;
}

__global__ void pack_kernel(PackedShape s, const int32_t* __restrict__ side_index, const uint8_t* __restrict__ codes,
                            int64_t ld, uint32_t* __restrict__ main, uint32_t* __restrict__ side) {
  const int64_t words_per_group = s.words_per_group();
  for (int64_t index = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; index < s.main_words();
       index += int64_t(gridDim.x) * blockDim.x) {
    const WordCoordinates c = word_coordinates(s, index);
    const int64_t row = c.row_tile * kTileRows + c.lane / 4;
    uint32_t low = 0, high = 0;
#pragma unroll
    for (int position = 0; position < kCodesPerWord; ++position) {
      const int64_t col = c.k_word * kWordCols + col_of_position(c.lane % 4, position);
      const uint32_t code = (row < s.rows && col < s.cols) ? codes[row * ld + col] : 0u;
      low |= (code & 3u) << (2 * position);
      high |= ((code >> 2) & 3u) << (2 * position);
    }
    main[index] = low;
    const int32_t rank = side_index[c.k_word / words_per_group];
    if (rank >= 0) side[side_word_index(s, c.row_tile, rank, c.k_word % words_per_group, c.lane)] = high;
  }
}

__global__ void unpack_kernel(PackedShape s, const int32_t* __restrict__ side_index,
                              const uint32_t* __restrict__ main, const uint32_t* __restrict__ side,
                              uint8_t* __restrict__ codes) {
  const int64_t words_per_group = s.words_per_group();
  for (int64_t index = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; index < s.main_words();
       index += int64_t(gridDim.x) * blockDim.x) {
    const WordCoordinates c = word_coordinates(s, index);
    const int64_t row = c.row_tile * kTileRows + c.lane / 4;
    if (row >= s.rows) continue;
    const int32_t rank = side_index[c.k_word / words_per_group];
    const uint32_t low = main[index];
    const uint32_t high = rank >= 0 ? side[side_word_index(s, c.row_tile, rank, c.k_word % words_per_group, c.lane)] : 0u;
#pragma unroll
    for (int position = 0; position < kCodesPerWord; ++position) {
      const int64_t col = c.k_word * kWordCols + col_of_position(c.lane % 4, position);
      if (col < s.cols) codes[row * s.cols + col] = static_cast<uint8_t>(code_at(low, high, position));
    }
  }
}

// Dequantization writes 8x (2-bit, fp16 out) the bytes it reads, so the writes must coalesce:
// each warp decodes one word tile (8 rows x 64 columns) into shared memory, and the block
// then writes its 8 rows x 512 columns as 16-byte row segments.
constexpr int kDequantWords = 8;  // word tiles along K per block: one per warp
constexpr int kDequantCols = kDequantWords * kWordCols;

template <class Out, class Scale>
__global__ void __launch_bounds__(kDequantWords * 32) dequantize_kernel(
    PackedShape s, const int32_t* __restrict__ side_index, const uint32_t* __restrict__ main,
    const uint32_t* __restrict__ side, const Scale* __restrict__ scales, const uint8_t* __restrict__ zeros,
    Out* __restrict__ out, bool vector_rows) {
  __shared__ __align__(16) Out tile[kTileRows][kDequantCols];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t row_tile = blockIdx.y;
  const int64_t k_word = int64_t(blockIdx.x) * kDequantWords + warp;
  const int64_t words_per_group = s.words_per_group();
  if (k_word < s.k_words) {
    const int64_t row = row_tile * kTileRows + lane / 4;
    const int64_t group = k_word / words_per_group;
    const int32_t rank = side_index[group];
    const uint32_t low = main[main_word_index(s, row_tile, k_word, lane)];
    const uint32_t high = rank >= 0 ? side[side_word_index(s, row_tile, rank, k_word % words_per_group, lane)] : 0u;
    const float scale = to_acc(scales[group * s.rows_padded + row]);  // padded rows exist: always in bounds
    const int zero = zeros[group * s.rows_padded + row];
#pragma unroll
    for (int position = 0; position < kCodesPerWord; ++position) {
      const int code = code_at(low, high, position);
      tile[lane / 4][warp * kWordCols + col_of_position(lane % 4, position)] =
          CudaStore<Out>::from(dequantized_value(code, zero, scale));
    }
  }
  __syncthreads();
  const int64_t col0 = int64_t(blockIdx.x) * kDequantCols;
  if (vector_rows) {  // K * sizeof(Out) is a multiple of 16: whole 16-byte segments, aligned
    constexpr int kPerChunk = 16 / sizeof(Out);
    for (int i = threadIdx.x; i < kTileRows * kDequantCols / kPerChunk; i += blockDim.x) {
      const int r = i / (kDequantCols / kPerChunk), c = (i % (kDequantCols / kPerChunk)) * kPerChunk;
      const int64_t row = row_tile * kTileRows + r, col = col0 + c;
      if (row < s.rows && col < s.cols)
        *reinterpret_cast<uint4*>(out + row * s.cols + col) = *reinterpret_cast<const uint4*>(&tile[r][c]);
    }
  } else {
    for (int i = threadIdx.x; i < kTileRows * kDequantCols; i += blockDim.x) {
      const int r = i / kDequantCols, c = i % kDequantCols;
      const int64_t row = row_tile * kTileRows + r, col = col0 + c;
      if (row < s.rows && col < s.cols) out[row * s.cols + col] = tile[r][c];
    }
  }
}

int blocks_for(const PackedShape& s, int device) {
  const int64_t needed = (s.main_words() + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(needed, int64_t(cuda_sm_count(device)) * 16)));
}

template <class Out>
void dequantize_as(const PackedWeight& w, Out* out, int device, cudaStream_t stream) {
  const PackedShape& s = w.shape;
  const dim3 grid(static_cast<unsigned>((s.k_words + kDequantWords - 1) / kDequantWords),
                  static_cast<unsigned>((s.rows + kTileRows - 1) / kTileRows));
  FL_CHECK_ARG(grid.y <= 65535u, "fastloss.quant.dequantize: more than ", 65535 * kTileRows, " rows");
  const bool vector_rows = (s.cols * int64_t(sizeof(Out))) % 16 == 0 && reinterpret_cast<uintptr_t>(out) % 16 == 0;
  if (w.scale_dtype == DType::Float16) {
    dequantize_kernel<Out, __half><<<grid, kDequantWords * 32, 0, stream>>>(
        s, w.side_index, w.main, w.side, static_cast<const __half*>(w.scales), w.zeros, out, vector_rows);
  } else {
    dequantize_kernel<Out, __nv_bfloat16><<<grid, kDequantWords * 32, 0, stream>>>(
        s, w.side_index, w.main, w.side, static_cast<const __nv_bfloat16*>(w.scales), w.zeros, out, vector_rows);
  }
  FL_CUDA_CHECK_LAUNCH(dequantize_kernel);
}

}  // namespace

void pack_codes_cuda(const PackedShape& s, const int32_t* side_index, const uint8_t* codes, int64_t ld,
                     uint32_t* main, uint32_t* side, int device, cudaStream_t stream) {
  validate_packed_shape(s, "fastloss.quant.pack");
  CudaDeviceGuard guard(device);
  pack_kernel<<<blocks_for(s, device), kThreads, 0, stream>>>(s, side_index, codes, ld, main, side);
  FL_CUDA_CHECK_LAUNCH(pack_kernel);
}

void unpack_codes_cuda(const PackedShape& s, const int32_t* side_index, const uint32_t* main, const uint32_t* side,
                       uint8_t* codes, int device, cudaStream_t stream) {
  validate_packed_shape(s, "fastloss.quant.unpack");
  CudaDeviceGuard guard(device);
  unpack_kernel<<<blocks_for(s, device), kThreads, 0, stream>>>(s, side_index, main, side, codes);
  FL_CUDA_CHECK_LAUNCH(unpack_kernel);
}

void dequantize_cuda(const PackedWeight& w, DType out_dtype, void* out, int device, cudaStream_t stream) {
  validate_packed_shape(w.shape, "fastloss.quant.dequantize");
  FL_CHECK_ARG(w.scale_dtype == DType::Float16 || w.scale_dtype == DType::BFloat16,
               "fastloss.quant.dequantize: scales must be float16 or bfloat16");
  CudaDeviceGuard guard(device);
  switch (out_dtype) {
    case DType::Float32: return dequantize_as(w, static_cast<float*>(out), device, stream);
    case DType::Float16: return dequantize_as(w, static_cast<__half*>(out), device, stream);
    case DType::BFloat16: return dequantize_as(w, static_cast<__nv_bfloat16*>(out), device, stream);
    case DType::Float64: return dequantize_as(w, static_cast<double*>(out), device, stream);
  }
}

}  // namespace quant
}  // namespace fl
