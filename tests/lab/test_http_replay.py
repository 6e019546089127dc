"""HTTP-aware replay (``replay = "http"``, the lab's ``web-http`` service): a move replays from
the last finished exchange, range-resumes the response in flight or regenerates it, and the
client — real curl, or a scripted keep-alive client — sees nothing but a pause.  Every test
checks I1–I6 on a client capture."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest

from appliance.lab import topology as lab

from .helpers import Capture, api, expected_sha, sha256_file, wait_for
from .invariants import assert_clean, check

pytestmark = pytest.mark.lab

PORT = lab.HTTP_REPLAY_PORT
SERVICE = "web-http"


def events(kind: str) -> list[dict]:
    return api(f"/api/v1/events?kind={kind}&service={SERVICE}&limit=5000")


def moves(n: int) -> list[dict]:
    """The splices' own reports (a manual migration's request is an event of its own)."""
    def done() -> list[dict]:
        return [e for e in events("migration") if "strategy" in e["details"]]
    return wait_for(lambda: len(done()) >= n and done(), timeout=60, what=f"{n} move(s) of {SERVICE}")


def capture(tmp_path: Path) -> Capture:
    return Capture("lab-client", tmp_path / "client.pcap", bpf=f"tcp port {PORT}", snaplen=65535)


def curl(*urls_and_outs: tuple[str, Path], rate: str | None = None, extra: list[str] | None = None) -> subprocess.Popen:
    cmd = ["ip", "netns", "exec", "lab-client", "curl", "-sS", "--fail", "--max-time", "200"]
    if rate:
        cmd += ["--limit-rate", rate]
    for name, out in urls_and_outs:
        cmd += ["-o", str(out), f"http://{lab.VIP}:{PORT}/{name}"]
    return subprocess.Popen(cmd + (extra or []), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def metric(name: str, **labels: str) -> float:
    import urllib.request
    tok = (lab.run_dir() / "token").read_text().strip()
    req = urllib.request.Request(f"http://{lab.API_HOST}:{lab.API_PORT}/metrics",
                                 headers={"Authorization": f"Bearer {tok}"})
    text = urllib.request.urlopen(req, timeout=10).read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            lab_part = line[len(name):].split(" ")[0].strip("{}")
            if ",".join(sorted(lab_part.split(","))) == want or (not want and not lab_part):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


def download_through_a_death(tmp_path: Path, cut_after: int) -> Capture:
    """100M.bin at 20 MB/s, the primary's link cut once ``cut_after`` bytes arrived: the
    download completes with the right bytes.  Returns the client capture."""
    out = tmp_path / "100M.bin"
    with capture(tmp_path) as cap:
        dl = curl(("100M.bin", out), rate="20M")
        wait_for(lambda: out.exists() and out.stat().st_size > cut_after, timeout=60,
                 what=f"{cut_after >> 20} MiB received")
        lab.cut_link("primary")
        _, err = dl.communicate(timeout=120)
        assert dl.returncode == 0, err
    assert sha256_file(out) == expected_sha("100M.bin")
    return cap


def test_long_download_is_range_resumed(fresh: dict, tmp_path: Path) -> None:
    cap = download_through_a_death(tmp_path, 40 << 20)
    (mv,) = moves(1)
    d = mv["details"]
    assert d["strategy"] == "range", d
    # the backup re-sent the verified overlap (64..128 KiB), its 206's head and what was in flight
    assert d["range_head_bytes"] > 0
    assert d["regenerated_bytes"] < 4 << 20, d
    assert d["suppressed_bytes"] < 4 << 20, d
    assert_clean(check(cap.path, "192.0.2.10", lab.VIP, PORT), expect_connections=1)
    assert metric("gateway_moves_total", service=SERVICE, strategy="range") == 1


def test_keepalive_connection_holds_only_what_follows_its_last_exchange(fresh: dict, tmp_path: Path) -> None:
    names = ["1M.bin", "10M.bin", "1M.bin", "100M.bin"]
    outs = [tmp_path / f"k{i}-{n}" for i, n in enumerate(names)]
    with capture(tmp_path) as cap:
        proc = curl(*zip(names, outs), rate="20M")
        wait_for(lambda: outs[3].exists() and outs[3].stat().st_size > 20 << 20, timeout=60,
                 what="the fourth response under way")
        (conn,) = [c for c in api(f"/api/v1/connections?service={SERVICE}") if c["state"] == "ESTABLISHED"]
        assert conn["http"]["requests"] == 4
        # three exchanges finished: the log holds the fourth request only
        assert 0 < conn["log_held"] < 200 and conn["log_bytes"] > 3 * conn["log_held"], conn
        lab.cut_link("primary")
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    for n, o in zip(names, outs):
        assert sha256_file(o) == expected_sha(n), n
    (mv,) = moves(1)
    assert mv["details"]["strategy"] == "range"
    assert mv["details"]["replay_from"]["server"] > 12 << 20  # not from the connection's first byte
    assert_clean(check(cap.path, "192.0.2.10", lab.VIP, PORT), expect_connections=1)


class KeepAliveClient:
    """A scripted HTTP/1.1 client in lab-client: one connection, requests sent when told."""

    SCRIPT = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
for line in sys.stdin:
    method, path = line.split()
    s.sendall(f"{method} /{path} HTTP/1.1\r\nHost: lab\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        c = s.recv(1)
        if not c:
            print("EOF", flush=True); sys.exit(1)
        head += c
    status = int(head.split()[1])
    length = 0
    for h in head.split(b"\r\n"):
        if h.lower().startswith(b"content-length:"):
            length = int(h.split(b":")[1])
    body = b""
    if method != "HEAD":
        while len(body) < length:
            c = s.recv(65536)
            if not c:
                print("EOF", flush=True); sys.exit(1)
            body += c
    import hashlib
    print(status, len(body), hashlib.sha256(body).hexdigest(), flush=True)
"""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", "lab-client", "python3", "-c", self.SCRIPT, lab.VIP, str(PORT)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def get(self, path: str, method: str = "GET") -> tuple[int, int, str]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{method} {path}\n")
        self.proc.stdin.flush()
        import select
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        assert ready, f"no answer to {method} /{path} in 60 s"
        status, n, digest = self.proc.stdout.readline().split()
        return int(status), int(n), digest

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def test_idle_keepalive_connection_moves_at_its_quiescent_point(fresh: dict, tmp_path: Path) -> None:
    with capture(tmp_path) as cap:
        c = KeepAliveClient()
        try:
            for _ in range(3):
                assert c.get("1M.bin") == (200, 1 << 20, expected_sha("1M.bin"))
            assert c.get("1M.bin", "HEAD")[0] == 200
            (conn,) = wait_for(lambda: [x for x in api(f"/api/v1/connections?service={SERVICE}")
                                        if x["state"] == "ESTABLISHED" and x["log_held"] == 0] or None,
                               what="a quiescent connection with an empty log")
            r = subprocess.run([".venv/bin/appliance", "failover", SERVICE, "--to", "backup"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parents[2])
            assert r.returncode == 0, r.stderr
            (mv,) = moves(1)
            assert mv["details"]["strategy"] == "quiescent" and mv["details"]["regenerated_bytes"] == 0
            lab.cut_link("primary")  # only the backup can answer now
            assert c.get("10M.bin") == (200, 10 << 20, expected_sha("10M.bin"))
        finally:
            c.close()
    assert api(f"/api/v1/connections/{conn['id']}")["backend"] == "backup"
    assert_clean(check(cap.path, "192.0.2.10", lab.VIP, PORT), expect_connections=1)


def test_backup_that_ignores_range_regenerates_the_response_verified(fresh: dict, tmp_path: Path) -> None:
    lab.serve_without_ranges("backup")  # says Accept-Ranges, answers every Range with a full 200
    cap = download_through_a_death(tmp_path, 10 << 20)
    (mv,) = moves(1)
    d = mv["details"]
    assert d["strategy"] == "full" and "200" in d["strategy_reason"], d
    assert d["regenerated_bytes"] > 10 << 20  # the whole response again, verified before the client got more
    assert not events("divergence")
    assert_clean(check(cap.path, "192.0.2.10", lab.VIP, PORT), expect_connections=1)


def test_backup_whose_file_changed_resets_never_corrupts(fresh: dict, tmp_path: Path) -> None:
    lab.serve_divergent("backup", changed=True)  # other bytes, another ETag: If-Range fails
    out = tmp_path / "100M.bin"
    with capture(tmp_path) as cap:
        dl = curl(("100M.bin", out), rate="20M")
        wait_for(lambda: out.exists() and out.stat().st_size > 10 << 20, timeout=60, what="10 MiB received")
        lab.cut_link("primary")
        dl.communicate(timeout=60)
    assert dl.returncode != 0  # the client sees a reset ...
    good = (lab.cache_dir() / "www" / "100M.bin").read_bytes()
    got = out.read_bytes()
    assert got == good[:len(got)]  # ... and never a wrong byte
    (dv,) = wait_for(lambda: events("divergence"), what="divergence event")
    assert dv["details"]["strategy"] == "full", dv  # the 200 to If-Range, checked in full
    reports = check(cap.path, "192.0.2.10", lab.VIP, PORT)
    assert not [v for r in reports.values() for v in r.violations if v.startswith(("I1", "I2", "I3"))]


PIPELINE = r"""
import hashlib, socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
names = sys.argv[3:]
s.sendall(b"".join(f"GET /{n} HTTP/1.1\r\nHost: lab\r\n\r\n".encode() for n in names))
buf = b""
for n in names:
    while b"\r\n\r\n" not in buf:
        c = s.recv(65536)
        if not c:
            sys.exit("EOF in a head")
        buf += c
    head, _, buf = buf.partition(b"\r\n\r\n")
    length = int([h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length:")][0].split(b":")[1])
    while len(buf) < length:
        c = s.recv(65536)
        if not c:
            sys.exit("EOF in a body")
        buf += c
    body, buf = buf[:length], buf[length:]
    print(n, hashlib.sha256(body).hexdigest(), flush=True)
"""


def test_pipelined_requests_across_a_failover(fresh: dict, tmp_path: Path) -> None:
    names = ["10M.bin", "1M.bin", "10M.bin"]
    with capture(tmp_path) as cap:
        # slow reads keep the first response in flight while the other requests wait behind it
        proc = subprocess.Popen(["ip", "netns", "exec", "lab-client", "python3", "-c", PIPELINE, lab.VIP, str(PORT),
                                 *names], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(lambda: any(c["state"] == "ESTABLISHED" and c["http"]["requests"] == 3
                             for c in api(f"/api/v1/connections?service={SERVICE}")),
                 timeout=30, what="three pipelined requests seen")
        lab.cut_link("primary")
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, (err, api("/api/v1/events?limit=20"))
    assert out.split() == [x for n in names for x in (n, expected_sha(n))]
    if events("migration"):
        assert events("migration")[0]["details"]["phase"] in ("SPLICED", "CLOSED")
    assert_clean(check(cap.path, "192.0.2.10", lab.VIP, PORT), expect_connections=1)


def test_malformed_http_from_the_client_falls_back_to_stream_replay(fresh: dict, tmp_path: Path) -> None:
    script = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
s.sendall(b"GET /1M.bin HTTP/1.1\r\nHost: lab\r\n\r\n")
buf = b""
while b"\r\n\r\n" not in buf or len(buf.partition(b"\r\n\r\n")[2]) < (1 << 20):
    buf += s.recv(65536)
s.sendall(b"\x00\x01 this is not HTTP\r\n\r\n")
print(s.recv(100)[:12], flush=True)
"""
    r = subprocess.run(["ip", "netns", "exec", "lab-client", "python3", "-c", script, lab.VIP, str(PORT)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "400" in r.stdout  # nginx said so; the gateway passed everything through
    (ev,) = wait_for(lambda: events("http-fallback"), what="an http-fallback event")
    assert ev["details"]["side"] == "client" and "malformed" in ev["reason"], ev
    st = api("/api/v1/status")
    assert st["dataplane"]["http_fallbacks"] >= 1


def test_the_panel_shows_requests_quiescent_point_and_the_moves_strategy(fresh: dict, browser, tmp_path: Path) -> None:
    token = (lab.run_dir() / "token").read_text().strip()
    panel = f"http://{lab.API_HOST}:{lab.API_PORT}"
    names = ["1M.bin", "100M.bin"]
    outs = [tmp_path / f"p{i}-{n}" for i, n in enumerate(names)]
    with capture(tmp_path) as cap:
        proc = curl(*zip(names, outs), rate="20M")
        wait_for(lambda: outs[1].exists() and outs[1].stat().st_size > 20 << 20, timeout=60, what="second response")
        lab.cut_link("primary")
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert sha256_file(outs[1]) == expected_sha("100M.bin")
    assert_clean(check(cap.path, "192.0.2.10", lab.VIP, PORT), expect_connections=1)
    (mv,) = moves(1)
    cid = mv["connection"]
    # the browser after the capture (it shares the CPU with tcpdump); the connection's page
    # is then its final record, from the history
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    try:
        page.goto(f"{panel}/login")
        page.fill("#token", token)
        page.click("button[type=submit]")
        page.wait_for_url(f"{panel}/")
        page.goto(f"{panel}/connections/{cid}")
        http = page.locator("table#http")
        assert http.locator("td[data-k=requests]").inner_text() == "2"
        point = http.locator("td[data-k=replay_point]").inner_text()
        assert point.startswith("client ") and "server " in point and point != "client 0, server 0"
        assert page.locator("table#moves td.replay").first.inner_text() == "range"
        assert page.locator("table#moves td.regenerated").first.inner_text().strip()
    finally:
        page.close()


def test_keepalive_crowd_through_the_primarys_death(fresh: dict, tmp_path: Path) -> None:
    """wrk, 100 keep-alive connections of small objects, a 2 s request timeout: no request
    fails, none times out, every connection moves (its slowest request and the rate's
    recovery are benchmark figures: docs/BENCHMARKS.md)."""
    from appliance.lab import httpload as hl

    with Capture("lab-client", tmp_path / "crowd.pcap", bpf=f"tcp port {PORT}", snaplen=65535) as cap:
        run = hl.start_crowd(f"http://{lab.VIP}:{PORT}/4K.bin", connections=100, duration=10, ns="lab-client",
                             timeout=2)
        try:
            wait_for(lambda: sum(c["state"] == "ESTABLISHED" and (c["http"] or {}).get("requests", 0) > 10
                                 for c in api(f"/api/v1/connections?service={SERVICE}&limit=1000")) >= 100,
                     timeout=30, interval=0.2, what="100 keep-alive connections busy")
            cut = time.time()
            lab.cut_link("primary")
            res = run.wait(timeout=60)
        finally:
            run.close()
    assert res.wrk_exit == 0, res.wrk_stderr
    assert res.errors == {"connect": 0, "read": 0, "write": 0, "timeout": 0}, res.errors
    assert res.non_2xx == 0 and res.unanswered_over_timeout == 0
    assert sum(1 for r in res.responses if r.t > cut + 1.0) > 100  # the crowd went on after the death
    moved = moves(100)
    assert len(moved) == 100
    assert {m["details"]["strategy"] for m in moved} <= {"quiescent", "full", "range"}
    assert sum(m["details"]["regenerated_bytes"] for m in moved) <= 100 * (4096 + 1024)  # one response at most each
    reports = check(cap.path, "192.0.2.10", lab.VIP, PORT)
    try:
        assert_clean(reports)
    except AssertionError as exc:  # say what the gateway did with those connections
        bad = {p for p, r in reports.items() if r.violations}
        conns = [c for c in api(f"/api/v1/connections?service={SERVICE}&limit=1000")
                 if int(str(c.get("client", "")).rpartition(":")[2] or 0) in bad]
        resets = api("/api/v1/events?kind=reset")
        raise AssertionError(f"{exc}; their records: {conns}; reset events: {resets}") from None
    assert sum(r.server_bytes > 0 for r in reports.values()) == 100  # (wrk may open one more and send nothing)


def test_paced_crowd_through_one_failover(fresh: dict, tmp_path: Path) -> None:
    """200 paced downloads at once, the primary's link cut under them: all complete with the
    right bytes (their pauses are benchmark figures)."""
    import threading

    from appliance.lab import httpload as hl

    n = 200
    result: list[hl.PacedResult] = []
    t = threading.Thread(target=lambda: result.append(hl.paced(
        f"http://{lab.VIP}:{PORT}/1M.bin", count=n, rate="48k", ns="lab-client", timeout=150, idle_timeout=40)))
    with capture(tmp_path) as cap:
        t.start()
        try:
            wait_for(lambda: sum(c["state"] == "ESTABLISHED" and c["bytes_from_server"] > 200_000
                                 for c in api(f"/api/v1/connections?service={SERVICE}&limit=1000")) >= n,
                     timeout=60, interval=0.5, what=f"{n} downloads 200 kB in")
            lab.cut_link("primary")
        finally:
            t.join(timeout=200)
    (res,) = result
    assert res.ok == n and res.failed == 0, res.errors
    want = expected_sha("1M.bin")
    assert all((d.status, d.bytes, d.sha256) == (200, 1 << 20, want) for d in res.downloads)
    moved = moves(n)
    assert {m["details"]["strategy"] for m in moved} == {"range"}, {m["details"]["strategy"] for m in moved}
    assert_clean(check(cap.path, "192.0.2.10", lab.VIP, PORT), expect_connections=n)


def test_ten_thousand_requests_leave_only_the_last_in_the_log(fresh: dict, tmp_path: Path) -> None:
    """A keep-alive connection that served 10,000 requests holds only what follows its last
    quiescent point; the store's trims say so, and it still moves with nothing regenerated."""
    script = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
req = b"GET /4K.bin HTTP/1.1\r\nHost: lab\r\n\r\n"
buf = b""
for i in range(int(sys.argv[3])):
    s.sendall(req)
    while True:
        head, sep, rest = buf.partition(b"\r\n\r\n")
        if sep and len(rest) >= 4096:
            assert head.startswith(b"HTTP/1.1 200"), head
            buf = rest[4096:]
            break
        c = s.recv(65536)
        if not c:
            sys.exit("EOF")
        buf += c
print("done", flush=True)
sys.stdin.readline()
s.sendall(req)
print("again" if s.recv(65536).startswith(b"HTTP/1.1 200") else "bad", flush=True)
"""
    cap = capture(tmp_path)
    proc = subprocess.Popen(["ip", "netns", "exec", "lab-client", "python3", "-c", script, lab.VIP, str(PORT), "10000"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        assert proc.stdout.readline().strip() == "done"
        (conn,) = wait_for(lambda: [c for c in api(f"/api/v1/connections?service={SERVICE}")
                                    if c["state"] == "ESTABLISHED" and c["log_held"] == 0] or None,
                           what="the connection quiescent")
        assert conn["http"]["requests"] == 10000 and conn["http"]["trims"] >= 9999
        assert conn["log_bytes"] == 10000 * len(b"GET /4K.bin HTTP/1.1\r\nHost: lab\r\n\r\n")
        api(f"/api/v1/connections/{conn['id']}/migrate", "POST", {"to": "backup", "mode": "replay"})
        (mv,) = moves(1)
        assert mv["details"]["strategy"] == "quiescent" and mv["details"]["regenerated_bytes"] == 0
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "again"
    finally:
        proc.kill()
        proc.wait()
        cap.stop()
    assert cap.dropped == 0
    st = api("/api/v1/status")
    assert st["dataplane"]["http_trims"] >= 9999
    assert_clean(check(cap.path, "192.0.2.10", lab.VIP, PORT), expect_connections=1)


def test_a_post_in_flight_is_replayed_never_range_resumed(fresh: dict, tmp_path: Path) -> None:
    """An upload (to the lab's upload-hash app, ``upload-http``: replay = "http") whose primary
    dies mid-body: the request is replayed from its first byte (the connection's quiescent
    point), the backup's answer is the sha256 of every byte, received exactly once."""
    body = lab.cache_dir() / "www" / "100M.bin"
    out = tmp_path / "answer.txt"
    port = lab.UPLOAD_HTTP_PORT
    with Capture("lab-client", tmp_path / "client.pcap", bpf=f"tcp port {port}", snaplen=512) as cap:
        up = subprocess.Popen(["ip", "netns", "exec", "lab-client", "curl", "-sS", "--fail", "-H", "Expect:",
                               "--limit-rate", "20M", "--data-binary", f"@{body}", "-o", str(out), "--max-time", "200",
                               f"http://{lab.VIP}:{port}/"], stderr=subprocess.PIPE, text=True)
        wait_for(lambda: any(c["bytes_from_client"] > 30 << 20
                             for c in api("/api/v1/connections?service=upload-http")),
                 timeout=60, interval=0.2, what="30 MiB sent")
        lab.cut_link("primary")
        _, err = up.communicate(timeout=200)
    assert up.returncode == 0, err
    assert out.read_text().split() == [expected_sha("100M.bin"), str(100 << 20)]
    moved = wait_for(lambda: api("/api/v1/events?kind=migration&service=upload-http"), timeout=30, what="the move")
    d = moved[0]["details"]
    assert d["strategy"] != "range" and d["replayed"] > 30 << 20 and d["regenerated_bytes"] == 0, d
    assert_clean(check(cap.path, "192.0.2.10", lab.VIP, port), expect_connections=1)


def test_malformed_http_from_the_server_falls_back_to_stream_replay(fresh: dict) -> None:
    r = subprocess.run(["ip", "netns", "exec", "lab-client", "curl", "-sS", "-H", "X-Lab-Malformed: 1",
                        "--max-time", "10", f"http://{lab.VIP}:{lab.UPLOAD_HTTP_PORT}/"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode != 0  # curl refuses it too; the gateway passed it on untouched
    ev = wait_for(lambda: api("/api/v1/events?kind=http-fallback&service=upload-http"), what="http-fallback")
    assert ev[0]["details"]["side"] == "server" and "malformed" in ev[0]["reason"], ev
    reasons = api("/api/v1/status")["dataplane"]["http_fallback_reasons"]
    assert any(k.startswith("server: malformed") for k in reasons), reasons


def test_a_chunked_compressed_response_is_regenerated_and_never_corrupted(fresh: dict, tmp_path: Path) -> None:
    """nginx's on-the-fly gzip: chunked, content-coded, a weak ETag — never range-resumed; the
    backup regenerates it from its first byte, verified.  nginx's chunk sizes follow its
    buffers' timing, so the regenerated bytes differ from the original's (the same body, other
    chunk framing): the move is refused — the client is reset, and every byte it got is right."""
    out = tmp_path / "10M.bin"
    with capture(tmp_path) as cap:
        dl = curl(("gz/10M.bin", out), rate="4M", extra=["--compressed"])
        wait_for(lambda: out.exists() and out.stat().st_size > 3 << 20, timeout=60, what="3 MiB received")
        lab.cut_link("primary")
        dl.communicate(timeout=120)
    good = (lab.cache_dir() / "www" / "10M.bin").read_bytes()
    got = out.read_bytes()
    assert got == good[:len(got)] and len(got) > 3 << 20  # never a wrong byte
    if dl.returncode == 0:  # (the same framing by chance: then it is all there)
        assert got == good
    (mv,) = wait_for(lambda: [e for e in events("divergence") + events("migration") if "strategy" in e["details"]],
                     what="the move's end")
    d = mv["details"]
    assert d["strategy"] == "full", d
    assert d["strategy_reason"] in ("weak validator", "chunked body", "content-coded body"), d
    reports = check(cap.path, "192.0.2.10", lab.VIP, PORT)
    assert not [v for r in reports.values() for v in r.violations if v.startswith(("I1", "I2", "I3"))]


def test_keepalive_over_a_disk_store_trims_on_disk_and_moves(fresh: dict, tmp_path: Path) -> None:
    """With store.mode = "disk" the trims are group commits: the connection's acknowledgments
    flow (its commit point follows the trims), the rows before the last quiescent point leave
    the store, and the connection moves from there."""
    import sqlite3

    cfg = lab.variant_config("disk-http", store={"mode": "disk"})
    lab.stop_appliance()
    lab.start_appliance(cfg)
    with capture(tmp_path) as cap:
        c = KeepAliveClient()
        try:
            for _ in range(50):
                assert c.get("4K.bin") == (200, 4096, expected_sha("4K.bin"))
            (conn,) = wait_for(lambda: [x for x in api(f"/api/v1/connections?service={SERVICE}")
                                        if x["state"] == "ESTABLISHED" and x["log_held"] == 0
                                        and x["commit_offset"] == x["log_bytes"]] or None,
                               what="a quiescent connection, committed")
            db = sqlite3.connect(str(lab.run_dir() / "checkpoints-disk-http.db"))
            try:
                def on_disk() -> tuple[int, int]:
                    row = db.execute("SELECT log_base, (SELECT COALESCE(SUM(length(data)), 0) FROM logdata "
                                     "WHERE conn = ?) FROM conn WHERE id = ?", (conn["id"], conn["id"])).fetchone()
                    return (row[0], row[1]) if row else (-1, -1)
                wait_for(lambda: on_disk()[0] == conn["log_bytes"], what="the trim on disk")
                assert on_disk()[1] < 2 * 100  # at most the row the last trim cut into
            finally:
                db.close()
            lab.cut_link("primary")
            assert c.get("1M.bin") == (200, 1 << 20, expected_sha("1M.bin"))
        finally:
            c.close()
    (mv,) = moves(1)
    assert mv["details"]["strategy"] == "quiescent"
    assert_clean(check(cap.path, "192.0.2.10", lab.VIP, PORT), expect_connections=1)
