"""The native NFQUEUE binding (nfq.native) against the real kernel: two namespaces joined by a
veth (TSO on, so the sender's queue sees GSO super-packets), the queue on the sender's OUTPUT
hook, a process that binds it in the sender's namespace."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import require_root

pytestmark = pytest.mark.lab
ROOT = Path(__file__).resolve().parents[2]
A, B = "lab-nq-a", "lab-nq-b"


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True)


def _clean() -> None:
    for ns in (A, B):
        for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
            sh("kill", "-9", pid, check=False)
        sh("ip", "netns", "del", ns, check=False)


@pytest.fixture
def pair() -> Iterator[None]:
    require_root()
    _clean()
    try:
        for ns in (A, B):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", "nqa", "netns", A, "type", "veth", "peer", "name", "nqb", "netns", B)
        sh("ip", "-n", A, "addr", "add", "192.0.2.201/24", "dev", "nqa")
        sh("ip", "-n", B, "addr", "add", "192.0.2.202/24", "dev", "nqb")
        sh("ip", "-n", A, "link", "set", "nqa", "up")
        sh("ip", "-n", B, "link", "set", "nqb", "up")
        yield
    finally:
        _clean()


def run_in_a(script: str, timeout: float = 180) -> dict:
    """Run ``script`` (which prints one JSON line last) in namespace A, with a sink in B that
    answers every connection with the sha256 of what it received."""
    sink = textwrap.dedent("""
        import hashlib, socket
        s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("192.0.2.202", 7777)); s.listen(8)
        print("ready", flush=True)
        while True:
            c, _ = s.accept(); h = hashlib.sha256()
            while d := c.recv(1 << 20):
                h.update(d)
            c.sendall(h.hexdigest().encode()); c.close()
    """)
    srv = subprocess.Popen(["ip", "netns", "exec", B, sys.executable, "-c", sink], stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
        res = subprocess.run(["ip", "netns", "exec", A, sys.executable, "-c", script], capture_output=True,
                             text=True, timeout=timeout, cwd=ROOT)
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout.strip().splitlines()[-1])
    finally:
        srv.kill()
        srv.wait()


PRELUDE = textwrap.dedent("""
    import hashlib, json, select, socket, subprocess, sys, threading, time
    sys.path.insert(0, {root!r})
    from nfq.native import NativeQueue
    from nfq.queue import Verdict
    subprocess.run(["iptables-legacy", "-t", "raw", "-A", "OUTPUT", "-p", "tcp", "--dport", "7777",
                    "-j", "NFQUEUE", "--queue-num", "9"], check=True)

    def serve(q, budget=256):
        def loop():
            while True:
                select.select([q.fileno()], [], [])
                q.process_pending(budget)
        threading.Thread(target=loop, daemon=True).start()

    def settled(q, timeout=5.0):
        # the counters once every packet handled has its verdict counted (the serving thread may
        # be in the middle of the exchange's last packets when the exchange returns)
        deadline = time.time() + timeout
        while True:
            st = q.stats.as_dict()
            if st["packets"] == st["accepted"] + st["dropped"] + st["rewritten"] or time.time() > deadline:
                return st
            time.sleep(0.01)

    def send(msg):
        # (a deadline for the whole exchange, generous: this is no speed test)
        c = socket.create_connection(("192.0.2.202", 7777), timeout=60)
        try:
            c.sendall(msg); c.shutdown(socket.SHUT_WR)
            got = c.recv(100).decode(); c.close()
        except OSError:  # say where the queue stood
            for v in list(globals().values()):
                if isinstance(v, NativeQueue):
                    print("queue", v.queue_num, v.stats.as_dict(), v.native_counters(), file=sys.stderr)
            subprocess.run(["ss", "-tmi", "dport", "7777"], stdout=sys.stderr)
            raise
        return got
