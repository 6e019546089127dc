/* Substring search at memory speed: see memfind.c.
 * This header is also the cffi declaration (nfq/native/build.py reads it between the marks). */
#ifndef MEMFIND_H
#define MEMFIND_H
#include <stddef.h>
#include <stdint.h>

/* cffi-begin */
/* The lowest index at which needle (m bytes, m >= 1) occurs in hay (n bytes), or -1. */
int64_t mf_find(const uint8_t *hay, size_t n, const uint8_t *needle, size_t m);
/* Which search runs: 2 AVX2, 1 SSE2, 0 memmem (not x86-64). */
int mf_level(void);
/* Run the search of that level from now on (the tests and the fuzzer run each; a level the CPU
 * lacks is refused); returns the level in effect. */
int mf_set_level(int wanted);
/* cffi-end */
#endif
