"""Compiled helpers of the checkpoint model (built by ``python -m nfq.native.build``):
``_memfind``, the stream digest's search for volatile fields (``memfind.c``), and ``_xxh3``, its
XXH3-128 state in memory the native engine's fast path shares (``xxh3.c``)."""
