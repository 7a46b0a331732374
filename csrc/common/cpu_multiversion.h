// FL_CPU_MULTIVERSION on a CPU hot loop compiles it twice, for x86-64-v3 (AVX2 + FMA) and for the
// baseline, and picks one when the library loads (GCC's target_clones, an ifunc). Wheels stay
// portable and AVX2 machines get 8-wide loops: about 1.7x on the spherical kernels, whose
// in-cache rows are compute-bound with SSE2 alone. Elsewhere (clang, macOS, other CPUs) it is empty.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__) && !defined(__CUDACC__)
#define FL_CPU_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FL_CPU_MULTIVERSION
#endif

// Helpers called from an FL_CPU_MULTIVERSION function: always inlined, so they are compiled with the
// caller's instruction set. (A helper GCC decides not to inline is compiled once, for the baseline,
// and a hot product in it stays SSE2 while its caller is AVX2.)
#if defined(__GNUC__)
#define FL_CPU_INLINE inline __attribute__((always_inline))
#else
#define FL_CPU_INLINE inline
#endif
