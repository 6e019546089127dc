/* XXH3-128 streaming state for the stream digest (checkpoint/streamlog.py), from Debian's
 * libxxhash-dev header (inlined: nothing to link).
 *
 * Theory of operation
 * -------------------
 * The digest of a server stream is a running XXH3-128 of its current 64 KiB chunk.  Python's
 * xxhash package keeps that state inside its own object, out of reach of compiled code; this
 * module keeps it in a block the caller owns, so the native engine's fast path
 * (nfq/native/fastpath.c) can go on hashing a stream where the Python engine left it, and the
 * other way round, on the very same state.  Digests are the canonical (big-endian) 16 bytes,
 * as xxhash.xxh3_128().digest() gives them: tests/unit/test_streamlog.py checks they agree.
 *
 * The update runs AVX-512 code (xxh3_avx512.c) or AVX2 code (xxh3_avx2.c) when the CPU has it,
 * SSE2 otherwise (cpuid, once):
 * the state's layout is the same for both, so the choice can differ between callers.
 */
#define XXH_INLINE_ALL
#include <xxhash.h>

#include "xxh3.h"

void *xh_new(void)
{
    XXH3_state_t *s = XXH3_createState();
    if (s)
        XXH3_128bits_reset(s);
    return s;
}

void xh_free(void *state) { XXH3_freeState(state); }
void xh_reset(void *state) { XXH3_128bits_reset(state); }
void xh_update_avx2(void *state, const uint8_t *data, size_t n);
void xh_update_avx512(void *state, const uint8_t *data, size_t n);

void xh_update(void *state, const uint8_t *data, size_t n)
{
    static int level = -1;   /* 2 AVX-512, 1 AVX2, 0 SSE2 */
    if (level < 0) {
        __builtin_cpu_init();
        level = __builtin_cpu_supports("avx512f") ? 2 : __builtin_cpu_supports("avx2") ? 1 : 0;
    }
    if (level == 2)
        xh_update_avx512(state, data, n);
    else if (level == 1)
        xh_update_avx2(state, data, n);
    else
        XXH3_128bits_update(state, data, n);
}

void xh_digest(const void *state, uint8_t out[16])
{
    XXH128_canonical_t c;
    XXH128_canonicalFromHash(&c, XXH3_128bits_digest(state));
    for (int i = 0; i < 16; i++)
        out[i] = c.digest[i];
}

void xh_copy(void *dst, const void *src) { XXH3_copyState(dst, src); }
