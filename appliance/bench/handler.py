"""The data plane's own time per packet, in process (no root, no kernel): one ordinary
connection of a ``verify = "full"`` service, the kernel rewriting its client packets; the backend
sends segments of ``--size`` bytes, the client acknowledges each.  Each variant is timed in
alternation in the same run:

* ``memfind``: the volatile-field search in our SIMD code (the default, :mod:`checkpoint.memsearch`);
* ``memmem``: glibc's ``memmem`` in place (the default before);
* ``bytes.find``: the standard search (what runs without cffi, and what ran before that).

``python -m appliance.bench.handler [--size 65000] [--packets 2000] [--rounds 5] [--json FILE]``

It prints microseconds per backend segment and per client ACK (medians over the rounds): the
Python engine's share of the per-packet cost, without the queue's system calls and copies.  Then
the same backend segments and client ACKs through the compiled fast path
(``appliance.dataplane.offload``), in batches of 1 and of 16 packets: the cache's decision (the
tracker, the masking and hashing of the data) plus the sync of the records.
"""

from __future__ import annotations

import argparse
import json
import statistics
import struct
import time
from pathlib import Path
from typing import Any

from checkpoint import memsearch
from nfq.build import tcp_options, tcp_packet

from ..config import parse
from ..dataplane import Dataplane

VIP, CLIENT, PRIMARY = "203.0.113.10", "192.0.2.10", "198.51.100.10"
CONFIG: dict[str, Any] = {
    "api": {"token": "a-long-token"},
    "service": [{"name": "web", "vip": VIP, "port": 80, "failover": {"verify": "full"},
                 "backend": [{"name": "primary", "address": PRIMARY}, {"name": "backup", "address": "198.51.100.20"}]}],
}
SYN, ACK, PSH = 0x02, 0x10, 0x08


def _c2s(seq: int, ack: int, flags: int, data: bytes = b"", tsval: int = 0, tsecr: int = 0,
         syn_opts: bool = False) -> bytearray:
    opts = tcp_options(mss=1460, wscale=7, sack_permitted=True, tsval=tsval, tsecr=tsecr, syn=True) if syn_opts \
        else tcp_options(tsval=tsval, tsecr=tsecr)
    return bytearray(tcp_packet(CLIENT, VIP, 40000, 80, seq, ack, flags, 2000, opts, data))


def _s2c(seq: int, ack: int, flags: int, data: bytes = b"", tsval: int = 0, tsecr: int = 0,
         syn_opts: bool = False) -> bytearray:
    opts = tcp_options(mss=1460, wscale=7, sack_permitted=True, tsval=tsval, tsecr=tsecr, syn=True) if syn_opts \
        else tcp_options(tsval=tsval, tsecr=tsecr)
    return bytearray(tcp_packet(PRIMARY, CLIENT, 80, 40000, seq, ack, flags, 2000, opts, data))


def _connected(dp: Dataplane) -> Dataplane:
    """``dp`` with the kernel rewriting client packets and one connection: handshake, request."""
    for svc in dp.services.values():
        svc.kernel_target = svc.active
    dp.handle(_c2s(1000, 0, SYN, tsval=100, syn_opts=True), 1.0)
    dp.handle(_s2c(5000, 1001, SYN | ACK, tsval=7000, tsecr=100, syn_opts=True), 1.0)
    dp.handle(_c2s(1001, 5001, ACK, tsval=101, tsecr=7000), 1.0)
    dp.handle(_c2s(1001, 5001, ACK | PSH, b"GET / HTTP/1.1\r\n\r\n", tsval=102, tsecr=7000), 1.0)
    return dp


