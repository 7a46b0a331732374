// nvcuda::wmma (<mma.h>) for the simulator: the 16x16x16 shapes with __half / __nv_bfloat16
// inputs and float (or __half) accumulators, as warp-collective operations on the core's
// fl_sim::warp_collective: every lane hands over its fragment, and the last lane to arrive
// computes all 32 lanes' results at once.
//
// Which lane holds which matrix element is unspecified in CUDA; the simulator uses a fixed map
// (the mma.m16n8k16 register layouts, n split in two halves), or with
// FASTLOSS_SIM_PERMUTE_FRAGMENTS=1 a scrambled one, so that a kernel reading frag.x[i] as a
// particular (row, col) gives different results under the two, while elementwise code does not.
// An a/b fragment has 16 elements per lane for 256 values, so every value sits in two slots; the
// two copies must agree at mma_sync (code that changes one but not the other depends on the layout).
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#include "sim_core.h"
#include "sim_half.h"

namespace nvcuda {
namespace wmma {

struct row_major;
struct col_major;
struct matrix_a;
struct matrix_b;
struct accumulator;
enum layout_t { mem_row_major, mem_col_major };

template <class T, int Size>
struct __frag_base {
  T x[Size];
  static constexpr int num_elements = Size;
  typedef T element_type;
};

// Only the shapes and types the simulator models exist; anything else fails to compile.
template <class Use, int M, int N, int K, class T, class Layout = void>
class fragment;

template <class Layout>
class fragment<matrix_a, 16, 16, 16, __half, Layout> : public __frag_base<__half, 16> {};
template <class Layout>
class fragment<matrix_a, 16, 16, 16, __nv_bfloat16, Layout> : public __frag_base<__nv_bfloat16, 16> {};
template <class Layout>
class fragment<matrix_b, 16, 16, 16, __half, Layout> : public __frag_base<__half, 16> {};
template <class Layout>
class fragment<matrix_b, 16, 16, 16, __nv_bfloat16, Layout> : public __frag_base<__nv_bfloat16, 16> {};
template <>
class fragment<accumulator, 16, 16, 16, float, void> : public __frag_base<float, 8> {};
template <>
class fragment<accumulator, 16, 16, 16, __half, void> : public __frag_base<__half, 8> {};

}  // namespace wmma
}  // namespace nvcuda

