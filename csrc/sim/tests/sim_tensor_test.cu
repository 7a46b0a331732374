// Kernel tests of the simulator's tensor-core and async-copy models (sim_wmma.h, sim_ptx.cpp):
// wmma 16x16x16 products, mma.sync m16n8k16 / m16n8k8 in the project's inline-PTX style, ldmatrix
// x1/x2/x4 with and without .trans, cp.async groups, each against a plain double loop on the host.
//
// Plain CUDA: built by nvcc (sm_80+) it runs on a GPU and checks the same layouts there, with a
// tolerance for the tensor cores' own accumulation order. Built for the simulator (rewritten by
// rewrite_cuda.py, compiled with -include sim_device.h) the products must match the reference
// exactly, and the simulator-only checks run too: a read before cp.async.wait_group sees the
// poison (NaN), layout-dependent fragment code sees the simulator's map (scrambled when
// FASTLOSS_SIM_PERMUTE_FRAGMENTS=1), and kernel bugs (misaligned pointers, lanes disagreeing,
// unsupported PTX) fail the launch with fl_sim::Error.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include "common/cuda_async_copy.cuh"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <type_traits>
#include <vector>

#if defined(FL_SIM_HAVE_FLOAT2) && defined(FL_SIM_SITE_ARGS)
#define SIMULATED 1  // the simulator's device header is in (sim_device.h defines both)
#else
#define SIMULATED 0
#endif

namespace wmma = nvcuda::wmma;

namespace {

int g_failures = 0;
int g_checks = 0;

void expect(bool ok, const char* what, int index = -1) {
  ++g_checks;
  if (!ok && ++g_failures <= 40) std::printf("FAILED: %s (index %d)\n", what, index);
}

template <class T>
struct Buffer {
  T* device = nullptr;
  size_t count;
  explicit Buffer(const std::vector<T>& host) : count(host.size()) {
    cudaMalloc(reinterpret_cast<void**>(&device), count * sizeof(T));
    cudaMemcpy(device, host.data(), count * sizeof(T), cudaMemcpyHostToDevice);
  }
  explicit Buffer(size_t n) : count(n) {
    cudaMalloc(reinterpret_cast<void**>(&device), count * sizeof(T));
    cudaMemset(device, 0, count * sizeof(T));
  }
  ~Buffer() { cudaFree(device); }
  std::vector<T> read() const {
    std::vector<T> host(count);
    cudaDeviceSynchronize();
    cudaMemcpy(host.data(), device, count * sizeof(T), cudaMemcpyDeviceToHost);
    return host;
  }
};

__host__ __device__ inline unsigned short bits16(__half v) { return __half_as_ushort(v); }
__host__ __device__ inline unsigned short bits16(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }
inline float to_float(__half v) { return __half2float(v); }
inline float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <class T>
T from_float(float v);
template <>
__half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ __half device_from_float(float v, __half) { return __float2half_rn(v); }
__device__ __forceinline__ __nv_bfloat16 device_from_float(float v, __nv_bfloat16) { return __float2bfloat16_rn(v); }

// Random 16-bit values in [-2, 2]; `integers`: small integers, exact in every accumulation order.
template <class T>
std::vector<T> random_matrix(size_t n, std::mt19937& rng, bool integers) {
  std::uniform_real_distribution<float> dist(-2.0f, 2.0f);
  std::vector<T> m(n);
  for (auto& v : m) v = from_float<T>(integers ? std::round(dist(rng) * 2.0f) : dist(rng));
  return m;
}

// Simulated: the reference is exact. On a GPU the tensor cores round differently.
bool close(float got, double want) {
  if (SIMULATED) return got == static_cast<float>(want);
  return std::fabs(got - want) <= 1e-5 * (1.0 + std::fabs(want));
}

// ---- wmma -----------------------------------------------------------------------------------------
constexpr int kM = 16, kN = 32, kK = 48;       // two warps, one 16x16 tile of D each, three k-steps
constexpr int kLdaRow = kK + 8, kLdaCol = kM + 8;  // padded: ldm multiples of 8, fragments 32-byte aligned
constexpr int kLdbRow = kN + 8, kLdbCol = kK + 8;
constexpr int kLdcRow = kN + 4, kLdcCol = kM + 4;

// D = A B + C over kK in three mma steps. `scale`: the fragments are scaled elementwise after
// loading (A by 2, C by 0.5), which must work whatever the fragment layout.
template <class T, bool ARow, bool BRow>
__global__ void wmma_gemm_kernel(const T* a, const T* b, const float* c, float* d, bool c_col, bool d_col,
                                 bool scale) {
  using LA = typename std::conditional<ARow, wmma::row_major, wmma::col_major>::type;
  using LB = typename std::conditional<BRow, wmma::row_major, wmma::col_major>::type;
  const int n0 = static_cast<int>(threadIdx.x / 32) * 16;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::load_matrix_sync(acc, c_col ? c + n0 * kLdcCol : c + n0, c_col ? kLdcCol : kLdcRow,
                         c_col ? wmma::mem_col_major : wmma::mem_row_major);
  if (scale)
    for (int i = 0; i < acc.num_elements; ++i) acc.x[i] *= 0.5f;
  for (int kk = 0; kk < kK; kk += 16) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, T, LA> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, LB> fb;
    wmma::load_matrix_sync(fa, ARow ? a + kk : a + kk * kLdaCol, ARow ? kLdaRow : kLdaCol);
    wmma::load_matrix_sync(fb, BRow ? b + kk * kLdbRow + n0 : b + n0 * kLdbCol + kk, BRow ? kLdbRow : kLdbCol);
    if (scale)
      for (int i = 0; i < fa.num_elements; ++i) fa.x[i] = __hmul(fa.x[i], device_from_float(2.0f, T()));
    wmma::mma_sync(acc, fa, fb, acc);
  }
  wmma::store_matrix_sync(d_col ? d + n0 * kLdcCol : d + n0, acc, d_col ? kLdcCol : kLdcRow,
                          d_col ? wmma::mem_col_major : wmma::mem_row_major);
}

