"""One owner of the state: failovers, migrations and resets driven through the API while traffic
flows never let a packet of a moved connection leave untranslated.

Two captures judge it: at the client (the transparency contract, and nothing from any address but
the VIP), and on the gateway's server bridge, where every packet the gateway sends a backend on a
client's behalf must be in that backend's own sequence space: sent after the SYN that opened the
flow to it, acknowledging nothing the backend has not sent (an untranslated packet carries the
other backend's numbers, random to this one)."""

from __future__ import annotations

import socket
import struct
import threading
import urllib.error
from pathlib import Path

import pytest

from appliance.lab import topology as lab
from appliance.pcap import packets

from .helpers import Capture, api, expected_sha, sha256_file, start_download, wait_for
from .invariants import check

pytestmark = pytest.mark.lab

N = 6
MASK = 0xFFFFFFFF
GATEWAY_SERVER_SIDE = f"{lab.SERVER_NET}.1"


def _diff(a: int, b: int) -> int:
    d = (a - b) & MASK
    return d - (1 << 32) if d >= 1 << 31 else d


def server_side_violations(pcap: Path, backends: set[str], vport: int) -> list[str]:
    """Packets the gateway sent a backend that are not in that backend's sequence space."""
    bad: list[str] = []
    opened: set[tuple[str, int, str]] = set()     # (client ip, port, backend) with a SYN seen
    isn: dict[tuple[str, int, str], int] = {}     # backend's ISN on that flow (latest SYN-ACK)
    high: dict[tuple[str, int, str], int] = {}    # backend's highest sequence end sent
    for t, p in packets(pcap):
        if len(p) < 40 or p[9] != 6:
            continue
        ihl = (p[0] & 15) * 4
        total = struct.unpack_from("!H", p, 2)[0]
        src, dst = socket.inet_ntoa(p[12:16]), socket.inet_ntoa(p[16:20])
        sport, dport, seq, ack = struct.unpack_from("!HHII", p, ihl)
        flags = p[ihl + 13]
        doff = (p[ihl + 12] >> 4) * 4
        plen = total - ihl - doff
        if src in backends and sport == vport:
            key = (dst, dport, src)
            if flags & 0x12 == 0x12:
                isn[key] = seq
                high[key] = (seq + 1) & MASK
            elif key in isn:
                end = (seq + plen + (1 if flags & 0x01 else 0)) & MASK
                if _diff(end, high[key]) > 0:
                    high[key] = end
        elif dst in backends and dport == vport and src != GATEWAY_SERVER_SIDE:
            # (the gateway's own health probes come from its address: not a client's connection,
            # and one open when the capture starts shows no SYN)
            key = (src, sport, dst)
            if flags & 0x02:
                opened.add(key)
                isn.pop(key, None)
                continue
            if key not in opened:
                bad.append(f"{t:.6f} {src}:{sport} > {dst}: a packet before any SYN to this backend")
                continue
            if flags & 0x04 or not flags & 0x10 or key not in isn:
                continue  # a RST (fencing, reset) carries no acknowledgment to judge
            off = _diff(ack, isn[key])
            if off < 0 or _diff(ack, high[key]) > 0:
                bad.append(f"{t:.6f} {src}:{sport} > {dst}: ack {ack} outside the backend's "
                           f"[{isn[key]}, {high[key]}]")
    return bad


def foreign_sources(pcap: Path, vip: str, vport: int) -> int:
    """Packets at the client from port ``vport`` of any address but the VIP."""
    n = 0
    for _, p in packets(pcap):
        if len(p) >= 40 and p[9] == 6:
            ihl = (p[0] & 15) * 4
            sport = struct.unpack_from("!H", p, ihl)[0]
            if sport == vport and socket.inet_ntoa(p[12:16]) != vip:
                n += 1
    return n