namespace fl_sim {
namespace wmma_sim {

enum class Role { A, B, Accumulator };

// Tile position (row * 16 + col) of element e of `lane`'s fragment. Fixed map: the m16n8k16 layouts
// (g = lane / 4, t = lane % 4), the 16-wide n dimension as two 8-wide halves, a/b elements 8-15
// repeating 0-7. Permuted map: a fixed-seed permutation of the positions, a different one for each
// role and for the second copy of a/b, so the duplicate slots are scrambled too.
inline int fixed_position(Role role, unsigned lane, int e) {
  const int g = static_cast<int>(lane >> 2), t = static_cast<int>(lane & 3);
  const int i = e & 7;
  switch (role) {
    case Role::A: return (g + 8 * ((i >> 1) & 1)) * 16 + 2 * t + (i & 1) + 8 * (i >> 2);                  // (m, k)
    case Role::B: return (2 * t + (i & 1) + 8 * ((i >> 1) & 1)) * 16 + g + 8 * (i >> 2);                  // (k, n)
    case Role::Accumulator: return (g + 8 * ((i >> 1) & 1)) * 16 + 2 * t + (i & 1) + 8 * (i >> 2);       // (m, n)
  }
  return 0;
}

struct Permutations {
  unsigned char table[5][256];  // A, A second copy, B, B second copy, accumulator
  Permutations() {
    uint64_t state = 0x9e3779b97f4a7c15ull;  // fixed seed: runs are reproducible
    for (auto& t : table) {
      for (int i = 0; i < 256; ++i) t[i] = static_cast<unsigned char>(i);
      for (int i = 255; i > 0; --i) {  // Fisher-Yates with splitmix64
        state += 0x9e3779b97f4a7c15ull;
        uint64_t z = state;
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        z ^= z >> 31;
        const int j = static_cast<int>(z % static_cast<uint64_t>(i + 1));
        const unsigned char swap = t[i];
        t[i] = t[j];
        t[j] = swap;
      }
    }
  }
};

inline int position(Role role, unsigned lane, int e) {
  const int fixed = fixed_position(role, lane, e);
  if (!permuted_fragments()) return fixed;
  static const Permutations permutations;
  const int table = role == Role::Accumulator ? 4 : (role == Role::A ? 0 : 2) + (e >= 8 ? 1 : 0);
  return permutations.table[table][fixed];
}

inline double to_double(float v) { return v; }
inline double to_double(__half v) { return static_cast<float>(v); }
inline double to_double(__nv_bfloat16 v) { return static_cast<float>(v); }
inline void from_double(double v, float* out) { *out = static_cast<float>(v); }
inline void from_double(double v, __half* out) { *out = __half(v); }
inline uint16_t bits_of(__half v) { return v.__x; }
inline uint16_t bits_of(__nv_bfloat16 v) { return v.__x; }

template <class T>
struct Name;
template <>
struct Name<float> {
  static constexpr const char* value = "float";
};
template <>
struct Name<__half> {
  static constexpr const char* value = "__half";
};
template <>
struct Name<__nv_bfloat16> {
  static constexpr const char* value = "__nv_bfloat16";
};

// What each lane hands to a load or a store. `complete` names the operation's instantiation: lanes
// meeting with different fragment types or layouts is a bug (each would read the others' data wrong).
struct MemoryLane {
  CollectiveFn complete;
  void* elements;     // the lane's fragment x[]
  const void* pointer;
  unsigned ldm;
  int col_major;      // memory layout: from the fragment type (a/b) or the layout_t argument
};

inline void check_lanes(const char* function, void* const* lanes, CollectiveFn self) {
  const MemoryLane* first = nullptr;
  for (int l = 0; l < 32; ++l) {
    const auto* lane = static_cast<const MemoryLane*>(lanes[l]);
    if (lane == nullptr) fail(std::string(function) + ": every lane of the warp must take part");
    if (lane->complete != self)
      fail(std::string(function) + ": the lanes of the warp called it with different fragment types or layouts");
    if (first == nullptr) first = lane;
    if (lane->pointer != first->pointer || lane->ldm != first->ldm || lane->col_major != first->col_major)
      fail(std::string(function) + ": lane " + std::to_string(l) +
           " passed a different pointer, ldm or layout than lane 0 (they must be the same in every lane)");
  }
}

// CUDA's documented requirements: a 256-bit aligned pointer and ldm a multiple of 16 bytes.
template <class T>
void check_memory(const char* function, const void* p, unsigned ldm) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0)
    fail(std::string(function) + ": the pointer must be 256-bit (32-byte) aligned");
  const unsigned multiple = 16 / sizeof(T);
  if (ldm % multiple != 0)
    fail(std::string(function) + ": ldm " + std::to_string(ldm) + " is not a multiple of " +
         std::to_string(multiple) + " for " + Name<T>::value + " elements");
}

inline size_t memory_index(int pos, unsigned ldm, bool col_major) {
  const size_t row = static_cast<size_t>(pos / 16), col = static_cast<size_t>(pos % 16);
  return col_major ? col * ldm + row : row * ldm + col;
}

template <Role R, class T, int Elements>
void complete_load(void* const* lanes, uint32_t, void*) {
  check_lanes("wmma::load_matrix_sync", lanes, &complete_load<R, T, Elements>);
  const auto* first = static_cast<const MemoryLane*>(lanes[0]);
  const T* p = static_cast<const T*>(first->pointer);
  for (unsigned l = 0; l < 32; ++l) {
    T* x = static_cast<T*>(static_cast<const MemoryLane*>(lanes[l])->elements);
    for (int e = 0; e < Elements; ++e) x[e] = p[memory_index(position(R, l, e), first->ldm, first->col_major != 0)];
  }
}