template <class T, bool ARow, bool BRow>
void test_wmma_gemm(bool c_col, bool d_col, bool scale, bool integers, std::mt19937& rng) {
  const int a_rows = ARow ? kM : kK, a_ld = ARow ? kLdaRow : kLdaCol;
  const int b_rows = BRow ? kK : kN, b_ld = BRow ? kLdbRow : kLdbCol;
  const int c_ld = c_col ? kLdcCol : kLdcRow, c_rows = c_col ? kN : kM;
  const int d_ld = d_col ? kLdcCol : kLdcRow, d_rows = d_col ? kN : kM;
  const std::vector<T> ha = random_matrix<T>(size_t(a_rows) * a_ld, rng, integers);
  const std::vector<T> hb = random_matrix<T>(size_t(b_rows) * b_ld, rng, integers);
  std::vector<float> hc(size_t(c_rows) * c_ld);
  for (auto& v : hc) v = std::round(std::uniform_real_distribution<float>(-8.0f, 8.0f)(rng) * 4.0f) / 4.0f;
  auto A = [&](int m, int k) { return double(to_float(ARow ? ha[m * a_ld + k] : ha[k * a_ld + m])) * (scale ? 2 : 1); };
  auto B = [&](int k, int n) { return double(to_float(BRow ? hb[k * b_ld + n] : hb[n * b_ld + k])); };
  auto C = [&](int m, int n) { return double(c_col ? hc[n * c_ld + m] : hc[m * c_ld + n]) * (scale ? 0.5 : 1); };
  Buffer<T> da(ha), db(hb);
  Buffer<float> dc(hc), dd(size_t(d_rows) * d_ld);
  auto kernel = wmma_gemm_kernel<T, ARow, BRow>;
  kernel<<<1, 64>>>(da.device, db.device, dc.device, dd.device, c_col, d_col, scale);
  const std::vector<float> out = dd.read();
  for (int m = 0; m < kM; ++m)
    for (int n = 0; n < kN; ++n) {
      double acc = C(m, n);
      for (int kk = 0; kk < kK; kk += 16) {  // each mma_sync rounds its output to float once
        double sum = 0.0;
        for (int k = kk; k < kk + 16; ++k) sum += A(m, k) * B(k, n);
        acc = static_cast<float>(sum + acc);
      }
      expect(close(out[d_col ? n * d_ld + m : m * d_ld + n], acc), "wmma::mma_sync product", m * kN + n);
    }
}

