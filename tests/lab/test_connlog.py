"""The connection log over the real lab: one JSON line per connection of a client capture, with
the bytes each way the capture shows, the right termination states, and the move of the one
connection a failover moved."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from appliance.lab import topology as lab
from appliance.pcap import packets

from .helpers import Capture, api, expected_sha, sha256_file, start_download, wait_for

pytestmark = pytest.mark.lab

CLIENT = "192.0.2.10"


def connlog_config(log: Path) -> Path:
    """The lab's configuration, logging JSON lines to ``log``."""
    cfg = lab.run_dir() / "gateway-connlog.toml"
    text = (lab.run_dir() / "gateway.toml").read_text()
    cfg.write_text(text + f'\n[log]\nconnections = "file"\nformat = "json"\npath = {json.dumps(str(log))}\n')
    return cfg


def stream_lengths(pcap: Path) -> dict[int, tuple[int, int]]:
    """Per client port: (client payload stream length, server payload stream length), from the
    sequence numbers on the wire (the highest payload end above the ISN + 1)."""
    isn: dict[tuple[int, bool], int] = {}
    high: dict[tuple[int, bool], int] = {}
    cip = bytes(map(int, CLIENT.split(".")))
    for _, p in packets(pcap):
        if len(p) < 40 or p[9] != 6:
            continue
        ihl = (p[0] & 15) * 4
        total = struct.unpack_from("!H", p, 2)[0]
        sport, dport, seq = struct.unpack_from("!HHI", p, ihl)
        thl = (p[ihl + 12] >> 4) * 4
        flags = p[ihl + 13]
        from_client = p[12:16] == cip
        key = (sport if from_client else dport, from_client)
        if flags & 0x02:
            isn[key] = seq
            continue
        n = total - ihl - thl
        if n <= 0 or key not in isn:
            continue
        end = (seq + n - isn[key] - 1) & 0xFFFFFFFF
        high[key] = max(high.get(key, 0), end)
    ports = {k[0] for k in isn if k[1]}
    return {port: (high.get((port, True), 0), high.get((port, False), 0)) for port in ports}


def open_web() -> list[dict]:
    return api("/api/v1/connections?service=web&closed=false&open_only=true")


def established() -> set[int]:
    return {c["id"] for c in open_web() if c["state"] == "ESTABLISHED"}


def test_one_line_per_connection_with_bytes_termination_and_move(fresh: dict, tmp_path: Path) -> None:
    log = lab.run_dir() / "connlog-test.jsonl"
    log.unlink(missing_ok=True)
    lab.stop_appliance()
    lab.start_appliance(connlog_config(log))
    with Capture("lab-client", tmp_path / "client.pcap", snaplen=128) as cap:
        for i in range(3):  # short downloads, each closed by curl
            out = tmp_path / f"small{i}.bin"
            rc, _ = start_download("1M.bin", out).wait(timeout=60)
            assert rc == 0 and sha256_file(out) == expected_sha("1M.bin")
        moved_out, reset_out = tmp_path / "moved.bin", tmp_path / "reset.bin"
        moved = start_download("100M.bin", moved_out, rate="25M")
        # (the small downloads may still be closing: their server's FIN is held until a probe)
        first = wait_for(established, timeout=15, what="the first download tracked")
        victim = start_download("100M.bin", reset_out, rate="2M")
        (reset_id,) = wait_for(lambda: len(new := established() - first) == 1 and new, timeout=15,
                               what="the second download tracked")
        wait_for(lambda: reset_out.exists() and reset_out.stat().st_size > 64 << 10, timeout=15,
                 what="the second download receiving")
        api(f"/api/v1/connections/{reset_id}", "DELETE")
        rc_reset, reset_port = victim.wait(timeout=30)
        assert rc_reset != 0  # curl saw the reset
        wait_for(lambda: moved_out.exists() and moved_out.stat().st_size > 10 << 20, timeout=20,
                 what="10 MiB of the first download")
        lab.cut_link("primary")
        rc, moved_port = moved.wait(timeout=60)
        assert rc == 0 and sha256_file(moved_out) == expected_sha("100M.bin")
        wait_for(lambda: not open_web(), timeout=20, what="every connection over")
    lengths = stream_lengths(cap.path)
    assert len(lengths) == 5, lengths

    def lines() -> list[dict]:
        return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []

    wait_for(lambda: sum(r["type"] == "connection" for r in lines()) >= 5, timeout=10, what="five connection lines")
    rows = lines()
    conns = [r for r in rows if r["type"] == "connection" and r["service"] == "web"]
    by_port: dict[int, list[dict]] = {}
    for r in conns:
        by_port.setdefault(int(r["client"].rsplit(":", 1)[1]), []).append(r)
    assert sorted(by_port) == sorted(lengths), (by_port.keys(), lengths.keys())
    for port, (up, down) in lengths.items():
        (r,) = by_port[port]  # exactly one line per connection
        assert (r["bytes_from_client"], r["bytes_from_server"]) == (up, down), (port, r)
        assert r["duration_s"] >= 0 and r["start"] and r["why"] in ("closed", "reset")
    reset_line = by_port[reset_port][0]
    assert reset_line["termination_state"] == "GR" and reset_line["backends"] == ["primary"]
    assert not reset_line["moved"]
    moved_line = by_port[moved_port][0]
    assert moved_line["termination_state"] == "CF", moved_line
    assert moved_line["moved"] and moved_line["backends"] == ["primary", "backup"]
    (mv,) = moved_line["moves"]
    assert mv["strategy"] == "replay" and mv["to"] == "backup" and mv["timings_ms"], mv
    for port in set(lengths) - {reset_port, moved_port}:
        r = by_port[port][0]
        assert r["termination_state"] == "CF" and r["backends"] == ["primary"] and not r["moved"], r
    # a line for the failover and one for the move
    assert any(r["type"] == "failover" and r["from"] == "primary" and r["to"] == "backup" for r in rows)
    assert any(r["type"] == "move" and r["to"] == "backup" and r["timings_ms"] for r in rows)
