/* memfind: the stream digest's search for volatile fields, at memory speed.
 *
 * Theory of operation
 * -------------------
 * The digest masks the value after every "\r\nDate: " a backend sends, so the search runs over
 * every byte of every download (checkpoint/streamlog.py, Masker).  glibc's memmem manages about
 * 4 GB/s on binary data here; this is the "generic SIMD" search (Wojciech Mula): compare the
 * needle's first byte with 32 (AVX2) or 16 (SSE2) positions of the haystack and its last byte
 * with the same positions shifted by m - 1, AND the two masks, and compare the whole needle only
 * where both bytes match.  On data that is not the needle a candidate is rare (both bytes:
 * about 1 position in 65,536 on random bytes), so the loop is two loads, two compares and a test
 * per block.  The blocks stop where a load would pass the end; the rest is searched bytewise.
 *
 * Only full loads inside [hay, hay + n) are made (the fuzzing harness, fuzz_memfind.c, checks it
 * under AddressSanitizer, and checks every answer against a naive search).  AVX2 is chosen at
 * run time (cpuid); SSE2 is every x86-64's baseline; other machines use memmem.
 */
#define _GNU_SOURCE
#include <string.h>
#include "memfind.h"

#if defined(__x86_64__)
#include <immintrin.h>

static inline int64_t verify(const uint8_t *hay, size_t i, const uint8_t *needle, size_t m)
{
    /* first and last bytes already match */
    return m <= 2 || memcmp(hay + i + 1, needle + 1, m - 2) == 0;
}

static int64_t tail(const uint8_t *hay, size_t n, size_t from, const uint8_t *needle, size_t m)
{
    if (n - from < m)
        return -1;
    const uint8_t *p = memmem(hay + from, n - from, needle, m);
    return p ? (int64_t)(p - hay) : -1;
}

__attribute__((target("avx2")))
static int64_t find_avx2(const uint8_t *hay, size_t n, const uint8_t *needle, size_t m)
{
    const __m256i first = _mm256_set1_epi8((char)needle[0]);
    const __m256i last = _mm256_set1_epi8((char)needle[m - 1]);
    size_t i = 0;
    /* a block reads hay[i .. i+31] and hay[i+m-1 .. i+m+30]: both inside while i + m + 31 <= n */
    for (; i + m + 31 <= n; i += 32) {
        __m256i a = _mm256_loadu_si256((const __m256i *)(hay + i));
        __m256i b = _mm256_loadu_si256((const __m256i *)(hay + i + m - 1));
        uint32_t mask = (uint32_t)_mm256_movemask_epi8(
            _mm256_and_si256(_mm256_cmpeq_epi8(a, first), _mm256_cmpeq_epi8(b, last)));
        while (mask) {
            unsigned bit = (unsigned)__builtin_ctz(mask);
            if (verify(hay, i + bit, needle, m))
                return (int64_t)(i + bit);
            mask &= mask - 1;
        }
    }
    return tail(hay, n, i, needle, m);
}

static int64_t find_sse2(const uint8_t *hay, size_t n, const uint8_t *needle, size_t m)
{
    const __m128i first = _mm_set1_epi8((char)needle[0]);
    const __m128i last = _mm_set1_epi8((char)needle[m - 1]);
    size_t i = 0;
    for (; i + m + 15 <= n; i += 16) {
        __m128i a = _mm_loadu_si128((const __m128i *)(hay + i));
        __m128i b = _mm_loadu_si128((const __m128i *)(hay + i + m - 1));
        uint32_t mask = (uint32_t)_mm_movemask_epi8(_mm_and_si128(_mm_cmpeq_epi8(a, first), _mm_cmpeq_epi8(b, last)));
        while (mask) {
            unsigned bit = (unsigned)__builtin_ctz(mask);
            if (verify(hay, i + bit, needle, m))
                return (int64_t)(i + bit);
            mask &= mask - 1;
        }
    }
    return tail(hay, n, i, needle, m);
}

static int level = -1;

int mf_level(void)
{
    if (level < 0) {
        __builtin_cpu_init();
        level = __builtin_cpu_supports("avx2") ? 2 : 1;
    }
    return level;
}

int mf_set_level(int wanted)
{
    int best = (level = -1, mf_level());
    if (wanted >= 1 && wanted <= best)
        level = wanted;
    return level;
}

int64_t mf_find(const uint8_t *hay, size_t n, const uint8_t *needle, size_t m)
{
    if (m == 0)
        return 0;
    if (n < m)
        return -1;
    return mf_level() == 2 ? find_avx2(hay, n, needle, m) : find_sse2(hay, n, needle, m);
}

#else

int mf_level(void) { return 0; }

int mf_set_level(int wanted) { (void)wanted; return 0; }

int64_t mf_find(const uint8_t *hay, size_t n, const uint8_t *needle, size_t m)
{
    if (m == 0)
        return 0;
    if (n < m)
        return -1;
    const uint8_t *p = memmem(hay, n, needle, m);
    return p ? (int64_t)(p - hay) : -1;
}

#endif