// Where the layout shows: each lane writes (lane, element) into its accumulator and stores it; an
// a fragment loaded from a matrix of position numbers is written out as it sits in the lanes.
__global__ void wmma_layout_kernel(const __half* positions, float* acc_out, float* a_out) {
  const unsigned lane = threadIdx.x % 32;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  for (int i = 0; i < acc.num_elements; ++i) acc.x[i] = static_cast<float>(lane * acc.num_elements + i);
  wmma::store_matrix_sync(acc_out, acc, 16, wmma::mem_row_major);
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::load_matrix_sync(fa, positions, 16);
  for (int i = 0; i < fa.num_elements; ++i) a_out[lane * fa.num_elements + i] = __half2float(fa.x[i]);
}

void test_wmma_layout() {
  std::vector<__half> positions(256);
  for (int p = 0; p < 256; ++p) positions[p] = __float2half_rn(static_cast<float>(p));
  Buffer<__half> dpos(positions);
  Buffer<float> acc_out(256), a_out(32 * 16);
  wmma_layout_kernel<<<1, 32>>>(dpos.device, acc_out.device, a_out.device);
  const std::vector<float> acc = acc_out.read(), a = a_out.read();
  std::vector<int> seen(256, 0), seen_a(256, 0);
  for (int p = 0; p < 256; ++p) ++seen[static_cast<int>(acc[p])];
  for (float v : a) ++seen_a[static_cast<int>(v)];
  bool bijection = true, doubled = true;
  for (int p = 0; p < 256; ++p) {
    bijection = bijection && seen[p] == 1;
    doubled = doubled && seen_a[p] == 2;
  }
  expect(bijection, "accumulator fragment: (lane, element) -> position is a bijection");
  expect(doubled, "matrix_a fragment: each element held twice across the warp");
#if SIMULATED
  bool fixed_acc = true, fixed_a = true;
  for (unsigned lane = 0; lane < 32; ++lane)
    for (int e = 0; e < 16; ++e) {
      if (e < 8)
        fixed_acc = fixed_acc && acc[fl_sim::wmma_sim::fixed_position(fl_sim::wmma_sim::Role::Accumulator, lane, e)] ==
                                     static_cast<float>(lane * 8 + e);
      fixed_a = fixed_a && a[lane * 16 + e] ==
                               static_cast<float>(fl_sim::wmma_sim::fixed_position(fl_sim::wmma_sim::Role::A, lane, e));
    }
  const bool permuted = fl_sim::permuted_fragments();
  expect(fixed_acc != permuted, "accumulator layout: the fixed map, or scrambled under FASTLOSS_SIM_PERMUTE_FRAGMENTS");
  expect(fixed_a != permuted, "matrix_a layout: the fixed map, or scrambled under FASTLOSS_SIM_PERMUTE_FRAGMENTS");
  std::printf("wmma fragments: %s layout\n", permuted ? "permuted" : "fixed");
#endif
}

#if SIMULATED
// Kernel bugs the wmma model must catch.
__global__ void wmma_misuse_kernel(const __half* a, float* d, int mode) {
  const unsigned lane = threadIdx.x % 32;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.0f);
  if (mode == 0) wmma::load_matrix_sync(fa, a + 1, 16);                       // 2-byte aligned pointer
  if (mode == 1) wmma::load_matrix_sync(fa, a, 12);                           // ldm not a multiple of 8
  if (mode == 2) wmma::load_matrix_sync(fa, lane < 16 ? a : a + 16, 16);      // lanes disagree
  if (mode == 3) wmma::store_matrix_sync(d, acc, 6, wmma::mem_row_major);     // float ldm not a multiple of 4
  if (mode == 4) {                                                            // one copy of an element changed
    wmma::load_matrix_sync(fa, a, 16);
    wmma::load_matrix_sync(fb, a, 16);
    if (lane == 0) fa.x[0] = __float2half_rn(99.0f);
    wmma::mma_sync(acc, fa, fb, acc);
  }
}
#endif