def _one_run(size: int, packets: int) -> tuple[float, float]:
    """µs per backend segment and per client ACK, on a fresh connection."""
    dp = _connected(Dataplane(parse(CONFIG)))
    body = (bytes(range(256)) * (size // 256 + 1))[:size]
    pkts = []
    seq = 5001
    for i in range(packets):
        pkts.append((0, _s2c(seq, 1019, ACK, body, tsval=7001 + i, tsecr=102 + i)))
        seq += size
        pkts.append((1, _c2s(1019, seq, ACK, tsval=103 + i, tsecr=7001 + i)))
    spent = [0.0, 0.0]
    now = 2.0
    handle, clock = dp.handle, time.perf_counter
    for k, buf in pkts:
        t0 = clock()
        handle(buf, now)
        spent[k] += clock() - t0
        now += 1e-5
    return spent[0] / packets * 1e6, spent[1] / packets * 1e6


def _fast_run(packets: int, batch: int, size: int = 0) -> float:
    """µs per packet decided by the fast path, the records synced after each batch: client ACKs
    (``size`` 0), or backend segments of ``size`` bytes (tracked, masked, hashed)."""
    from nfq.native import _lib

    from ..dataplane.offload import Offload

    ffi, lib = _lib()
    dp = Dataplane(parse(CONFIG))
    off = Offload(dp, 16)
    _connected(dp)
    # one batch of buffers, their sequence numbers moved on between batches (untimed): a packet
    # the kernel just copied is in the cache, as these are, not spread over a hundred MB
    if size:
        data = (bytes(range(256)) * (size // 256 + 1))[:size]
        ring = [_s2c(5001 + size * i, 1019, ACK, data, tsval=7001, tsecr=102) for i in range(batch)]
        field, step = 24, size           # the TCP sequence number (IPv4 header of 20 bytes)
    else:
        ring = [_c2s(1019, 5001 + 1000 * i, ACK, tsval=103, tsecr=7000) for i in range(batch)]
        field, step = 28, 1000           # the acknowledgment number
    views = [(ffi.from_buffer(p), len(p)) for p in ring]
    cache, begin, decide, sync = off.cache, lib.fpc_begin, lib.fpc_packet, off.sync
    clock = time.perf_counter
    spent = 0.0
    n = 0
    for k in range(0, packets, batch):
        for i, p in enumerate(ring):
            struct.pack_into("!I", p, field, (5001 + step * (k + i)) & 0xFFFFFFFF)
        t0 = clock()
        begin(cache)
        for p, length in views:
            if decide(cache, p, length) < 0:
                raise RuntimeError("a packet of the offloaded connection was punted")
        sync(2.0)
        spent += clock() - t0
        n += batch
    return spent / n * 1e6


def handler_bench(size: int = 65000, packets: int = 2000, rounds: int = 5) -> dict[str, Any]:
    got: dict[str, list[tuple[float, float]]] = {name: [] for name in memsearch.IMPLEMENTATIONS}
    before = memsearch.implementation()
    try:
        for _ in range(rounds):
            for name in got:
                memsearch.use(name)
                got[name].append(_one_run(size, packets))
    finally:
        memsearch.use(before)
    out: dict[str, Any] = {"size": size, "packets": packets, "rounds": rounds, "default": before,
                           "variants": {}}
    for name, runs in got.items():
        out["variants"][name] = {"segment_us": round(statistics.median(r[0] for r in runs), 1),
                                 "ack_us": round(statistics.median(r[1] for r in runs), 1),
                                 "runs": [[round(a, 1), round(b, 1)] for a, b in runs]}
    out["fastpath_ack_us"] = {str(b): round(statistics.median(_fast_run(packets, b) for _ in range(rounds)), 2)
                              for b in (1, 16)}
    out["fastpath_segment_us"] = {str(b): round(statistics.median(_fast_run(packets, b, size) for _ in range(rounds)), 2)
                                  for b in (1, 16)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=65000, help="bytes per backend segment (a GSO super-packet: 65000)")
    ap.add_argument("--packets", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", help="also write the results to this file")
    a = ap.parse_args()
    if not 0 < a.size <= 65000:
        ap.error("--size: 1..65000")
    res = handler_bench(a.size, a.packets, a.rounds)
    for name, v in res["variants"].items():
        mark = " (default)" if name == res["default"] else ""
        print(f"{name:>10}{mark:10}: {v['segment_us']:6.1f} µs per {a.size}-byte backend segment, "
              f"{v['ack_us']:5.1f} µs per client ACK")
    fp, fs = res["fastpath_ack_us"], res["fastpath_segment_us"]
    print(f"{'fast path':>20}: {fs['1']:5.2f} µs per {a.size}-byte backend segment, {fp['1']:5.2f} per client ACK "
          f"in one-packet batches; {fs['16']:5.2f} and {fp['16']:5.2f} in batches of 16")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
