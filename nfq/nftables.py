"""nftables in process: a small ctypes binding to ``libnftables.so.1``.

The ``nft`` command line is a thin front end of this library; calling the
library directly runs the same parser and sends the same netlink batch
without starting a process (a few ms each, on the appliance's one event loop
that also carries every packet).  Debian's ``python3-nftables`` wraps the
same seven functions; it is not importable from the project's virtualenv, so
this is the part of it the appliance needs:

* :func:`nft_ctx_new` (``NFT_CTX_DEFAULT``), one context per process, made
  on first use and reused (:func:`context`);
* output and error buffered in memory (``nft_ctx_buffer_output``,
  ``nft_ctx_buffer_error``) and read back after each command;
* :meth:`Nft.run` = ``nft_run_cmd_from_buffer``: a script in ``nft -f``
  syntax, all of it one transaction (every command applies or none), its
  output returned, a failure raised as :class:`NftError` with nft's own
  message.

Not thread-safe: a context holds one netlink socket, one cache and one pair
of buffers, so it has one owner (the appliance's event loop) and is never
used from two threads at once.  The context's netlink socket is opened by
``nft_ctx_new``, so it talks to the network namespace the calling thread was
in when the context was made, whatever namespace later commands come from: a
process (or thread) that changes namespace must make a new :class:`Nft`
there, not reuse :func:`context`.

The library is loaded on first use, so importing this module works on a
machine without libnftables (only running a command needs it).
"""

from __future__ import annotations

import ctypes
from typing import Final, Self

LIBRARY: Final = "libnftables.so.1"
NFT_CTX_DEFAULT: Final = 0


class NftError(RuntimeError):
    """An nftables command failed; ``str()`` is nft's own error text."""

    def __init__(self, message: str, script: str = "", code: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.script = script
        self.code = code


class _Lib:
    """The library's entry points, with their C signatures declared once."""

    def __init__(self, path: str) -> None:
        try:
            lib = ctypes.CDLL(path)
        except OSError as e:
            raise NftError(f"cannot load {path}: {e} (install libnftables1)") from e
        self.ctx_new = lib.nft_ctx_new
        self.ctx_new.argtypes = [ctypes.c_uint32]
        self.ctx_new.restype = ctypes.c_void_p
        self.ctx_free = lib.nft_ctx_free
        self.ctx_free.argtypes = [ctypes.c_void_p]
        self.ctx_free.restype = None
        self.buffer_output = lib.nft_ctx_buffer_output
        self.buffer_output.argtypes = [ctypes.c_void_p]
        self.buffer_output.restype = ctypes.c_int
        self.buffer_error = lib.nft_ctx_buffer_error
        self.buffer_error.argtypes = [ctypes.c_void_p]
        self.buffer_error.restype = ctypes.c_int
        self.get_output = lib.nft_ctx_get_output_buffer
        self.get_output.argtypes = [ctypes.c_void_p]
        self.get_output.restype = ctypes.c_char_p
        self.get_error = lib.nft_ctx_get_error_buffer
        self.get_error.argtypes = [ctypes.c_void_p]
        self.get_error.restype = ctypes.c_char_p
        self.run_cmd = lib.nft_run_cmd_from_buffer
        self.run_cmd.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        self.run_cmd.restype = ctypes.c_int


def _text(raw: object) -> str:
    """A ``c_char_p`` result (bytes, or None for NULL) as text."""
    return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else ""


class Nft:
    """One libnftables context (one netlink socket, one cache)."""

    def __init__(self, library: str = LIBRARY) -> None:
        self._lib = _Lib(library)
        ctx: int | None = self._lib.ctx_new(NFT_CTX_DEFAULT)
        if not ctx:
            raise NftError("nft_ctx_new failed")
        self._ctx: int | None = ctx
        if int(self._lib.buffer_output(ctx)) != 0 or int(self._lib.buffer_error(ctx)) != 0:
            self.close()
            raise NftError("cannot buffer libnftables output")

    def run(self, script: str) -> str:
        """Run ``script`` (``nft -f`` syntax) as one transaction; its output.

        Raises :class:`NftError` with nft's error message when any command
        fails, in which case none of them took effect.
        """
        ctx = self._ctx
        if ctx is None:
            raise NftError("libnftables context is closed", script)
        code = int(self._lib.run_cmd(ctx, script.encode()))
        # reading a buffer also empties it for the next command
        output = _text(self._lib.get_output(ctx))
        error = _text(self._lib.get_error(ctx))
        if code != 0:
            raise NftError(error.strip() or f"nft failed ({code})", script, code)
        return output

    def close(self) -> None:
        if self._ctx is not None:
            self._lib.ctx_free(self._ctx)
            self._ctx = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_context: Nft | None = None


def context() -> Nft:
    """The process's context, made on first use."""
    global _context
    if _context is None:
        _context = Nft()
    return _context


def run(script: str) -> str:
    """Run ``script`` with the process's context (see :meth:`Nft.run`)."""
    return context().run(script)