""")


def test_gso_super_packets_arrive_whole_and_a_rewrite_of_one_is_delivered_intact(pair: None) -> None:
    """Every packet of a 32 MiB stream gets a verdict; most arrive as GSO super-packets (up to
    64 KiB, one verdict each, in batches); a handler that rewrites every payload byte of them
    gets its bytes delivered, which needs the TCP checksum completed (the kernel left it as the
    pseudo-header seed and takes a rewritten packet as final).  The handler sees every copy with
    a valid checksum (it may send such bytes again itself: a held ACK)."""
    script = PRELUDE.format(root=str(ROOT)) + textwrap.dedent("""
        sizes = []
        def handler(buf):
            sizes.append(len(buf))
            ihl = (buf[0] & 15) * 4
            doff = (buf[ihl + 12] >> 4) * 4
            if len(buf) > ihl + doff:
                buf[ihl + doff:] = buf[ihl + doff:].replace(b"a", b"b")
                return Verdict.REWRITTEN
            return Verdict.ACCEPT
        q = NativeQueue(9, handler)
        serve(q)
        msg = b"a" * (32 << 20)
        got = send(msg)
        st = settled(q)
        print(json.dumps({"ok": got == hashlib.sha256(msg.replace(b"a", b"b")).hexdigest(),
                          "max": max(sizes), "n": len(sizes), "stats": st}))
    """)
    out = run_in_a(script)
    st = out["stats"]
    assert out["ok"], st
    assert out["max"] > 16384 and st["gso_packets"] > 0  # super-packets, whole
    assert st["checksums_completed"] >= st["gso_packets"]  # every super-packet's copy finished first
    assert st["packets"] == st["received"] == st["accepted"] + st["rewritten"]
    assert st["handler_errors"] == st["parse_errors"] == st["verdict_errors"] == 0
    # 32 MiB in 1448-byte segments would be over 23,000 packets
    assert out["n"] < 5000


def test_every_packet_gets_a_verdict_when_the_handler_raises_or_drops(pair: None) -> None:
    """A handler that raises on every other packet: those take the error verdict (accept), the
    stream still arrives; plain accepts go back in batches."""
    script = PRELUDE.format(root=str(ROOT)) + textwrap.dedent("""
        calls = [0]
        def handler(buf):
            calls[0] += 1
            if calls[0] % 2:
                raise RuntimeError("handler bug")
            return Verdict.ACCEPT
        q = NativeQueue(9, handler)
        serve(q)
        msg = bytes(range(256)) * 40000
        got = send(msg)
        st = settled(q)
        print(json.dumps({"ok": got == hashlib.sha256(msg).hexdigest(), "stats": st}))
    """)
    out = run_in_a(script)
    st = out["stats"]
    assert out["ok"]
    assert st["handler_errors"] >= 1 and st["handler_errors"] == (st["packets"] + 1) // 2
    assert st["accepted"] == st["packets"]
    assert st["batch_verdicts"] >= 1


def test_every_packet_gets_a_verdict_when_the_fast_paths_sync_raises(pair: None) -> None:
    """A fast path (a real flow cache, one flow: this connection's client side) whose sync raises:
    the packets it decided still get their verdicts (counted accepted), the error is counted, the
    rest of the batch is handled, the stream arrives whole."""
    script = PRELUDE.format(root=str(ROOT)) + textwrap.dedent("""
        from nfq.native import _lib
        ffi, lib = _lib()

        class Failing:
            enabled = True
            wants_packets = False

            def __init__(self):
                self.cache = ffi.gc(lib.fpc_new(8), lib.fpc_free)
                f = ffi.new("struct fpc_flow *")
                f.conn_id, f.family, f.dirs = 1, 4, 1   # the client's pure ACKs (FPC_CLIENT)
                ffi.memmove(f.client_addr, socket.inet_aton("192.0.2.201"), 4)
                ffi.memmove(f.vip, socket.inet_aton("192.0.2.202"), 4)
                ffi.memmove(f.backend_addr, socket.inet_aton("192.0.2.203"), 4)
                f.client_port, f.vport, f.backend_port = 40123, 7777, 1
                assert lib.fpc_install(self.cache, f) >= 0
                self.calls = 0

            def sync(self, now, packets=None):
                self.calls += 1
                lib.fpc_synced(self.cache)
                raise RuntimeError("sync bug")

        fp = Failing()
        q = NativeQueue(9, lambda buf: Verdict.ACCEPT, fastpath=fp)
        serve(q)
        msg = bytes(range(256)) * 4000
        c = socket.create_connection(("192.0.2.202", 7777), timeout=60, source_address=("192.0.2.201", 40123))
        c.sendall(msg); c.shutdown(socket.SHUT_WR)
        got = c.recv(100).decode(); c.close()
        deadline = time.time() + 10  # the client's ACK of the answer (delayed) goes through the queue
        while q.fast < 1 and time.time() < deadline:
            time.sleep(0.01)
        st = settled(q)
        print(json.dumps({"ok": got == hashlib.sha256(msg).hexdigest(), "stats": st, "fast": q.fast,
                          "syncs": fp.calls}))
    """)
    out = run_in_a(script)
    st = out["stats"]
    assert out["ok"]
    assert out["fast"] >= 1 and out["syncs"] >= 1
    # every failed sync counted (a later ACK of the close may have been synced since the stats were read)
    assert 1 <= st["handler_errors"] <= out["syncs"] and "fast path sync" in str(st["last_error"])
    assert st["accepted"] == st["packets"]


def test_enobufs_and_the_kernels_drops_are_counted_not_hidden(pair: None) -> None:
    """A tiny socket buffer and a reader that sleeps: the kernel cannot deliver, the next read
    sees ENOBUFS and the binding counts it; the kernel's own per-queue counter shows the packets
    it dropped.  With fail-open off and the queue not read, the connection stalls; once read, it
    recovers (TCP retransmits)."""
    script = PRELUDE.format(root=str(ROOT)) + textwrap.dedent("""
        q = NativeQueue(9, lambda buf: Verdict.ACCEPT, sock_len=4096)
        res = {}
        t = threading.Thread(target=lambda: res.setdefault("got", send(b"z" * (4 << 20))), daemon=True)
        t.start()
        time.sleep(1.0)   # not reading: the socket buffer overflows (a deliberate stall, not a wait)
        serve(q, budget=64)
        t.join(60)
        st = q.stats.as_dict()
        print(json.dumps({"ok": res.get("got") == hashlib.sha256(b"z" * (4 << 20)).hexdigest(), "stats": st}))
    """)
    out = run_in_a(script)
    st = out["stats"]
    assert out["ok"]
    assert st["enobufs"] >= 1
    assert st["kernel_user_dropped"] >= 1


def test_hypothesis_packets_through_the_binding_into_the_data_plane(pair: None) -> None:
    """Random IPv4/TCP packets (hypothesis: any flags, options, lengths, payloads, headers that
    lie about lengths) sent through the queue into the real data plane: every one gets a verdict,
    no handler error, the process survives; malformed ones are counted."""
    script = PRELUDE.format(root=str(ROOT)) + textwrap.dedent("""
        import os, struct
        from hypothesis import HealthCheck, given, settings, strategies as st
        from appliance.config import parse
        from appliance.dataplane import Dataplane
        cfg = parse({"api": {"token": "a-long-token"},
                     "service": [{"name": "web", "vip": "192.0.2.202", "port": 7777,
                                  "backend": [{"name": "p", "address": "192.0.2.203", "port": 7777}]}]})
        dp = Dataplane(cfg)
        q = NativeQueue(9, lambda buf: dp.handle(buf, time.time()))
        serve(q)
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        sent = [0]

        def csum(b):
            if len(b) % 2: b += b"\\0"
            s = sum(struct.unpack(f"!{len(b)//2}H", b))
            while s >> 16: s = (s & 0xffff) + (s >> 16)
            return ~s & 0xffff

        @settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(flags=st.integers(0, 255), seq=st.integers(0, 2**32 - 1), ack=st.integers(0, 2**32 - 1),
               doff=st.integers(0, 15), opts=st.binary(max_size=40), payload=st.binary(max_size=3000),
               sport=st.integers(1, 65535), garbage_len=st.booleans(), win=st.integers(0, 65535))
        def one(flags, seq, ack, doff, opts, payload, sport, garbage_len, win):
            opts = opts[: (len(opts) // 4) * 4]
            tcp = struct.pack("!HHIIBBHHH", sport, 7777, seq, ack, (doff or (5 + len(opts) // 4)) << 4, flags,
                              win, 0, 0) + opts + payload
            src, dst = socket.inet_aton("192.0.2.201"), socket.inet_aton("192.0.2.202")
            c = csum(src + dst + struct.pack("!BBH", 0, 6, len(tcp)) + tcp)
            tcp = tcp[:16] + struct.pack("!H", c) + tcp[18:]
            total = 20 + len(tcp)
            ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, 0, 64, 6, 0, src, dst)
            raw.sendto(ip + tcp, ("192.0.2.202", 0))
            sent[0] += 1

        one()
        deadline = time.time() + 20
        while q.stats.packets < sent[0] and time.time() < deadline:
            time.sleep(0.02)
        st_ = q.stats.as_dict()
        print(json.dumps({"sent": sent[0], "stats": st_, "malformed": dp.counters.malformed}))
    """)
    out = run_in_a(script, timeout=240)
    st = out["stats"]
    assert out["sent"] >= 300
    assert st["packets"] >= out["sent"] - 5  # (the kernel may refuse a few on its own: bad lengths)
    assert st["handler_errors"] == 0 and st["parse_errors"] == 0
    assert st["packets"] == st["accepted"] + st["rewritten"] + st["dropped"]
    assert out["malformed"] >= 1
