/* libFuzzer harness for memfind.c (built with AddressSanitizer and UndefinedBehaviorSanitizer by
 * tests/unit/test_native_fuzz.py).  The input is: a byte choosing the needle's length (1..64), a
 * byte choosing where in the haystack to plant it (or not), the needle, then the haystack.  Each
 * SIMD level's answer must be a naive search's, and the haystack is a heap block of exactly its
 * size, so a load past its end is an ASan report. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include "memfind.h"

static int64_t naive(const uint8_t *h, size_t n, const uint8_t *nd, size_t m)
{
    for (size_t i = 0; i + m <= n; i++)
        if (memcmp(h + i, nd, m) == 0)
            return (int64_t)i;
    return -1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 3)
        return 0;
    size_t m = (size_t)(data[0] % 64) + 1;
    if (size - 2 < m)
        return 0;
    const uint8_t *needle = data + 2;
    size_t n = size - 2 - m;
    uint8_t *hay = malloc(n ? n : 1);
    if (!hay)
        return 0;
    memcpy(hay, data + 2 + m, n);
    if (data[1] & 1 && n >= m) {              /* plant it: a match near the place asked for */
        size_t at = ((size_t)data[1] * 131) % (n - m + 1);
        memcpy(hay + at, needle, m);
    }
    int64_t want = naive(hay, n, needle, m);
    for (int level = 1; level <= 2; level++) {
        if (mf_set_level(level) != level)
            continue;                          /* the CPU lacks it */
        if (mf_find(hay, n, needle, m) != want)
            abort();
        for (size_t from = 1; from < 4 && from <= n; from++) {   /* an unaligned start */
            int64_t w = naive(hay + from, n - from, needle, m);
            if (mf_find(hay + from, n - from, needle, m) != w)
                abort();
        }
    }
    free(hay);
    return 0;
}