// ---- mma.sync in the project's inline-PTX style ---------------------------------------------------
template <class T>
struct Mma;
template <>
struct Mma<__half> {
  __device__ __forceinline__ static void k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ __forceinline__ static void k8(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t b0) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(b0));
  }
};
template <>
struct Mma<__nv_bfloat16> {
  __device__ __forceinline__ static void k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ __forceinline__ static void k8(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t b0) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(b0));
  }
};

template <class T>
__device__ __forceinline__ uint32_t pack(T lo, T hi) {
  return static_cast<uint32_t>(bits16(lo)) | (static_cast<uint32_t>(bits16(hi)) << 16);
}

// One warp: D (16x8) = A (16 x 32, row-major) B (32 x 8, stored n-major: B^T row-major) + C, as two
// m16n8k16 steps, then + A[:, 0:8] B[0:8, :] with one m16n8k8. The PTX ISA's fragment layouts:
// g = lane / 4, t = lane % 4; a_i at row g + 8((i / 2) % 2), col 2t + i % 2 + 8(i / 4); b_i at
// k 2t + i % 2 + 8(i / 2), n g; c_i at row g + 8(i / 2), col 2t + i % 2.
constexpr int kMmaK = 32;
template <class T>
__global__ void mma_kernel(const T* a, const T* bt, const float* c, float* d) {
  const int lane = static_cast<int>(threadIdx.x), g = lane / 4, t = lane % 4;
  float acc[4];
  for (int i = 0; i < 4; ++i) acc[i] = c[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2];
  auto A = [&](int row, int col) { return a[row * kMmaK + col]; };
  auto B = [&](int k, int n) { return bt[n * kMmaK + k]; };
  for (int k0 = 0; k0 < kMmaK; k0 += 16) {
    uint32_t ra[4];
    for (int r = 0; r < 4; ++r) {
      const int i = 2 * r;
      ra[r] = pack(A(g + 8 * ((i / 2) % 2), k0 + 2 * t + 8 * (i / 4)), A(g + 8 * ((i / 2) % 2), k0 + 2 * t + 1 + 8 * (i / 4)));
    }
    const uint32_t b0 = pack(B(k0 + 2 * t, g), B(k0 + 2 * t + 1, g));
    const uint32_t b1 = pack(B(k0 + 2 * t + 8, g), B(k0 + 2 * t + 9, g));
    Mma<T>::k16(acc, ra, b0, b1);
  }
  const uint32_t a0 = pack(A(g, 2 * t), A(g, 2 * t + 1)), a1 = pack(A(g + 8, 2 * t), A(g + 8, 2 * t + 1));
  Mma<T>::k8(acc, a0, a1, pack(B(2 * t, g), B(2 * t + 1, g)));
  for (int i = 0; i < 4; ++i) d[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2] = acc[i];
}

template <class T>
void test_mma(bool integers, std::mt19937& rng) {
  const std::vector<T> ha = random_matrix<T>(16 * kMmaK, rng, integers), hbt = random_matrix<T>(8 * kMmaK, rng, integers);
  std::vector<float> hc(16 * 8);
  for (auto& v : hc) v = std::uniform_real_distribution<float>(-4.0f, 4.0f)(rng);
  Buffer<T> da(ha), dbt(hbt);
  Buffer<float> dc(hc), dd(16 * 8);
  auto kernel = mma_kernel<T>;
  kernel<<<1, 32>>>(da.device, dbt.device, dc.device, dd.device);
  const std::vector<float> out = dd.read();
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 8; ++n) {
      double acc = hc[m * 8 + n];
      const int steps[3][2] = {{0, 16}, {16, 16}, {0, 8}};  // the two k16 steps, then the k8 step over k 0-7
      for (const auto& step : steps) {
        double sum = 0.0;
        for (int k = step[0]; k < step[0] + step[1]; ++k) sum += double(to_float(ha[m * kMmaK + k])) * to_float(hbt[n * kMmaK + k]);
        acc = static_cast<float>(sum + acc);
      }
      expect(close(out[m * 8 + n], acc), "mma.sync product", m * 8 + n);
    }
}

