"""XXH3-128 hashers for the stream digest: native (state shared with the fast path) or Python's.

:func:`new` gives a hasher with ``update``, ``digest``, ``hexdigest``, ``copy`` and ``reset``.
When ``checkpoint.native._xxh3`` is built (the README's set-up builds it) the hasher keeps its
state in a block whose address the native engine's fast path is given
(:attr:`NativeXXH3.address`), so compiled code and Python hash one stream on one state; else it
is the ``xxhash`` package's object.  Both give the same digests (XXH3-128, canonical bytes).
"""

from __future__ import annotations

from typing import Any, Protocol

import xxhash


class Hasher(Protocol):
    def update(self, data: bytes | bytearray | memoryview) -> None: ...
    def digest(self) -> bytes: ...
    def hexdigest(self) -> str: ...
    def copy(self) -> Hasher: ...
    def reset(self) -> None: ...


try:
    from .native._xxh3 import ffi as _ffi  # type: ignore[import-not-found]
    from .native._xxh3 import lib as _lib
except ImportError:  # not built: Python's xxhash alone
    _ffi = _lib = None


class NativeXXH3:
    """An XXH3-128 state in a block of its own (``checkpoint/native/xxh3.c``)."""

    __slots__ = ("_state",)

    def __init__(self, _state: Any = None) -> None:
        if _state is None:
            _state = _ffi.gc(_lib.xh_new(), _lib.xh_free)
            if _state == _ffi.NULL:
                raise MemoryError("XXH3 state")
        self._state = _state

    @property
    def address(self) -> Any:
        """The state, for the fast path (valid while this object lives)."""
        return self._state

    def update(self, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        if n:
            _lib.xh_update(self._state, _ffi.from_buffer(data), n)

    def digest(self) -> bytes:
        out = _ffi.new("uint8_t[16]")
        _lib.xh_digest(self._state, out)
        return bytes(out)

    def hexdigest(self) -> str:
        return self.digest().hex()

    def copy(self) -> NativeXXH3:
        st = _ffi.gc(_lib.xh_new(), _lib.xh_free)
        _lib.xh_copy(st, self._state)
        return NativeXXH3(st)

    def reset(self) -> None:
        _lib.xh_reset(self._state)


def native() -> bool:
    """Is the shared-state hasher built?"""
    return _lib is not None


def new() -> Hasher:
    return NativeXXH3() if _lib is not None else xxhash.xxh3_128()
