"""The operator's panel in a real browser (Debian's Chromium, headless, driven by
Playwright) over the real lab: sign in, watch a live download appear, fail the
service over from the panel, and the download completes with the right bytes."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from appliance.lab import topology as lab

from .helpers import expected_sha, sha256_file, start_download, wait_for

pytestmark = pytest.mark.lab

PANEL = f"http://{lab.API_HOST}:{lab.API_PORT}"


@pytest.fixture
def fresh(lab_up: dict) -> Iterator[dict]:
    lab.down_appliance_state()
    lab.up()
    yield lab_up
    lab.down_appliance_state()


def metrics(token: str) -> dict[str, list]:
    req = urllib.request.Request(f"{PANEL}/metrics", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return {f.name: f.samples for f in text_string_to_metric_families(r.read().decode())}


def api_get(token: str, path: str) -> dict:
    req = urllib.request.Request(f"{PANEL}{path}", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())  # type: ignore[no-any-return]


def failovers(m: dict[str, list]) -> float:
    return sum(s.value for s in m["gateway_failovers"] if s.labels.get("service") == "web")


def test_fail_over_from_the_panel_while_curl_downloads(fresh: dict, browser, tmp_path: Path) -> None:
    token = (lab.run_dir() / "token").read_text().strip()
    before = metrics(token)
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    page.goto(f"{PANEL}/connections?service=web")
    assert page.url.endswith("/login")
    page.fill("#token", token)
    page.click("button[type=submit]")
    page.wait_for_url(f"{PANEL}/")
    page.goto(f"{PANEL}/connections?service=web")

    out = tmp_path / "100M.bin"
    dl = start_download("100M.bin", out, rate="8M")
    try:
        # the connection shows up live (SSE), on the primary, established, protected
        row = page.locator("table#connections tbody tr", has=page.locator("td.backend", has_text="primary"))
        row.filter(has_text="ESTABLISHED").first.wait_for(timeout=15000)
        cid = row.first.get_attribute("data-id")
        assert cid and "192.0.2.10:" in row.first.inner_text()
        wait_for(lambda: out.exists() and out.stat().st_size > 8 << 20, timeout=30, what="8 MiB received")

        page.goto(f"{PANEL}/services")
        page.click("h2 button[data-action=failover][data-service=web]")
        dialog = page.locator("dialog#confirm")
        dialog.wait_for(state="visible")
        text = page.inner_text("#confirm-text")
        assert re.search(r"Moves 1 connection from primary to backup", text), text
        page.click("#confirm-ok")
        page.locator("#toast", has_text="failover #").wait_for(timeout=10000)

        # the event is there, and the connection is on the backup
        page.goto(f"{PANEL}/events?kind=failover")
        page.locator("table#events tbody tr", has_text="manual").first.wait_for(timeout=10000)
        page.goto(f"{PANEL}/connections/{cid}")
        page.locator("#c-backend", has_text="backup").wait_for(timeout=20000)
        page.locator("#timeline td.kind-migration").first.wait_for(timeout=30000)
        rc, _ = dl.wait(timeout=120)
    finally:
        if dl.proc.poll() is None:
            dl.proc.kill()
            dl.proc.wait()
    assert rc == 0 and sha256_file(out) == expected_sha("100M.bin")
    # once it has ended, the moved connection's page still opens from the history: closed, its
    # final record, timeline and the move's timings; its last packets download and open in tcpdump
    wait_for(lambda: api_get(token, f"/api/v1/connections/{cid}").get("closed"), timeout=20,
             what="the connection closed")
    page.goto(f"{PANEL}/connections/{cid}")
    assert "Closed" in page.inner_text("#closed") and "primary → backup" in page.inner_text("#closed")
    assert page.locator("#timeline td.kind-failover").count() >= 1
    assert page.locator("#timeline td.kind-migration").count() >= 1
    timings = page.inner_text("#moves td.timings")
    assert re.search(r"\w+ \d", timings), timings
    assert page.inner_text("#ici td[data-k=closed]").lower() == "true"
    with page.expect_download() as dl_info:
        page.click(f"a[href='/api/v1/connections/{cid}/pcap']")
    pcap = tmp_path / "conn.pcap"
    dl_info.value.save_as(pcap)
    shown = subprocess.run(["tcpdump", "-n", "-r", str(pcap)], capture_output=True, text=True, timeout=30)
    assert shown.returncode == 0, shown.stderr
    # as the gateway received them: the client's to the VIP, the backends' still from their own address
    mine = [ln for ln in shown.stdout.splitlines() if "> 203.0.113.10.80:" in ln or " > 192.0.2.10." in ln]
    assert len(mine) >= 10 and any("203.0.113.10.80" in ln for ln in mine), shown.stdout[:2000]
    after = metrics(token)
    assert failovers(after) == failovers(before) + 1
    assert sum(s.value for s in after["gateway_packets"]) > sum(s.value for s in before["gateway_packets"])
    # the change is in the audit trail, with who did it
    page.goto(f"{PANEL}/audit")
    assert "failover" in page.inner_text("table#audit") and "api-token" in page.inner_text("table#audit")


def test_csrf_less_panel_posts_and_viewers_are_refused(fresh: dict, browser) -> None:
    token = (lab.run_dir() / "token").read_text().strip()
    page = browser.new_page()
    page.goto(f"{PANEL}/login")
    page.fill("#token", token)
    page.click("button[type=submit]")
    page.wait_for_url(f"{PANEL}/")
    # a post with the session cookie but without the page's CSRF token is refused
    status = page.evaluate("fetch('/api/v1/services/web/failover', {method: 'POST'}).then(r => r.status)")
    assert status == 403
    # an admin creates a viewer token from the panel's API; the viewer cannot fail over
    made = page.evaluate("""fetch('/api/v1/tokens', {method: 'POST', headers: {'Content-Type': 'application/json',
        'X-CSRF-Token': document.querySelector('meta[name=csrf-token]').content},
        body: JSON.stringify({name: 'watcher', role: 'viewer'})}).then(r => r.json())""")
    req = urllib.request.Request(f"{PANEL}/api/v1/services/web/failover", method="POST",
                                 headers={"Authorization": f"Bearer {made['token']}"})
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req, timeout=10)
    assert exc.value.code == 403
    req = urllib.request.Request(f"{PANEL}/api/v1/services/web/failover", method="POST")
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req, timeout=10)
    assert exc.value.code == 401