// f16 accumulators: D and C are two registers of half pairs.
__global__ void mma_f16_kernel(const __half* a, const __half* bt, const __half* c, __half* d) {
  const int lane = static_cast<int>(threadIdx.x), g = lane / 4, t = lane % 4;
  auto A = [&](int row, int col) { return a[row * 16 + col]; };
  auto B = [&](int k, int n) { return bt[n * 16 + k]; };
  const uint32_t ra[4] = {pack(A(g, 2 * t), A(g, 2 * t + 1)), pack(A(g + 8, 2 * t), A(g + 8, 2 * t + 1)),
                          pack(A(g, 2 * t + 8), A(g, 2 * t + 9)), pack(A(g + 8, 2 * t + 8), A(g + 8, 2 * t + 9))};
  const uint32_t b0 = pack(B(2 * t, g), B(2 * t + 1, g)), b1 = pack(B(2 * t + 8, g), B(2 * t + 9, g));
  const uint32_t c0 = pack(c[g * 8 + 2 * t], c[g * 8 + 2 * t + 1]);
  const uint32_t c1 = pack(c[(g + 8) * 8 + 2 * t], c[(g + 8) * 8 + 2 * t + 1]);
  uint32_t d0, d1;
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f16.f16.f16.f16 {%0,%1}, {%2,%3,%4,%5}, {%6,%7}, {%8,%9};\n"
               : "=r"(d0), "=r"(d1)
               : "r"(ra[0]), "r"(ra[1]), "r"(ra[2]), "r"(ra[3]), "r"(b0), "r"(b1), "r"(c0), "r"(c1));
  reinterpret_cast<uint32_t*>(d)[(g * 8 + 2 * t) / 2] = d0;
  reinterpret_cast<uint32_t*>(d)[((g + 8) * 8 + 2 * t) / 2] = d1;
}

void test_mma_f16(std::mt19937& rng) {
  const std::vector<__half> ha = random_matrix<__half>(256, rng, false), hbt = random_matrix<__half>(128, rng, false);
  const std::vector<__half> hc = random_matrix<__half>(128, rng, false);
  Buffer<__half> da(ha), dbt(hbt), dc(hc), dd(128);
  mma_f16_kernel<<<1, 32>>>(da.device, dbt.device, dc.device, dd.device);
  const std::vector<__half> out = dd.read();
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 8; ++n) {
      double sum = __half2float(hc[m * 8 + n]);
      for (int k = 0; k < 16; ++k) sum += double(__half2float(ha[m * 16 + k])) * __half2float(hbt[n * 16 + k]);
      const float got = __half2float(out[m * 8 + n]);
      expect(SIMULATED ? bits16(out[m * 8 + n]) == bits16(__double2half(sum)) : std::fabs(got - sum) <= 4e-3 * (1 + std::fabs(sum)),
             "mma.sync f16 accumulators", m * 8 + n);
    }
}

// ---- ldmatrix -------------------------------------------------------------------------------------
// Four 8x8 matrices of b16 in shared memory, element (m, r, c) = 64m + 8r + c; rows 32 bytes apart.
template <int X, bool Trans>
__device__ __forceinline__ void ldmatrix(uint32_t (&r)[4], uint32_t address);
template <>
__device__ __forceinline__ void ldmatrix<1, false>(uint32_t (&r)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(address));
}
template <>
__device__ __forceinline__ void ldmatrix<2, false>(uint32_t (&r)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(address));
}
template <>
__device__ __forceinline__ void ldmatrix<4, false>(uint32_t (&r)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}
template <>
__device__ __forceinline__ void ldmatrix<1, true>(uint32_t (&r)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(address));
}
template <>
__device__ __forceinline__ void ldmatrix<2, true>(uint32_t (&r)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared::cta.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(address));
}
template <>
__device__ __forceinline__ void ldmatrix<4, true>(uint32_t (&r)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address));
}

