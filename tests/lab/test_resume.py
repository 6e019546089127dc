"""Resume mode through the gateway (issue 5, phase 2): the lab's "resumable"
service (the example resumable file server on primary and backup, an agent on
each, ``failover.mode = "resume"``), a real client, tcpdump at the client.

* a planned move A→B→A of a running download (API, then CLI): the agents move
  the live socket, the gateway only rewrites the address;
* the primary's silent death: the backup re-creates the connection from the
  gateway's wire checkpoint and the application's reported offsets.

Both check the client's sha256, the transparency invariants (no RST, no hole,
no byte changed, TSval never behind) and that no server segment jumps ahead
of the stream.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.lab import topology as lab
from appliance.pcap import packets

from .helpers import Capture, api, expected_sha, wait_for
from .invariants import assert_clean, check

pytestmark = pytest.mark.lab

ROOT = Path(__file__).resolve().parents[2]
CLIENT_PY = ROOT / "examples" / "resumable_fileserver" / "client.py"
FILE = "10M.bin"


def start_client(name: str, rate: int) -> subprocess.Popen:
    """The example client in lab-client, through the VIP; prints "<sha256>  <bytes>"."""
    return subprocess.Popen(["ip", "netns", "exec", "lab-client", sys.executable, str(CLIENT_PY),
                             f"{lab.VIP}:{lab.RESUME_PORT}", name, "--rate", str(rate), "--timeout", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def the_connection(min_bytes: int) -> dict:
    def ready() -> dict | None:
        conns = [c for c in api("/api/v1/connections?service=resumable") if c["state"] == "ESTABLISHED"]
        return conns[0] if len(conns) == 1 and conns[0]["bytes_from_server"] >= min_bytes else None

    return wait_for(ready, timeout=30, what=f"a resumable download past {min_bytes} bytes")


def progressed(cid: int, beyond: int, timeout: float = 20) -> dict:
    return wait_for(lambda: (c := api(f"/api/v1/connections/{cid}"))["bytes_from_server"] > beyond and c,
                    timeout=timeout, what=f"connection {cid} past {beyond} bytes")


def finish(proc: subprocess.Popen) -> list[str]:
    out, err = proc.communicate(timeout=90)
    assert proc.returncode == 0, f"client failed: {out} {err}"
    return out.split()


def server_events(host: str) -> list[dict]:
    out = []
    for line in lab.fileserver_log(host).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass   # a traceback or warning line
    return out


def sequence_jumps(pcap: Path, port: int, total: int) -> tuple[list[str], int]:
    """Server segments to the client outside the stream: a sequence number
    that does not map to an offset in 0..total (the stream's length), i.e. a
    sender that resumed in another place of the sequence space.  Also counts
    the *gaps* (a segment beginning past everything received so far: segments
    lost on the way, e.g. the origin's in-flight ones dropped by the hold,
    later retransmitted by the destination; the holes check makes sure they
    were all filled)."""
    isn: int | None = None
    high = 0
    jumps, gaps = [], 0
    for _, p in packets(pcap):
        if len(p) < 40 or p[9] != 6:
            continue
        ihl = (p[0] & 15) * 4
        sport = struct.unpack_from("!H", p, ihl)[0]
        if sport != port:
            continue
        ip_len = struct.unpack_from("!H", p, 2)[0]
        seq = struct.unpack_from("!I", p, ihl + 4)[0]
        thl = (p[ihl + 12] >> 4) * 4
        flags = p[ihl + 13]
        n = ip_len - ihl - thl
        if flags & 0x02:
            isn = seq
            continue
        if isn is None:
            continue
        off = (seq - isn - 1) & 0xFFFFFFFF
        if off >= 1 << 31:
            jumps.append(f"seq {seq}: offset {off - (1 << 32)} is before the stream")
            continue
        if off + n > total + (0 if n else 1):   # (a pure ACK after the FIN is at total + 1)
            jumps.append(f"seq {seq}: bytes {off}..{off + n} beyond the stream's {total}")
        if off > high:
            gaps += 1
        high = max(high, off + n)
    return jumps, gaps


def test_planned_migration_there_and_back(fresh: dict, tmp_path: Path) -> None:
    marks = {h: len(server_events(h)) for h in ("primary", "backup")}
    with Capture("lab-client", tmp_path / "client.pcap", bpf=f"tcp port {lab.RESUME_PORT}", snaplen=65535) as cap:
        cl = start_client(FILE, 2_000_000)
        conn = the_connection(1 << 20)
        cid = conn["id"]
        assert conn["backend"] == "primary"
        # A -> B through the API
        ev = api(f"/api/v1/connections/{cid}/migrate", "POST", {"to": "backup", "mode": "resume"})
        assert ev["kind"] == "migration" and ev["details"]["mode"] == "resume" and ev["backend"] == "backup"
        assert ev["details"]["origin"] == "finished"
        c = progressed(cid, conn["bytes_from_server"] + (1 << 20))
        assert c["backend"] == "backup"
        # B -> A with the CLI
        r = subprocess.run([str(ROOT / ".venv" / "bin" / "appliance"), "migrate", str(cid), "--to", "primary",
                            "--mode", "resume"], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        assert "backup -> primary (resumed" in r.stdout
        progressed(cid, c["bytes_from_server"] + (1 << 20))
        digest, size = finish(cl)
    assert digest == expected_sha(FILE) and int(size) == 10 << 20
    reports = check(cap.path, "192.0.2.10", lab.VIP, lab.RESUME_PORT)
    assert_clean(reports, expect_connections=1)          # no RST, no hole left, no byte changed, TSval
    jumps, gaps = sequence_jumps(cap.path, lab.RESUME_PORT, len(f"OK {10 << 20}\n") + (10 << 20))
    assert jumps == [], (jumps, gaps)
    final = api(f"/api/v1/connections/{cid}")
    assert final["moves"] == 2 and final["backend"] == "primary"
    moves = api("/api/v1/events?kind=migration&service=resumable")
    assert [(m["details"]["from"], m["backend"], m["details"]["outcome"]) for m in moves] == [
        ("primary", "backup", "resumed"), ("backup", "primary", "resumed")]
    for m in moves:
        t = m["details"]["timings_ms"]
        assert 0 < t["hold_to_release"] < 2000, t
    # the application's side: taken away, resumed there from the offsets, and back
    prim, back = server_events("primary")[marks["primary"]:], server_events("backup")[marks["backup"]:]
    assert [e["event"] for e in prim if e["event"] in ("started", "moved-away", "resumed", "done")] == [
        "started", "moved-away", "resumed", "done"]
    assert [e["event"] for e in back if e["event"] in ("resumed", "moved-away")] == ["resumed", "moved-away"]
    resumed = [e for e in back if e["event"] == "resumed"][0]
    assert resumed["state"] is True and resumed["in_offset"] == len(f"GET {FILE}\n")
    assert 0 < resumed["position"] < 10 << 20


def test_primary_dies_download_resumes_from_the_wire_checkpoint(fresh: dict, tmp_path: Path) -> None:
    mark = len(server_events("backup"))
    with Capture("lab-client", tmp_path / "client.pcap", bpf=f"tcp port {lab.RESUME_PORT}", snaplen=65535) as cap:
        cl = start_client(FILE, 2_000_000)
        conn = the_connection(3 << 20)
        lab.cut_link("primary")          # silent death: nothing more leaves the primary
        digest, size = finish(cl)
    assert digest == expected_sha(FILE) and int(size) == 10 << 20
    reports = check(cap.path, "192.0.2.10", lab.VIP, lab.RESUME_PORT)
    assert_clean(reports, expect_connections=1)
    jumps, gaps = sequence_jumps(cap.path, lab.RESUME_PORT, len(f"OK {10 << 20}\n") + (10 << 20))
    assert jumps == [], (jumps, gaps)
    (fo,) = api("/api/v1/events?kind=failover&service=resumable")
    assert fo["details"]["source"] == "wire" and fo["backend"] == "backup" and "health" in fo["reason"]
    (mv,) = api("/api/v1/events?kind=migration&service=resumable")
    d = mv["details"]
    assert mv["connection"] == conn["id"] and d["outcome"] == "resumed" and d["source"] == "wire"
    # the application had reported its consumed input (the request) through its agent
    assert d["consumed_from"] == "reported" and d["consumed"] == len(f"GET {FILE}\n")
    assert not api("/api/v1/events?kind=reset&service=resumable")
    resumed = [e for e in server_events("backup")[mark:] if e["event"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["state"] is True and resumed[0]["position"] > 2 << 20
    assert api(f"/api/v1/connections/{conn['id']}")["backend"] == "backup"
