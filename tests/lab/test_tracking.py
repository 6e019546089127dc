"""The gateway tracks a real download exactly as the client's capture shows it,
and traffic survives the appliance's death (fail-open)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from scapy.all import IP, TCP, PcapReader

from appliance.lab import topology as lab

from .helpers import Capture, api, captured, expected_sha, sha256_file, start_download, wait_for

pytestmark = pytest.mark.lab


def wire_facts(pcap: Path, client_port: int) -> dict:
    """What the client's capture says about the connection from ``client_port``."""
    f: dict = {"client_tsval": None, "server_tsval": None}
    seq_end = {"c": None, "s": None}
    acks = {"c": None, "s": None}

    def later(a, b):  # modulo 2**32
        return b is None or ((a - b) & 0xFFFFFFFF) < (1 << 31)

    with PcapReader(str(pcap)) as rd:
        for p in rd:
            if IP not in p or TCP not in p:
                continue
            ip, tcp = p[IP], p[TCP]
            if client_port not in (tcp.sport, tcp.dport):
                continue
            side = "c" if tcp.sport == client_port else "s"
            opts = dict((k, v) for k, v in tcp.options if isinstance(k, str))
            if tcp.flags.S:
                f[f"{'client' if side == 'c' else 'server'}_isn"] = tcp.seq
                f[f"{'client' if side == 'c' else 'server'}_mss"] = opts.get("MSS")
                f[f"{'client' if side == 'c' else 'server'}_wscale"] = opts.get("WScale")
                f[f"sack_{side}"] = "SAckOK" in opts
            plen = ip.len - ip.ihl * 4 - tcp.dataofs * 4
            end = (tcp.seq + plen + (1 if tcp.flags.S else 0) + (1 if tcp.flags.F else 0)) & 0xFFFFFFFF
            if later(end, seq_end[side]):
                seq_end[side] = end
            if tcp.flags.A and later(tcp.ack, acks[side]):
                acks[side] = tcp.ack
            if "Timestamp" in opts:
                key = "client_tsval" if side == "c" else "server_tsval"
                if later(opts["Timestamp"][0], f[key]):
                    f[key] = opts["Timestamp"][0]
    f["client_next_seq"], f["server_next_seq"] = seq_end["c"], seq_end["s"]
    f["client_ack"], f["server_ack"] = acks["c"], acks["s"]
    f["sack_permitted"] = bool(f.pop("sack_c", False) and f.pop("sack_s", False))
    return f


