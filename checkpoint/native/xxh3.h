/* XXH3-128 with its state in memory the caller can share: see xxh3.c.
 * This header is also the cffi declaration (nfq/native/build.py reads it between the marks). */
#ifndef XXH3_SHARED_H
#define XXH3_SHARED_H
#include <stddef.h>
#include <stdint.h>

/* cffi-begin */
void *xh_new(void);
void xh_free(void *state);
void xh_reset(void *state);
void xh_update(void *state, const uint8_t *data, size_t n);
void xh_digest(const void *state, uint8_t out[16]);
void xh_copy(void *dst, const void *src);
/* cffi-end */
#endif
