// Vector-width helpers for the CPU kernels.
#pragma once

// Hot loops marked FASTCORE_SIMD_CLONES are compiled twice on x86-64, for AVX2 and for
// the baseline ISA, and the loader picks one for the CPU at hand (GCC/Clang function
// multiversioning): twice the vector width without building the extension for one CPU.
#if defined(__x86_64__) && defined(__GNUC__)
#define FASTCORE_SIMD_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FASTCORE_SIMD_CLONES
#endif
