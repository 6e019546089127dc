/* XXH3-128's update compiled for AVX2 (xxh3.c calls it when the CPU has AVX2: cpuid).
 * The rest of the project is built for any x86-64; only this file's functions use AVX2. */
#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2"))), apply_to = function)
#else
#pragma GCC target("avx2")
#endif
#define XXH_INLINE_ALL
#define XXH_VECTOR XXH_AVX2
#include <xxhash.h>

void xh_update_avx2(void *state, const uint8_t *data, size_t n);

void xh_update_avx2(void *state, const uint8_t *data, size_t n) { XXH3_128bits_update(state, data, n); }
#if defined(__clang__)
#pragma clang attribute pop
#endif