template <class T>
void complete_store(void* const* lanes, uint32_t, void*) {
  check_lanes("wmma::store_matrix_sync", lanes, &complete_store<T>);
  const auto* first = static_cast<const MemoryLane*>(lanes[0]);
  T* p = static_cast<T*>(const_cast<void*>(first->pointer));
  for (unsigned l = 0; l < 32; ++l) {
    const T* x = static_cast<const T*>(static_cast<const MemoryLane*>(lanes[l])->elements);
    for (int e = 0; e < 8; ++e) p[memory_index(position(Role::Accumulator, l, e), first->ldm, first->col_major != 0)] = x[e];
  }
}

template <Role R, class T, int Elements>
void load(void* elements, const void* p, unsigned ldm, bool col_major) {
  check_memory<T>("wmma::load_matrix_sync", p, ldm);
  MemoryLane lane{&complete_load<R, T, Elements>, elements, p, ldm, col_major ? 1 : 0};
  warp_collective(0xffffffffu, "wmma::load_matrix_sync", &lane, lane.complete, nullptr);
}

template <class T>
void store(void* p, const void* elements, unsigned ldm, bool col_major) {
  check_memory<T>("wmma::store_matrix_sync", p, ldm);
  MemoryLane lane{&complete_store<T>, const_cast<void*>(elements), p, ldm, col_major ? 1 : 0};
  warp_collective(0xffffffffu, "wmma::store_matrix_sync", &lane, lane.complete, nullptr);
}

// The 16x16 matrix of an a/b fragment from all lanes, checking that the two copies of each value agree.
template <class T>
void gather_input(Role role, const char* name, const void* const* fragments, double* matrix) {
  uint16_t bits[256];
  bool seen[256] = {};
  for (unsigned l = 0; l < 32; ++l) {
    const T* x = static_cast<const T*>(fragments[l]);
    for (int e = 0; e < 16; ++e) {
      const int pos = position(role, l, e);
      if (!seen[pos]) {
        seen[pos] = true;
        bits[pos] = bits_of(x[e]);
        matrix[pos] = to_double(x[e]);
      } else if (bits[pos] != bits_of(x[e])) {
        fail(std::string("wmma::mma_sync: the two copies of ") + name + " element (" + std::to_string(pos / 16) +
             ", " + std::to_string(pos % 16) + ") in the fragments differ (lane " + std::to_string(l) +
             ", x[" + std::to_string(e) + "]): the kernel changed fragment elements in a way that depends on "
             "the unspecified fragment layout");
      }
    }
  }
}

struct MmaLane {
  CollectiveFn complete;
  void* d;
  const void* a;
  const void* b;
  const void* c;
};

// D = A B + C, each element rounded once from the double sum (16-bit products are exact in double).
template <class TD, class TAB, class TC>
void complete_mma(void* const* lanes, uint32_t, void*) {
  const void* a[32];
  const void* b[32];
  for (int l = 0; l < 32; ++l) {
    const auto* lane = static_cast<const MmaLane*>(lanes[l]);
    if (lane == nullptr) fail("wmma::mma_sync: every lane of the warp must take part");
    if (lane->complete != &complete_mma<TD, TAB, TC>)
      fail("wmma::mma_sync: the lanes of the warp called it with different fragment types");
    a[l] = lane->a;
    b[l] = lane->b;
  }
  double ma[256], mb[256], mc[256];
  gather_input<TAB>(Role::A, "matrix_a", a, ma);
  gather_input<TAB>(Role::B, "matrix_b", b, mb);
  for (unsigned l = 0; l < 32; ++l) {
    const TC* c = static_cast<const TC*>(static_cast<const MmaLane*>(lanes[l])->c);
    for (int e = 0; e < 8; ++e) mc[position(Role::Accumulator, l, e)] = to_double(c[e]);
  }
  double md[256];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      double sum = 0.0;
      for (int k = 0; k < 16; ++k) sum += ma[i * 16 + k] * mb[k * 16 + j];
      md[i * 16 + j] = sum + mc[i * 16 + j];
    }
  // Written after every read: d may be c (and one lane's d another's c is no concern: registers).
  for (unsigned l = 0; l < 32; ++l) {
    TD* d = static_cast<TD*>(static_cast<const MmaLane*>(lanes[l])->d);
    for (int e = 0; e < 8; ++e) from_double(md[position(Role::Accumulator, l, e)], &d[e]);
  }
}

