"""A spoofed-SYN flood larger than the connection table does not lock out new
clients: the table drops its oldest half-open records to admit new SYNs
(``table.early_drops``), never an established connection, stays bounded, and
the appliance's memory does not grow with the flood.

The flood comes from inside lab-client with forged sources in the client
subnet (192.0.2.0/24, never a real client's or the gateway's address).  The
backend's SYN-ACKs to those sources are routed back to the client bridge,
where nobody answers them: that is what a flood looks like to a gateway."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.lab import topology as lab
from appliance.lab.crowd import vm_rss

from .helpers import Capture, api, expected_sha, sha256_file, start_download, wait_for
from .invariants import assert_clean, check

pytestmark = pytest.mark.lab

MAX_CONNECTIONS = 200
FLOOD = 3 * MAX_CONNECTIONS   # spoofed SYNs, more than the table holds
FLOOD_RATE = 2000             # packets a second at most
FLOOD_DEADLINE = 15.0         # seconds: the sender stops then whatever is left
RSS_GROWTH_LIMIT = 50 << 20   # bytes of resident memory the flood may cost, generously

# A raw-socket SYN sender (scapy costs 100-300 us a packet; this is plain struct
# packing).  argv: vip port count rate deadline seed source-address...
SENDER = r"""
import random, socket, struct, sys, time
vip, port, count, rate, deadline, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
sources = sys.argv[7:]
rnd = random.Random(seed)

def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF

s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
s.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
dst = socket.inet_aton(vip)
start = time.monotonic()
sent = 0
for i in range(count):
    now = time.monotonic()
    if now - start > deadline:
        break
    due = start + i / rate
    if due > now:
        time.sleep(due - now)
    src = socket.inet_aton(rnd.choice(sources))
    sport = rnd.randrange(1024, 65536)
    # SYN with MSS 1460, like a real client's first segment
    tcp = struct.pack("!HHIIBBHHH", sport, port, rnd.getrandbits(32), 0, 6 << 4, 0x02, 64240, 0, 0) + b"\x02\x04\x05\xb4"
    tcp = tcp[:16] + struct.pack("!H", csum(src + dst + struct.pack("!BBH", 0, 6, len(tcp)) + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), rnd.getrandbits(16), 0, 64, 6, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
    s.sendto(ip + tcp, (vip, 0))
    sent += 1
print(sent)
"""


def spoofable_sources() -> list[str]:
    """Addresses of the client subnet that no lab host (nor the gateway) has."""
    taken = {h["address"] for h in json.loads((lab.run_dir() / "topology.json").read_text())}
    taken.add(f"{lab.CLIENT_NET}.1")
    return [a for a in (f"{lab.CLIENT_NET}.{i}" for i in range(2, 255)) if a not in taken]


def curl_connect(name: str, out: Path) -> subprocess.Popen[str]:
    """curl a file through the VIP, reporting its local port and the time its
    TCP connect took: a dropped SYN costs a 1 s retransmission."""
    return subprocess.Popen(
        ["ip", "netns", "exec", "lab-client", "curl", "-sS", "--fail", "-o", str(out),
         "-w", "%{local_port} %{time_connect}", "--max-time", "120",
         f"http://{lab.VIP}:{lab.SERVICE_PORT}/{name}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_syn_flood_larger_than_the_table_does_not_lock_out_new_clients(fresh: dict, tmp_path: Path) -> None:
    lab.stop_appliance()
    pid = lab.start_appliance(lab.variant_config("synflood", gateway={"max_connections": MAX_CONNECTIONS}))
    assert api("/api/v1/status")["table"]["max_connections"] == MAX_CONNECTIONS
    procs: list[subprocess.Popen[str]] = []
    try:
        with Capture("lab-client", tmp_path / "client.pcap", snaplen=65535,
                     bpf=f"tcp port {lab.SERVICE_PORT} and host 192.0.2.10") as cap:
            # 1. a download under way (about 10 s), established in the table
            first = tmp_path / "100M.bin"
            dl = start_download("100M.bin", first, rate="10M")
            procs.append(dl.proc)
            wait_for(lambda: first.exists() and first.stat().st_size > 1 << 20, timeout=30,
                     what="the first download under way")
            wait_for(lambda: any(c["state"] == "ESTABLISHED" for c in api("/api/v1/connections?service=web")),
                     what="the first download established in the table")
            rss_before = vm_rss(pid)
            before = api("/api/v1/status")

            # 2. the flood: 3 x max_connections spoofed SYNs, bounded in count and time
            flood = subprocess.run(
                ["ip", "netns", "exec", "lab-client", sys.executable, "-c", SENDER, lab.VIP,
                 str(lab.SERVICE_PORT), str(FLOOD), str(FLOOD_RATE), str(FLOOD_DEADLINE),
                 str(random.randrange(1 << 30)), *spoofable_sources()],
                capture_output=True, text=True, timeout=FLOOD_DEADLINE + 15)
            assert flood.returncode == 0, flood.stderr
            assert int(flood.stdout) == FLOOD, "the flood was cut short by its deadline"
            # every spoofed SYN was admitted: the table filled up and early drops made room
            wait_for(lambda: api("/api/v1/status")["table"]["created"] - before["table"]["created"] >= FLOOD,
                     timeout=15, what="every spoofed SYN admitted")
            assert dl.proc.poll() is None, "the first download ended before the flood did: no overlap"

            # 3. a new client connects at once (its first SYN admitted) and downloads
            second = tmp_path / "10M.bin"
            p2 = curl_connect("10M.bin", second)
            procs.append(p2)
            out2, err2 = p2.communicate(timeout=150)
            assert p2.returncode == 0, err2
            port2, connect_time = out2.split()
            assert float(connect_time) < 1.0, f"the new client's SYN was dropped (connect took {connect_time} s)"
            assert sha256_file(second) == expected_sha("10M.bin")

            rc, port1 = dl.wait(timeout=150)
            assert rc == 0
            assert sha256_file(first) == expected_sha("100M.bin")

        # both real connections were transparent end to end
        reports = check(cap.path, "192.0.2.10", lab.VIP, lab.SERVICE_PORT)
        assert_clean(reports, expect_connections=2)
        assert set(reports) == {port1, int(port2)}

        # 4. the table stayed bounded, made room by early drops, refused nobody
        st = api("/api/v1/status")
        print("status after the flood:", json.dumps({"connections": st["connections"], "table": st["table"],
                                                     "dataplane": st["dataplane"]}))
        assert st["connections"] <= MAX_CONNECTIONS
        assert st["table"]["early_drops"] > 0  # the lead exposes ConnectionTable.early_drops here
        assert st["table"]["refused_full"] == before["table"]["refused_full"]
        assert st["dataplane"]["table_full_drops"] == before["dataplane"]["table_full_drops"]

        # 5. the flood did not cost memory beyond a generous bound
        rss_after = vm_rss(pid)
        assert rss_after - rss_before < RSS_GROWTH_LIMIT, f"RSS grew {(rss_after - rss_before) >> 20} MiB"
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
