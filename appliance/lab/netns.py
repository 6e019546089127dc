"""Network namespaces from Python 3.11: enter one per thread, make sockets in it.

Theory of operation
-------------------
Python 3.11 has no ``os.setns``; ``libc.setns`` through ctypes does the
same.  ``setns(CLONE_NEWNET)`` changes the namespace of the *calling
thread* only, and a socket belongs for its whole life to the namespace it
was created in, whichever thread uses it later.  So :func:`socket_in`
runs ``socket()`` on a short-lived thread that entered the namespace, and
the caller gets an ordinary socket object that binds, connects and repairs
in that namespace.  :func:`call_in` runs any function that way (for
``bind``/``listen`` it does not matter, but name resolution and ``/proc/sys``
reads follow the thread's namespace).

Namespaces themselves are made and removed with ``ip netns`` (named ones
live as bind mounts under ``/run/netns``).
"""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import threading
from collections.abc import Callable
from typing import TypeVar

CLONE_NEWNET = 0x40000000
T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)


def setns(fd: int, nstype: int = CLONE_NEWNET) -> None:
    if _libc.setns(fd, nstype) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"setns: {os.strerror(e)}")


def call_in(ns: str, fn: Callable[[], T]) -> T:
    """``fn()`` on a thread inside the named network namespace."""
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                setns(fd)
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as exc:  # noqa: BLE001  (re-raised in the caller)
            error.append(exc)

    t = threading.Thread(target=run, name=f"netns-{ns}")
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


def socket_in(ns: str, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> socket.socket:
    """A new socket that lives in the named network namespace."""
    return call_in(ns, lambda: socket.socket(family, type))


def ip(*args: str, ns: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``ip [-n ns] args...``; a failure raises with ip's message."""
    cmd = ["ip", *(["-n", ns] if ns else []), *args]
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")
    return r


def exists(ns: str) -> bool:
    return os.path.exists(f"/run/netns/{ns}")


def add(ns: str) -> None:
    ip("netns", "add", ns)
    ip("link", "set", "lo", "up", ns=ns)


def delete(ns: str) -> None:
    """Remove a namespace, killing whatever still runs in it first."""
    if not exists(ns):
        return
    r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=False)
    for pid in r.stdout.split():
        try:
            os.kill(int(pid), 9)
        except (ProcessLookupError, ValueError):
            pass
    ip("netns", "delete", ns, check=False)


def listing() -> list[str]:
    try:
        return sorted(os.listdir("/run/netns"))
    except FileNotFoundError:
        return []