template <int X, bool Trans>
__global__ void ldmatrix_kernel(uint32_t* out) {
  __shared__ __align__(16) unsigned short tile[4][8][16];
  const int lane = static_cast<int>(threadIdx.x);
  for (int i = lane; i < 4 * 8 * 16; i += 32) {
    const int m = i / 128, r = i / 16 % 8, c = i % 16;
    tile[m][r][c] = static_cast<unsigned short>(c < 8 ? 64 * m + 8 * r + c : 0xdead);
  }
  __syncwarp();
  // Lanes 8i..8i+7 address matrix i's rows; lanes past 8X give a misaligned address, which ldmatrix ignores.
  const void* row = lane < 8 * X ? static_cast<const void*>(&tile[lane / 8][lane % 8][0]) : &tile[0][0][1];
  uint32_t r[4] = {0, 0, 0, 0};
  ldmatrix<X, Trans>(r, static_cast<uint32_t>(__cvta_generic_to_shared(row)));
  for (int i = 0; i < 4; ++i) out[lane * 4 + i] = r[i];
}

template <int X, bool Trans>
void test_ldmatrix() {
  Buffer<uint32_t> out(32 * 4);
  auto kernel = ldmatrix_kernel<X, Trans>;
  kernel<<<1, 32>>>(out.device);
  const std::vector<uint32_t> got = out.read();
  for (int lane = 0; lane < 32; ++lane)
    for (int m = 0; m < X; ++m) {
      const int row = lane / 4, col = 2 * (lane % 4);
      const uint32_t lo = Trans ? 64 * m + 8 * col + row : 64 * m + 8 * row + col;
      const uint32_t hi = Trans ? 64 * m + 8 * (col + 1) + row : 64 * m + 8 * row + col + 1;
      expect(got[lane * 4 + m] == (lo | (hi << 16)), Trans ? "ldmatrix.trans register" : "ldmatrix register",
             X * 1000 + lane * 4 + m);
    }
}

// ---- cp.async ----------------------------------------------------------------------------------------
// The project's own helpers (common/cuda_async_copy.cuh, included above), so these checks cover them too.
using fl::cp_async16;
using fl::cp_async_commit;
using fl::cp_async_wait;

// Out, per thread: [0..3] group 0 before any wait, [4..7] group 0 after wait_group 1, [8..11] group 1
// then (still in flight), [12..15] group 1 after wait_group 0 (zero-filled past the valid bytes),
// [16..19] the uncommitted copy then, [20..23] after wait_all, [24] a 4-byte .ca copy, [25..26] an 8-byte one.
constexpr int kCpOut = 32;
__global__ void cp_async_kernel(const float* src, float* out) {
  __shared__ __align__(16) float buf[4][32 * 4];
  const int t = static_cast<int>(threadIdx.x);
  float* o = out + t * kCpOut;
  for (int b = 0; b < 4; ++b)
    for (int i = 0; i < 4; ++i) buf[b][t * 4 + i] = -1.0f;  // what a read before the wait must not see
  cp_async16(&buf[0][t * 4], src + t * 4, 16);
  cp_async_commit();
  cp_async16(&buf[1][t * 4], src + 128 + t * 4, 4 * (t % 5));
  cp_async_commit();
  cp_async16(&buf[2][t * 4], src + 256 + t * 4, 16);
  for (int i = 0; i < 4; ++i) o[i] = buf[0][t * 4 + i];
  cp_async_wait<1>();
  for (int i = 0; i < 4; ++i) o[4 + i] = buf[0][t * 4 + i];
  for (int i = 0; i < 4; ++i) o[8 + i] = buf[1][t * 4 + i];
  cp_async_wait<0>();
  for (int i = 0; i < 4; ++i) o[12 + i] = buf[1][t * 4 + i];
  for (int i = 0; i < 4; ++i) o[16 + i] = buf[2][t * 4 + i];
  asm volatile("cp.async.wait_all;\n" ::: "memory");
  for (int i = 0; i < 4; ++i) o[20 + i] = buf[2][t * 4 + i];
  const uint32_t small = static_cast<uint32_t>(__cvta_generic_to_shared(&buf[3][t * 4]));
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(small), "l"(src + 384 + t) : "memory");
  asm volatile("cp.async.ca.shared::cta.global [%0], [%1], 8;\n" ::"r"(small + 8), "l"(src + 416 + 2 * t) : "memory");
  asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
  o[24] = buf[3][t * 4];
  o[25] = buf[3][t * 4 + 2];
  o[26] = buf[3][t * 4 + 3];
}