template <class T>
struct Identity {
  typedef T type;
};
template <class Layout>
constexpr bool is_col_major() {
  static_assert(std::is_same<Layout, nvcuda::wmma::row_major>::value ||
                    std::is_same<Layout, nvcuda::wmma::col_major>::value,
                "matrix_a / matrix_b fragments need a row_major or col_major layout");
  return std::is_same<Layout, nvcuda::wmma::col_major>::value;
}

}  // namespace wmma_sim
}  // namespace fl_sim

namespace nvcuda {
namespace wmma {

// Not a collective: every lane fills its own elements (CUDA: "ordinarily called by all threads").
template <class Use, int M, int N, int K, class T, class Layout>
inline void fill_fragment(fragment<Use, M, N, K, T, Layout>& f,
                          const typename ::fl_sim::wmma_sim::Identity<T>::type& v) {
  for (int e = 0; e < fragment<Use, M, N, K, T, Layout>::num_elements; ++e) f.x[e] = v;
}

template <class T, class Layout>
inline void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, Layout>& a,
                             const typename ::fl_sim::wmma_sim::Identity<T>::type* p, unsigned ldm) {
  ::fl_sim::wmma_sim::load<::fl_sim::wmma_sim::Role::A, T, 16>(a.x, p, ldm,
                                                               ::fl_sim::wmma_sim::is_col_major<Layout>());
}
template <class T, class Layout>
inline void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, Layout>& b,
                             const typename ::fl_sim::wmma_sim::Identity<T>::type* p, unsigned ldm) {
  ::fl_sim::wmma_sim::load<::fl_sim::wmma_sim::Role::B, T, 16>(b.x, p, ldm,
                                                               ::fl_sim::wmma_sim::is_col_major<Layout>());
}
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& c, const float* p, unsigned ldm,
                             layout_t layout) {
  ::fl_sim::wmma_sim::load<::fl_sim::wmma_sim::Role::Accumulator, float, 8>(c.x, p, ldm, layout == mem_col_major);
}
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, __half>& c, const __half* p, unsigned ldm,
                             layout_t layout) {
  ::fl_sim::wmma_sim::load<::fl_sim::wmma_sim::Role::Accumulator, __half, 8>(c.x, p, ldm, layout == mem_col_major);
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& c, unsigned ldm,
                              layout_t layout) {
  ::fl_sim::wmma_sim::store<float>(p, c.x, ldm, layout == mem_col_major);
}
inline void store_matrix_sync(__half* p, const fragment<accumulator, 16, 16, 16, __half>& c, unsigned ldm,
                              layout_t layout) {
  ::fl_sim::wmma_sim::store<__half>(p, c.x, ldm, layout == mem_col_major);
}

// d = a b + c. __half inputs take float or __half accumulators; __nv_bfloat16 inputs float only (as CUDA).
template <class TD, class TAB, class LA, class LB, class TC>
inline void mma_sync(fragment<accumulator, 16, 16, 16, TD>& d, const fragment<matrix_a, 16, 16, 16, TAB, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, TAB, LB>& b, const fragment<accumulator, 16, 16, 16, TC>& c,
                     bool satf = false) {
  static_assert(std::is_same<TAB, __half>::value || (std::is_same<TD, float>::value && std::is_same<TC, float>::value),
                "__nv_bfloat16 wmma accumulates in float");
  ::fl_sim::wmma_sim::is_col_major<LA>();
  ::fl_sim::wmma_sim::is_col_major<LB>();
  if (satf) ::fl_sim::fail("wmma::mma_sync: satf=true is not supported by the simulator");
  ::fl_sim::wmma_sim::MmaLane lane{&::fl_sim::wmma_sim::complete_mma<TD, TAB, TC>, d.x, a.x, b.x, c.x};
  ::fl_sim::warp_collective(0xffffffffu, "wmma::mma_sync", &lane, lane.complete, nullptr);
}

}  // namespace wmma
}  // namespace nvcuda
