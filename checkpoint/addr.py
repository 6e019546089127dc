"""Addresses of either family, as the layers above the packet carry them.

Above the packet layer an address is a string in the form :mod:`ipaddress`
prints (``"192.0.2.10"``, ``"2001:db8:2::10"``); its family is read from the
string itself, so records, documents and events need no separate field.
"""

from __future__ import annotations

import socket


def is_v6(addr: str) -> bool:
    """True for an IPv6 address string (it holds a colon; IPv4 never does)."""
    return ":" in addr


def family(addr: str) -> str:
    """``"ipv4"`` or ``"ipv6"``: the label the API and the metrics use."""
    return "ipv6" if ":" in addr else "ipv4"


def pack(addr: str) -> bytes:
    """The address's bytes on the wire: 4 for IPv4, 16 for IPv6."""
    return socket.inet_pton(socket.AF_INET6 if ":" in addr else socket.AF_INET, addr)


def unpack(raw: bytes) -> str:
    """The string of 4 or 16 address bytes."""
    return socket.inet_ntop(socket.AF_INET6 if len(raw) == 16 else socket.AF_INET, raw)


def with_port(addr: str, port: int) -> str:
    """``192.0.2.10:80`` or ``[2001:db8::1]:80`` (RFC 3986 brackets for IPv6)."""
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"
