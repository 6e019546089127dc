"""Compiled helpers of the checkpoint model (built by ``python -m nfq.native.build``):
``_memfind``, the stream digest's search for volatile fields (``memfind.c``)."""
