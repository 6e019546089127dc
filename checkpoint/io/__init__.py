"""The I/O boundary of the checkpoint model: the disk (``sqlite``) and the kernel (``tcp_repair``).

Everything else in :mod:`checkpoint` is pure: it takes segments, bytes and times and returns
decisions; only the modules here touch a file or a socket.
"""