def _try(path: str, method: str = "GET", body: object = None) -> object:
    """An API call whose refusal (409: the connection is being moved, closed) is an answer too."""
    try:
        return api(path, method, body)
    except urllib.error.HTTPError as exc:
        if exc.code != 409:
            raise
        return None


def test_api_actions_under_traffic_never_leak_an_untranslated_packet(fresh: dict, tmp_path: Path) -> None:
    backends = {f"{lab.SERVER_NET}.10", f"{lab.SERVER_NET}.20"}
    downloads = []
    with Capture("lab-client", tmp_path / "client.pcap", snaplen=65535) as ccap, \
            Capture("lab-gateway", tmp_path / "server.pcap", iface="br-server", snaplen=96) as scap:
        for i in range(N):
            downloads.append(start_download("10M.bin", tmp_path / f"d{i}.bin", rate="1200K"))
        wait_for(lambda: len([c for c in api("/api/v1/connections?service=web&open_only=true")
                              if c["state"] == "ESTABLISHED" and c["bytes_from_server"] > 0]) >= N,
                 timeout=60, what=f"{N} downloads under way")
        conns = api("/api/v1/connections?service=web&open_only=true")
        victim = max(c["id"] for c in conns)
        victim_port = int(next(c["client"] for c in conns if c["id"] == victim).rsplit(":", 1)[1])
        stop = threading.Event()
        errors: list[BaseException] = []

        def reader() -> None:  # the panel's reads, meanwhile
            try:
                while not stop.is_set():
                    api("/api/v1/status")
                    api("/api/v1/connections?limit=50")
                    api("/api/v1/backends")
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        def migrator() -> None:  # single connections moved back and forth while failovers run
            try:
                while not stop.is_set():
                    for c in api("/api/v1/connections?service=web&open_only=true"):
                        if c["id"] == victim or c["state"] != "ESTABLISHED":
                            continue
                        other = "primary" if c["backend"] == "backup" else "backup"
                        _try(f"/api/v1/connections/{c['id']}/migrate", "POST", {"to": other, "mode": "replay"})
                        break
                    stop.wait(0.3)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)

        threads = [threading.Thread(target=reader), threading.Thread(target=migrator)]
        for th in threads:
            th.start()
        try:
            for to in ("backup", "primary", "backup"):
                _try("/api/v1/services/web/failover", "POST", {"to": to})
                if to == "primary":
                    api(f"/api/v1/connections/{victim}", "DELETE")
                # the next failover once this one's moves have been verified (or have ended)
                wait_for(lambda: api("/api/v1/status")["moving"] == 0, timeout=30,
                         what="the moves of a failover verified")
        finally:
            stop.set()
            for th in threads:
                th.join(timeout=30)
        results = [d.wait(timeout=120) for d in downloads]
    assert not errors, errors
    ok = [(rc, port, d) for (rc, port), d in zip(results, downloads) if port != victim_port]
    assert len(ok) == N - 1, f"the reset connection (port {victim_port}) not among {results}"
    assert [rc for rc, port in results if port == victim_port] != [0]  # its client saw the reset
    for rc, port, d in ok:
        assert rc == 0, f"download on port {port} failed"
        assert sha256_file(d.out) == expected_sha("10M.bin")
    moves = api("/api/v1/events?kind=migration&service=web&limit=10000")
    assert len(moves) >= N, f"only {len(moves)} moves happened"
    assert foreign_sources(ccap.path, lab.VIP, lab.SERVICE_PORT) == 0
    assert server_side_violations(scap.path, backends, lab.SERVICE_PORT) == []
    reports = check(ccap.path, f"{lab.CLIENT_NET}.10", lab.VIP, lab.SERVICE_PORT)
    bad = {p: r.violations for p, r in reports.items() if r.violations and p != victim_port}
    assert not bad, f"transparency violations: {bad}"
    # the reset one saw its RST, and never a wrong byte
    assert reports[victim_port].rsts >= 1
    assert not [v for v in reports[victim_port].violations if v.startswith(("I1", "I2", "I3"))]