void test_cp_async() {
  std::vector<float> src(512);
  for (int i = 0; i < 512; ++i) src[i] = static_cast<float>(i) + 0.5f;
  Buffer<float> dsrc(src), dout(32 * kCpOut);
  cp_async_kernel<<<1, 32>>>(dsrc.device, dout.device);
  const std::vector<float> out = dout.read();
  for (int t = 0; t < 32; ++t) {
    const float* o = &out[t * kCpOut];
    for (int i = 0; i < 4; ++i) {
      expect(o[4 + i] == src[t * 4 + i], "cp.async group 0 landed by wait_group 1", t);
      expect(o[12 + i] == (4 * i < 4 * (t % 5) ? src[128 + t * 4 + i] : 0.0f), "cp.async zero fill", t);
      expect(o[20 + i] == src[256 + t * 4 + i], "cp.async uncommitted copy landed by wait_all", t);
#if SIMULATED  // on a GPU these reads race with the copies
      expect(std::isnan(o[i]), "cp.async destination poisoned before the wait", t);
      expect(std::isnan(o[8 + i]), "cp.async group 1 still in flight after wait_group 1", t);
      expect(std::isnan(o[16 + i]), "cp.async uncommitted copy not landed by wait_group 0", t);
#endif
    }
    expect(o[24] == src[384 + t] && o[25] == src[416 + 2 * t] && o[26] == src[417 + 2 * t], "cp.async 4 and 8 bytes", t);
  }
}

#if SIMULATED
// PTX misuse the interpreter must catch.
__global__ void ptx_misuse_kernel(const float* src, int mode) {
  __shared__ __align__(16) float buf[64];
  const uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(buf));
  int x = 1, y = 2;
  if (mode == 0) cp_async16(&buf[1], src, 16);  // destination not 16-byte aligned
  if (mode == 1) cp_async16(buf, src + 1, 16);  // source not 16-byte aligned
  if (mode == 2) cp_async16(buf, src, 17);      // src-size past cp-size
  if (mode == 3) asm volatile("cp.async.cg.shared.global [%0], [%1], 8;\n" ::"r"(base), "l"(src));  // .cg is 16 only
  if (mode == 4) asm volatile("add.s32 %0, %0, %1;\n" : "+r"(x) : "r"(y));  // not modelled
  if (mode == 5) {  // a misaligned row address
    uint32_t r;
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r) : "r"(base + 8 * threadIdx.x + 2));
  }
  if (mode == 6) cp_async16(buf + 64, src, 16);  // past the end of shared memory
}

void expect_failure(const char* what, const char* needle, void (*launch)(const float*, float*), const float* a, float* b) {
  ++g_checks;
  try {
    launch(a, b);
    cudaDeviceSynchronize();
  } catch (const fl_sim::Error& e) {
    if (std::strstr(e.what(), needle) != nullptr) return;
    std::printf("FAILED: %s: the error does not mention \"%s\": %s\n", what, needle, e.what());
    ++g_failures;
    return;
  }
  std::printf("FAILED: %s: no error\n", what);
  ++g_failures;
}