def test_record_matches_client_capture(appliance_running: dict, tmp_path: Path) -> None:
    out = tmp_path / "100M.bin"
    pcap = tmp_path / "client.pcap"
    st = api("/api/v1/status")
    fast_before, client_before = st["fastpath"]["fast"], st["dataplane"]["client_packets"]
    with Capture("lab-client", pcap):
        # rate-limited so that tcpdump keeps up (its drops would fail the test)
        rc, port = start_download("100M.bin", out, rate="40M").wait()
        assert rc == 0
        # the closing handshake's last ACKs through the gateway (TIME_WAIT: both FINs acknowledged) ...
        rec = wait_for(lambda: next((c for c in api("/api/v1/connections") if c["client"] == f"192.0.2.10:{port}"
                                     and c["state"] == "TIME_WAIT"), None), what="TIME_WAIT")
        # ... and in the capture: the ACKs of both FINs, whichever side closed first
        wait_for(lambda: captured(pcap, lambda f: f[2] == port and f[6] & 0x10 and f[5] == rec["server_next_seq"],
                                  lambda f: f[3] == port and f[6] & 0x10 and f[5] == rec["client_next_seq"]),
                 timeout=20, interval=0.5, what="both FINs' ACKs in the capture")
    assert sha256_file(out) == expected_sha("100M.bin")

    rec = next(c for c in api("/api/v1/connections") if c["client"] == f"192.0.2.10:{port}")
    clock = {"idle_seconds": rec["idle_seconds"], "checkpoint_age": rec["checkpoint_age"]}  # move with time
    assert rec == api(f"/api/v1/connections/{rec['id']}") | clock
    assert rec["service"] == f"{lab.VIP}:{lab.SERVICE_PORT}"
    assert rec["backend"] == "primary"
    assert rec["mid_stream"] is False
    wire = wire_facts(pcap, port)
    for field in ("client_isn", "server_isn", "client_next_seq", "server_next_seq", "client_ack", "server_ack",
                  "client_mss", "server_mss", "client_wscale", "server_wscale", "sack_permitted",
                  "client_tsval", "server_tsval"):
        assert rec[field] == wire[field], f"{field}: API {rec[field]} != capture {wire[field]}"
    # the server's stream: HTTP header + 100 MiB body, its FIN one past the last byte
    assert rec["bytes_from_server"] > 100 << 20
    assert rec["server_next_seq"] == (rec["server_isn"] + 1 + rec["bytes_from_server"] + 1) & 0xFFFFFFFF
    assert rec["server_tick_rate"] == pytest.approx(1000, rel=0.05)  # Linux: 1 ms ticks
    # nearly all the client's packets (its ACKs: all but the handshake, the request and the
    # close) were folded in by the compiled fast path, and the record still matches the wire
    # field by field (the native engine's default)
    st = api("/api/v1/status")
    fast, client = st["fastpath"]["fast"] - fast_before, st["dataplane"]["client_packets"] - client_before
    assert fast >= client - 10 and fast > 100, f"{fast} of {client} client packets on the fast path"


def test_sigkill_leaves_download_running(appliance_running: dict, tmp_path: Path) -> None:
    out = tmp_path / "100M.bin"
    dl = start_download("100M.bin", out, rate="15M")  # about 7 s
    wait_for(lambda: out.exists() and out.stat().st_size > 10 << 20, timeout=30, what="download under way")
    pid = lab.pid_alive(lab.run_dir() / "appliance.pid")
    assert pid
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not lab.pid_alive(lab.run_dir() / "appliance.pid"), what="appliance gone")
    size_at_kill = out.stat().st_size
    rc, _ = dl.wait()
    assert rc == 0
    assert out.stat().st_size > size_at_kill  # bytes kept coming after the death
    assert sha256_file(out) == expected_sha("100M.bin")


def test_api_requires_token(appliance_running: dict) -> None:
    import urllib.error

    with pytest.raises(urllib.error.HTTPError) as e:
        api("/api/v1/status", token="wrong-token-value")
    assert e.value.code == 401
    assert all(q["handler_errors"] == 0 for q in api("/api/v1/status")["queues"].values())
    svc = api("/api/v1/services")
    assert [b["name"] for b in svc[0]["backends"]] == ["primary", "backup"]
    assert svc[0]["active_backend"] == "primary"


@pytest.mark.parametrize("family", [[], ["--ipv6"]], ids=["ipv4", "ipv6"])
def test_demo_runs_end_to_end(appliance_running: dict, family: list[str]) -> None:
    import subprocess
    import sys

    # 10 MiB at 1 MB/s, cut one second in: the download is under way at the cut, however fast
    # its first second went
    res = subprocess.run([sys.executable, "-m", "appliance", "lab", "demo", "--file", "10M.bin", "--rate", "1M",
                          "--fail-after", "1", *family], capture_output=True, text=True, timeout=120)
    assert "cutting the primary's link" in res.stdout, res.stdout
    assert res.returncode == 0, res.stderr
    assert "failover" in res.stdout and "migration moved" in res.stdout
    assert "sha256 matches" in res.stdout
    assert '"client_isn"' in res.stdout  # it printed the tracked record
    if family:
        assert f"http://[{lab.VIP6}]:80/10M.bin" in res.stdout and f'"client": "[{lab.CLIENT6}]:' in res.stdout
    lab.down_appliance_state()  # the demo left the backup active: later tests want a fresh appliance
