"""Substring search at memory speed over any buffer (bytes, bytearray, memoryview).

The stream digest masks volatile fields (``Date:`` values) in every byte a backend sends, so the
search runs over the whole download.  Three implementations give the same answers, the fastest
available one is used:

* ``memfind``: our SIMD search (``checkpoint/native/memfind.c``, AVX2 or SSE2, built by the
  README's set-up), on the buffer in place;
* ``memmem``: glibc's, called through cffi's ABI mode, in place (about 4 GB/s on binary data);
* ``bytes.find``: the standard search (about 2 GB/s here, and a copy of a memoryview).

:func:`use` picks one by name (the handler benchmark and the tests compare them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Buffer = bytes | bytearray | memoryview
Search = Callable[[Buffer, bytes, int], int]   # (hay, needle, start >= 0, enough bytes left) -> index

_SMALL = 512  # below this the call's own cost outweighs the search


def _bytes_find(hay: Buffer, needle: bytes, start: int) -> int:
    return (hay if not isinstance(hay, memoryview) else hay.tobytes()).find(needle, start)


def _cffi_search(ffi: Any, fn: Any, found: Callable[[Any, Any, int], int]) -> Search:
    """A C search ``fn(hay, n, needle, m)`` on the buffer in place; ``found(result, base, start)``
    turns its result into an index."""
    def search(hay: Buffer, needle: bytes, start: int) -> int:
        base = ffi.from_buffer(hay)
        return found(fn(base + start, len(hay) - start, needle, len(needle)), base, start)
    return search


IMPLEMENTATIONS: dict[str, Search] = {}

try:
    from .native._memfind import ffi as _mf_ffi  # type: ignore[import-not-found]
    from .native._memfind import lib as _mf_lib

    IMPLEMENTATIONS["memfind"] = _cffi_search(_mf_ffi, _mf_lib.mf_find,
                                              lambda r, base, start: -1 if r < 0 else start + int(r))
except ImportError:  # not built: memmem or bytes.find answer the same
    pass

try:
    import cffi  # type: ignore[import-untyped]

    _ffi: Any = cffi.FFI()
    _ffi.cdef("void *memmem(const void *haystack, size_t haystacklen, const void *needle, size_t needlelen);")
    _libc: Any = _ffi.dlopen(None)
    IMPLEMENTATIONS["memmem"] = _cffi_search(
        _ffi, _libc.memmem, lambda p, base, start: -1 if p == _ffi.NULL else int(_ffi.cast("char *", p) - base))
except Exception:  # pragma: no cover - no cffi, or no memmem in this libc
    pass

IMPLEMENTATIONS["bytes.find"] = _bytes_find

_name = next(iter(IMPLEMENTATIONS))
_search: Search = IMPLEMENTATIONS[_name]


def find(hay: Buffer, needle: bytes, start: int = 0) -> int:
    """The lowest index ``i >= start`` where ``needle`` occurs in ``hay``, or -1 (as ``bytes.find``;
    ``needle`` not empty)."""
    n = len(hay)
    if start < 0:
        start = max(0, start + n)
    if n - start < len(needle):
        return -1
    if n - start < _SMALL:
        return _bytes_find(hay, needle, start)
    return _search(hay, needle, start)


def use(name: str) -> str:
    """Search with implementation ``name`` from now on; returns the one used before."""
    global _name, _search
    before = _name
    _search, _name = IMPLEMENTATIONS[name], name
    return before


def implementation() -> str:
    """The implementation in use (the fastest one available unless :func:`use` chose another)."""
    return _name


def simd_level(wanted: int | None = None) -> int:
    """The level of ``memfind``'s search (2 AVX2, 1 SSE2; 0 not built); ``wanted``: use that level
    from now on (where the CPU has it)."""
    if "memfind" not in IMPLEMENTATIONS:
        return 0
    return int(_mf_lib.mf_level() if wanted is None else _mf_lib.mf_set_level(wanted))


def available() -> bool:
    """Is an in-place search (not ``bytes.find``) in use?"""
    return _name != "bytes.find"