template <int Mode>
void launch_ptx_misuse(const float* src, float*) {
  ptx_misuse_kernel<<<1, 32>>>(src, Mode);
}
template <int Mode>
void launch_wmma_misuse(const float* a, float* d) {
  wmma_misuse_kernel<<<1, 32>>>(reinterpret_cast<const __half*>(a), d, Mode);
}

void test_misuse() {
  Buffer<float> src(std::vector<float>(1024, 1.0f)), dst(1024);
  expect_failure("cp.async misaligned destination", "aligned", launch_ptx_misuse<0>, src.device, dst.device);
  expect_failure("cp.async misaligned source", "aligned", launch_ptx_misuse<1>, src.device, dst.device);
  expect_failure("cp.async src-size > cp-size", "src-size", launch_ptx_misuse<2>, src.device, dst.device);
  expect_failure("cp.async.cg of 8 bytes", "cp-size", launch_ptx_misuse<3>, src.device, dst.device);
  expect_failure("unsupported PTX", "unsupported inline PTX in the simulator: add.s32", launch_ptx_misuse<4>,
                 src.device, dst.device);
  expect_failure("ldmatrix misaligned row", "16-byte aligned", launch_ptx_misuse<5>, src.device, dst.device);
  expect_failure("cp.async past shared memory", "", launch_ptx_misuse<6>, src.device, dst.device);
  expect_failure("wmma misaligned pointer", "256-bit", launch_wmma_misuse<0>, src.device, dst.device);
  expect_failure("wmma ldm", "not a multiple of 8", launch_wmma_misuse<1>, src.device, dst.device);
  expect_failure("wmma lanes disagree", "different pointer", launch_wmma_misuse<2>, src.device, dst.device);
  expect_failure("wmma float ldm", "not a multiple of 4", launch_wmma_misuse<3>, src.device, dst.device);
  expect_failure("wmma copies differ", "two copies", launch_wmma_misuse<4>, src.device, dst.device);
}
#endif

void run_all(std::mt19937& rng) {
  for (bool integers : {true, false}) {
    test_wmma_gemm<__half, true, true>(false, false, false, integers, rng);
    test_wmma_gemm<__half, true, false>(false, false, false, integers, rng);
    test_wmma_gemm<__half, false, true>(true, false, false, integers, rng);
    test_wmma_gemm<__half, false, false>(false, true, false, integers, rng);
    test_wmma_gemm<__nv_bfloat16, true, false>(false, false, false, integers, rng);
    test_wmma_gemm<__nv_bfloat16, false, true>(true, true, false, integers, rng);
    test_wmma_gemm<__half, true, false>(true, false, true, integers, rng);
    test_wmma_gemm<__nv_bfloat16, true, true>(false, false, true, integers, rng);
    test_mma<__half>(integers, rng);
    test_mma<__nv_bfloat16>(integers, rng);
  }
  test_wmma_layout();
  test_mma_f16(rng);
  test_ldmatrix<1, false>();
  test_ldmatrix<2, false>();
  test_ldmatrix<4, false>();
  test_ldmatrix<1, true>();
  test_ldmatrix<2, true>();
  test_ldmatrix<4, true>();
  test_cp_async();
}

}  // namespace

int main() {
  std::mt19937 rng(2024);
#if SIMULATED
  // Correct kernels give the same answers whatever order the simulated threads run in.
  for (const char* name : {"forward", "reverse", "random", "warp-major"}) {
    fl_sim::Schedule schedule;
    fl_sim::parse_schedule(name, &schedule);
    fl_sim::set_schedule(schedule, 11);
    const int failures = g_failures;
    run_all(rng);
    if (g_failures != failures) std::printf("(the failures above ran under the %s schedule)\n", name);
  }
  test_misuse();
#else
  run_all(rng);
#endif
  const cudaError_t error = cudaGetLastError();
  expect(error == cudaSuccess, "no CUDA error");
  std::printf("sim_tensor_test (%s): %d passed, %d failed\n", SIMULATED ? "simulated" : "GPU", g_checks - g_failures,
              g_failures);
  return g_failures == 0 ? 0 : 1;
}
