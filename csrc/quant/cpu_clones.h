#pragma once
// Function multiversioning for the CPU hot loops. With GCC on x86-64, a function marked
// GRADQ_CPU_CLONES is compiled three times, for x86-64-v4 (AVX-512), x86-64-v3 (AVX2) and the SSE2
// baseline, and the dynamic loader picks the best one the CPU runs. What it inlines is compiled
// with it, so the element math of quant_math.h is vectorized at each width; helpers it calls must
// therefore be GRADQ_ALWAYS_INLINE. Every clone computes the same values: the libraries are built
// with -ffp-contract=off, so the FMA of v3/v4 never fuses a rounding away (quant_math.h).

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define GRADQ_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define GRADQ_CPU_CLONES
#endif

#define GRADQ_ALWAYS_INLINE inline __attribute__((always_inline))
