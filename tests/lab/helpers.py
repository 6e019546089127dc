"""Helpers for tests that drive the namespace lab with real programs."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.lab import topology as lab
from appliance.pcap import packets, tcp_fields


def api(path: str, method: str = "GET", body: Any = None, token: str | None = None) -> Any:
    tok = token if token is not None else (lab.run_dir() / "token").read_text().strip()
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        f"http://{lab.API_HOST}:{lab.API_PORT}{path}", data=data, method=method,
        headers={"Authorization": f"Bearer {tok}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


sha256_file = lab.sha256_file


expected_sha = lab.expected_sha


@dataclass
class Download:
    proc: subprocess.Popen
    out: Path

    def wait(self, timeout: float = 300) -> tuple[int, int]:
        """(curl exit code, local port)."""
        stdout, stderr = self.proc.communicate(timeout=timeout)
        port = int(stdout.strip() or 0) if stdout.strip().isdigit() else 0
        if self.proc.returncode != 0:
            print("curl stderr:", stderr)
        return self.proc.returncode, port


def vip(v6: bool = False) -> str:
    """The lab's service VIP of one family."""
    return lab.VIP6 if v6 else lab.VIP


def curl(client: str, address: str, port: int, path: str = "/", *args: str) -> list[str]:
    """The command running curl in ``client`` for ``http://address:port/path`` (an IPv6
    address bracketed, with ``-g`` so curl does not read the brackets as a glob)."""
    return ["ip", "netns", "exec", client, "curl", "-g", *args, lab.url(address, port, path)]


def start_download(name: str, out: Path, rate: str | None = None, client: str = "lab-client",
                   v6: bool = False, *extra: str) -> Download:
    """curl downloads ``name`` from the lab's web service (``v6``: through the IPv6 VIP;
    ``extra``: more curl arguments, e.g. a range)."""
    args = ["-sS", "--fail", "-o", str(out), "-w", "%{local_port}", "--max-time", "280", *extra]
    if rate:
        args += ["--limit-rate", rate]
    cmd = curl(client, vip(v6), lab.SERVICE_PORT, f"/{name}", *args)
    return Download(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), out)


def start_upload(body: Path, out: Path, rate: str | None = None, client: str = "lab-client",
                 v6: bool = False) -> Download:
    """curl POSTs ``body`` to the lab's upload service, which answers with its sha256
    (``v6``: through the IPv6 VIP)."""
    args = ["-sS", "--fail", "-H", "Expect:", "--data-binary", f"@{body}",
            "-o", str(out), "-w", "%{local_port}", "--max-time", "280"]
    if rate:
        args += ["--limit-rate", rate]
    cmd = curl(client, vip(v6), lab.UPLOAD_PORT, "/", *args)
    return Download(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), out)


class Capture:
    """tcpdump in a lab namespace, written packet by packet to a pcap file."""

    def __init__(self, ns: str, path: Path, bpf: str = "tcp port 80", iface: str = "eth0", snaplen: int = 200):
        self.path = path
        self.dropped = 0
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, "tcpdump", "-i", iface, "-U", "--immediate-mode", "-n", "-B", "32768", "-s", str(snaplen),
             "-w", str(path), bpf],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        deadline = time.monotonic() + 10
        # tcpdump says "listening on ..." once the socket is open
        line = self.proc.stderr.readline()
        if "listening" not in line or time.monotonic() > deadline:
            self.proc.kill()
            raise RuntimeError(f"tcpdump did not start: {line}")

    def stop(self) -> Path:
        """Stop the capture; fails if tcpdump lost packets (the capture would lie)."""
        # tcpdump drops what is still in its socket buffer at SIGINT: let it catch up
        last, stable_since = -1, time.monotonic()
        deadline = time.monotonic() + 10
        while self.proc.poll() is None and time.monotonic() < deadline:
            size = self.path.stat().st_size if self.path.exists() else 0
            if size != last:
                last, stable_since = size, time.monotonic()
            elif time.monotonic() - stable_since >= 1.0:
                break
            time.sleep(0.05)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                _, err = self.proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                _, err = self.proc.communicate()
            m = re.search(r"(\d+) packets dropped by kernel", err or "")
            self.dropped = int(m.group(1)) if m else 0
        return self.path

    def __enter__(self) -> "Capture":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if exc[0] is None:
            assert self.dropped == 0, f"tcpdump dropped {self.dropped} packets: the capture is incomplete"


def captured(pcap: Path, *preds) -> bool:
    """Whether, for each of ``preds``, a packet of ``pcap`` (also one still
    being written) satisfies it; a predicate gets ``tcp_fields``: (src, dst,
    sport, dport, seq, ack, flags, payload length)."""
    todo = list(preds)
    if not pcap.exists():
        return not todo
    for _, p in packets(pcap):
        f = tcp_fields(p)
        if f is not None:
            todo = [pred for pred in todo if not pred(f)]
            if not todo:
                break
    return not todo


def wait_for(pred, timeout: float = 10.0, interval: float = 0.1, what: str = "condition"):
    """Poll ``pred`` until it returns something true (returned) or fail after
    ``timeout`` seconds: tests wait for a condition, never for a fixed time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")
