"""The README's pictures, made from a real lab run: ``python -m appliance.bench.readme_images [--out images]``.

Builds the lab (taking the lab lock, like the lab tests), downloads
``100M.bin`` through the VIP with curl while tcpdump records the client's
side, cuts the primary's link mid-transfer (a silent death), and writes:

* ``failover-throughput.png``: the client's goodput over time (new bytes per
  50 ms, from the capture), the primary's death, the failover decision and
  the backup's first byte at the client marked (matplotlib);
* ``panel-*.png``: screenshots of the panel during and after the run
  (Chromium headless, through Playwright).

It prints the measured figures (failover time as the client saw it) and takes
the lab down again, also on failure.  Needs root.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from ..lab import topology as lab
from ..pcap import packets, tcp_fields

LOCK = "/run/appliance-lab.lock"
PANEL = f"http://{lab.API_HOST}:{lab.API_PORT}"
BIN = 0.05   # seconds per throughput bin


def _api(path: str, token: str) -> Any:
    req = urllib.request.Request(PANEL + path, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def goodput(pcap: Path, vip: str, port: int) -> tuple[list[tuple[float, int]], list[float]]:
    """(time, new in-order bytes) of each server->client data segment the client
    received that carried new bytes; and the times of every data segment."""
    from checkpoint.addr import pack

    vip_raw = pack(vip)
    top: int | None = None
    out = []
    every = []
    for t, p in packets(pcap):
        f = tcp_fields(p)
        if f is None or f[0] != vip_raw or f[2] != port:
            continue
        seq, n = f[4], f[7]
        if n <= 0:
            continue
        every.append(t)
        end = seq + n
        if top is None:
            top = seq
        new = (end - top) % (1 << 32)
        if 0 < new < (1 << 31):
            out.append((t, new))
            top = end % (1 << 32)
    return out, every


def chart(samples: list[tuple[float, int]], t0: float, death: float, decided: float | None, first_backup: float | None,
          path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = max(t for t, _ in samples)
    nbins = int((end - t0) / BIN) + 1
    bins = [0] * nbins
    for t, n in samples:
        bins[int((t - t0) / BIN)] += n
    xs = [i * BIN for i in range(nbins)]
    ys = [b / BIN / 1e6 * 8 for b in bins]   # Mbit/s
    fig, ax = plt.subplots(figsize=(10, 4.2), dpi=120)
    ax.plot(xs, ys, color="#1f5fbf", lw=1.2, label="client goodput (new bytes per 50 ms)")
    ax.axvline(death - t0, color="#b42318", ls="--", lw=1.4, label="primary's link cut (silent death)")
    if decided is not None:
        ax.axvline(decided - t0, color="#b26b00", ls=":", lw=1.4, label="failover decided (health check)")
    if first_backup is not None:
        ax.axvline(first_backup - t0, color="#17803d", ls="--", lw=1.4,
                   label=f"backup's first byte at the client (+{(first_backup - death) * 1000:.0f} ms)")
    ax.set_xlabel("seconds since the download started")
    ax.set_ylabel("Mbit/s")
    ax.set_title("curl downloading 100 MiB through the gateway; the primary dies mid-transfer")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(out: Path, rate: str = "12M", cut_after: float = 3.0) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="readme-images-"))
    lab.down()
    try:
        info = lab.up()
        token = str(info["token"])
        cap = subprocess.Popen(["ip", "netns", "exec", "lab-client", "tcpdump", "-i", "eth0", "-U", "-n", "-s", "96",
                                "-B", "32768", "-w", str(work / "client.pcap"), f"tcp port {lab.SERVICE_PORT}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert cap.stderr is not None   # stderr=PIPE
        cap.stderr.readline()   # "listening on ..."
        chromium = shutil.which("chromium") or "/usr/bin/chromium"
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1360, "height": 820})
            page.goto(f"{PANEL}/login")
            page.fill("#token", token)
            page.click("button[type=submit]")
            page.wait_for_url(f"{PANEL}/")
            t0 = time.time()
            curl = subprocess.Popen(["ip", "netns", "exec", "lab-client", "curl", "-sS", "--fail", "--limit-rate", rate,
                                     "-o", str(work / "100M.bin"), f"http://{lab.VIP}:{lab.SERVICE_PORT}/100M.bin"])
            page.goto(f"{PANEL}/connections?service=web")
            row = page.locator("table#connections tbody tr", has_text="ESTABLISHED").first
            row.wait_for(timeout=15000)
            cid = row.get_attribute("data-id")
            page.wait_for_timeout(2000)
            page.screenshot(path=str(out / "panel-connections.png"))
            page.goto(f"{PANEL}/connections/{cid}")
            time.sleep(max(0.0, cut_after - (time.time() - t0)))
            death = time.time()
            lab.cut_link("primary")
            page.locator("#c-backend", has_text="backup").wait_for(timeout=20000)
            page.wait_for_timeout(2500)
            page.screenshot(path=str(out / "panel-connection.png"), full_page=True)
            rc = curl.wait(timeout=180)
            page.goto(f"{PANEL}/")
            page.wait_for_timeout(1200)
            page.screenshot(path=str(out / "panel-status.png"))
            page.goto(f"{PANEL}/services")
            page.wait_for_timeout(500)
            page.screenshot(path=str(out / "panel-services.png"))
            page.goto(f"{PANEL}/events")
            page.screenshot(path=str(out / "panel-events.png"))
            browser.close()
        time.sleep(1.0)
        cap.terminate()
        cap.wait(timeout=10)
        if rc != 0:
            raise RuntimeError(f"curl failed ({rc})")
        got = lab.sha256_file(work / "100M.bin")
        want = next(line.split()[0] for line in (lab.cache_dir() / "www" / "SHA256SUMS").read_text().splitlines()
                    if line.split()[1] == "100M.bin")
        fo = _api("/api/v1/events?kind=failover&service=web", token)
        decided = fo[0]["time"] if fo else None
        samples, every = goodput(work / "client.pcap", lab.VIP, lab.SERVICE_PORT)
        # the backup cannot send before the failover was decided: its first byte is the first after that
        first_backup = next((t for t in every if t > (decided or death)), None)
        first_new = next((t for t, _ in samples if t > (decided or death)), None)
        chart(samples, t0, death, decided, first_backup, out / "failover-throughput.png")
        return {
            "sha256_ok": got == want,
            "death_to_decision_ms": None if decided is None else round((decided - death) * 1000),
            "death_to_first_backup_byte_ms": None if first_backup is None else round((first_backup - death) * 1000),
            "death_to_first_new_byte_ms": None if first_new is None else round((first_new - death) * 1000),
            "failover_event": fo[0]["reason"] if fo else None,
            "images": sorted(p.name for p in out.glob("*.png")),
        }
    finally:
        lab.down()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="images", help="directory for the PNG files (default: images)")
    ap.add_argument("--rate", default="12M", help="curl --limit-rate (default 12M)")
    args = ap.parse_args()
    with open(LOCK, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)   # one lab at a time (the lab tests take the same lock)
        print(json.dumps(run(Path(args.out), args.rate), indent=1))


if __name__ == "__main__":
    main()
