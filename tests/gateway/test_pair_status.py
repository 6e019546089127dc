"""The gateway pair made visible (issue 13): ``GET /api/v1/status``'s ``pair``, the
``gateway_replication_*`` metrics and the panel's pair banner (``#pair-banner``, and
``#pair-degraded`` while the pair does not protect the connections), live in a browser.

One node of a pair, as ``appliance run`` builds it: a Gateway with ``store.mode = "peer"``, its
:class:`~appliance.pairctl.PairController` started (keepalived's FIFO reader, the standby's
checks, the active's heartbeat), the web app under uvicorn on the same loop.  Two real
redis-server processes on 127.0.0.1: this node's store and the peer's, whose store plays an
active gateway's (epoch 1).  keepalived itself is not run: its transitions are written to the
node's ``vrrp_fifo`` in keepalived's own format.  The node goes standby (resync, then in sync) →
MASTER (takeover in a new epoch, committing alone: degraded) → the peer's store following it
again (synchronous: not degraded) → the peer's store killed (alone again: degraded, with the
reason).  No root, no lab."""

from __future__ import annotations

import asyncio
import contextlib
import http.cookiejar
import json
import os
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from appliance import daemon
from appliance.config import parse
from appliance.gateway import Gateway
from appliance.pairctl import PairController
from appliance.replication_redis import LocalRedis, command
from webui.app import create_app

T = TypeVar("T")
TOKEN = "pair-status-token-123456"
PEER_EPOCH = 1      # the peer's store: an active gateway's, of epoch 1
TAKEOVER_EPOCH = 3  # node 1 (odd epochs) above the highest it knew (1)


def config(pair: dict[str, Any] | None) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "api": {"token": TOKEN},
        "service": [{"name": "web", "vip": "203.0.113.10", "port": 80,
                     "backend": [{"name": "primary", "address": "198.51.100.10"},
                                 {"name": "backup", "address": "198.51.100.20"}]}]}
    if pair is not None:
        doc["store"] = {"mode": "peer"}
        doc["gateway"] = {"on_failure": "closed"}
        doc["pair"] = pair
    return doc


def redis(port: int, *cmd: str | int) -> Any:
    """One command to a redis-server, synchronously (the test's own hand on a store)."""
    return command(port, *cmd)


def wait_for(cond: Callable[[], T], timeout: float = 15.0, what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@dataclass
class Node:
    gw: Gateway
    pair: PairController
    url: str
    loop: asyncio.AbstractEventLoop
    local: LocalRedis
    peer: LocalRedis
    fifo_fd: int
    eligibility: Path

    def get(self, path: str) -> str:
        req = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            body: bytes = r.read()
            return body.decode()

    def page(self, path: str) -> str:
        """A page of the panel, signed in (a session cookie, as a browser)."""
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        form = urllib.parse.urlencode({"token": TOKEN}).encode()
        with opener.open(self.url + "/login", data=form, timeout=10) as r:
            assert r.status == 200 and r.url == self.url + "/", r.url     # signed in, sent to the status page
        with opener.open(self.url + path, timeout=10) as r:
            body: bytes = r.read()
            return body.decode()

    def status(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.get("/api/v1/status"))["pair"]
        return doc

    def status_when(self, pred: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        """The pair's status once ``pred`` holds for it (waiting for it)."""
        last: dict[str, Any] = {}

        def check() -> bool:
            last.clear()
            last.update(self.status())
            return pred(last)

        wait_for(check, what=what)
        return last

    def metrics(self) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
        """``gateway_replication_*`` samples by name, then by their labels."""
        out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        for fam in text_string_to_metric_families(self.get("/metrics")):
            for s in fam.samples:
                if s.name.startswith("gateway_replication_"):
                    out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
        return out

    def keepalived(self, state: str) -> None:
        """keepalived's sync group transition, as it writes it to ``vrrp_notify_fifo``."""
        os.write(self.fifo_fd, f'GROUP "lab" {state} 0\n'.encode())


def one(m: dict[str, dict[tuple[tuple[str, str], ...], float]], name: str, **labels: str) -> float:
    return m[name][tuple(sorted(labels.items()))]


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    with running_node(tmp_path) as n:
        yield n


@contextlib.contextmanager
def running_node(tmp_path: Path, peer_up: bool = True, local_store: dict[str, str] | None = None,
                 **pair_keys: object) -> Iterator[Node]:
    """Node 1 of a pair, started, served (see the module's docstring); ``peer_up=False``: the
    peer's store is dead from the start; ``local_store``: keys set in this node's own store
    before it starts; ``pair_keys``: more ``[pair]`` settings."""
    peer = LocalRedis()
    local = LocalRedis()
    redis(peer.port, "SET", "repl:epoch", PEER_EPOCH)
    for k, v in (local_store or {}).items():
        redis(local.port, "SET", k, v)
    fifo = tmp_path / "vrrp.fifo"
    os.mkfifo(fifo)
    fifo_fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # as keepalived opens it
    cfg = parse(config({"node": 1, "redis": f"127.0.0.1:{local.port}", "peer_redis": f"127.0.0.1:{peer.port}",
                        "vrrp_fifo": str(fifo), "eligibility_file": str(tmp_path / "eligible"),
                        "epoch_file": str(tmp_path / "epoch"), **pair_keys}))
    assert cfg.pair is not None
    gw = Gateway(cfg)
    sent: list[bytes] = []
    gw.send = sent.append       # the kernel's injector (root only): what the node would send
    pair = gw.pair = PairController(gw, cfg.pair)
    loop = asyncio.new_event_loop()
    sock = daemon.listen_socket("127.0.0.1", 0)
    sock.setblocking(False)
    server = daemon._Server(daemon.web_config(create_app(gw), cfg))
    errors: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(server.serve(sockets=[sock]))
        except BaseException as exc:  # noqa: BLE001  (reported by the test, not lost in the thread)
            errors.append(exc)

    gw.loop = loop                  # one loop carries the pair, the gateway and the web app (appliance run)
    t = threading.Thread(target=run, name="uvicorn", daemon=True)
    t.start()
    try:
        wait_for(lambda: server.started or bool(errors) or not t.is_alive(), what="uvicorn started")
        assert not errors and server.started, errors
        if not peer_up:
            peer.kill()
        asyncio.run_coroutine_threadsafe(pair.start(), loop).result(10)
        host, port = sock.getsockname()[:2]
        yield Node(gw, pair, f"http://{host}:{port}", loop, local, peer, fifo_fd, tmp_path / "eligible")
    finally:
        if t.is_alive():
            asyncio.run_coroutine_threadsafe(pair.stop(), loop).result(10)
        server.should_exit = True
        t.join(timeout=10)
        if t.is_alive():            # a stream still open (a browser page a failed test left behind)
            server.force_exit = True
            t.join(timeout=10)
        sock.close()
        if not t.is_alive():
            loop.close()
        os.close(fifo_fd)
        local.close()
        peer.close()
    assert not t.is_alive(), "uvicorn did not stop"


def in_sync(n: Node) -> dict[str, Any]:
    """Wait until the standby is in sync and its lag has been measured; its status."""
    return n.status_when(lambda s: bool(s["in_sync"]) and s["lag"]["bytes"] is not None,
                         "the standby in sync, its lag measured")


def take_over(n: Node) -> dict[str, Any]:
    n.keepalived("MASTER")
    return n.status_when(lambda s: s["role"] == "active", "the takeover")


# --- without a pair --------------------------------------------------------------------------------

def test_without_a_pair_nothing_of_it_is_shown() -> None:
    gw = Gateway(parse(config(None)))
    assert gw.pair is None
    c = TestClient(create_app(gw))
    h = {"Authorization": f"Bearer {TOKEN}"}
    st = c.get("/api/v1/status", headers=h).json()
    assert "pair" in st and st["pair"] is None and st["node"]["role"] == "active"
    text = c.get("/metrics", headers=h).text
    assert "gateway_uptime_seconds" in text and "gateway_replication_" not in text
    r = c.post("/login", data={"token": TOKEN}, follow_redirects=False)
    assert r.status_code == 303
    page = c.get("/").text
    assert 'id="banner"' in page and 'id="pair-banner"' not in page and 'id="pair-degraded"' not in page


# --- a standby -------------------------------------------------------------------------------------

def test_a_standby_shows_its_resync_then_in_sync_with_its_lag(node: Node) -> None:
    n = node
    st = in_sync(n)
    assert st["node"] == 1 and st["role"] == "standby" and st["epoch"] == 0
    assert st["eligible"] is True and st["forwarding"] is False and st["degraded"] is None
    assert st["peer"] == "in sync" and st["peer_redis"] == f"127.0.0.1:{n.peer.port}"
    assert isinstance(st["lag"]["bytes"], int) and st["lag"]["bytes"] >= 0 and st["lag"]["link_up"] is True
    assert st["counters"]["resyncs"] == 1 and st["last_takeover"] is None
    assert st["lease"] == 0.4 and st["sync_lease"] == 2.0           # the defaults, reaching the role
    assert n.eligibility.read_text() == "0\n"                     # keepalived's track file agrees
    full = json.loads(n.get("/api/v1/status"))
    assert full["node"]["role"] == "standby"                     # the main banner's role too

    m = n.metrics()
    assert {k: v for k, v in m["gateway_replication_role"].items() if v} == {(("role", "standby"),): 1.0}
    assert len(m["gateway_replication_role"]) == 4
    assert one(m, "gateway_replication_in_sync") == 1.0 and one(m, "gateway_replication_eligible") == 1.0
    assert one(m, "gateway_replication_epoch") == 0.0 and one(m, "gateway_replication_degraded") == 0.0
    assert one(m, "gateway_replication_lag_bytes") >= 0 and "gateway_replication_lag_ms" in m
    assert one(m, "gateway_replication_resyncs_total") == 1.0
    assert one(m, "gateway_replication_takeovers_total") == 0.0
    assert "gateway_replication_last_takeover_timestamp_seconds" not in m

    page = n.page("/events")         # the banner is on every page (the live half: the browser test)
    banner = page.split('id="pair-banner"')[1].split("</section>")[0]
    assert 'class="banner pair pair-standby"' in page
    assert '<b id="p-role">standby</b>' in banner and '<b id="p-epoch">0</b>' in banner
    assert '<b id="p-peer">in sync</b>' in banner and '<b id="p-eligible">yes</b>' in banner
    assert " B, " in banner.split('id="p-lag">')[1].split("</b>")[0]
    assert '<b id="p-takeover">none</b>' in banner
    assert 'id="pair-degraded"' not in page


@pytest.mark.parametrize("mine, theirs, newest", [
    ("1-9", "1-8", True),     # the same epoch: the store with the later batch
    ("1-8", "1-9", False),
    ("1-9", "1-9", True),     # a tie: node 1 (this one)
])
def test_both_stores_masters_the_newest_takes_the_role_and_the_other_follows(
        tmp_path: Path, mine: str, theirs: str, newest: bool) -> None:
    """Both gateways' Redis restarted from their disks (peer plus disk): both are masters of
    the pair's data.  The newest store's node is in sync and may take the role; the other makes
    its store the newest's replica (it must not make the newer one follow the older)."""
    redis_last = {"repl:epoch": str(PEER_EPOCH), "repl:last": mine}
    with running_node(tmp_path, local_store=redis_last) as n:
        redis(n.peer.port, "SET", "repl:last", theirs)
        if newest:
            st = n.status_when(lambda s: bool(s["eligible"]), "eligible as the newest store")
            assert st["counters"]["resyncs"] == 0
            assert redis(n.local.port, "ROLE")[0] == b"master" and redis(n.peer.port, "ROLE")[0] == b"master"
        else:
            n.status_when(lambda s: s["counters"]["resyncs"] >= 1, "following the newer store")
            assert redis(n.local.port, "ROLE")[0] == b"slave"


def test_pair_disk_makes_a_node_whose_redis_does_not_fsync_ineligible(tmp_path: Path) -> None:
    with running_node(tmp_path, disk=True) as n:
        st = n.status_when(lambda s: "pair.disk" in (s["out_of_sync_reason"] or ""), "the reason given")
        assert st["disk"] is True and not st["eligible"] and "appendfsync" in st["out_of_sync_reason"]
        redis(n.local.port, "CONFIG", "SET", "appendonly", "yes")
        redis(n.local.port, "CONFIG", "SET", "appendfsync", "always")
        in_sync(n)


def test_a_standby_out_of_sync_is_a_degraded_banner(tmp_path: Path) -> None:
    """The peer's store out of reach from the start: the standby never gets in sync."""
    with running_node(tmp_path, peer_up=False) as n:
        st = n.status_when(lambda s: bool(s["last_check"]), "a sync check")
        assert st["role"] == "standby" and st["in_sync"] is False and st["eligible"] is False
        assert st["degraded"] == "this standby is not in sync: the peer's store is out of reach"
        assert st["peer"] == "not in sync: the peer's store is out of reach"
        assert n.eligibility.read_text() == "1\n"
        m = n.metrics()
        assert one(m, "gateway_replication_in_sync") == 0.0 and one(m, "gateway_replication_degraded") == 1.0
        assert one(m, "gateway_replication_eligible") == 0.0
        assert one(m, "gateway_replication_sync_checks_failed_total") >= 1
        page = n.page("/connections")
        assert 'class="banner pair pair-standby pair-bad"' in page
        warn = page.split('id="pair-degraded"')[1].split("</div>")[0]
        assert "the peer&#39;s store is out of reach" in warn and 'role="alert"' in warn


# --- a takeover, alone, synchronous again, alone again ----------------------------------------------

def test_a_takeover_and_committing_alone_show_in_api_metrics_and_panel(node: Node) -> None:
    n = node
    in_sync(n)
    before = time.time()
    st = take_over(n)
    # committing alone right after the takeover: no standby follows the new active's store yet
    assert st["epoch"] == TAKEOVER_EPOCH and st["vrrp"] == "MASTER" and st["eligible"] is True
    assert st["alone"] is True and st["in_sync"] is None
    assert st["degraded"] == "the standby is not in sync (the former active is gone)"
    lt = st["last_takeover"]
    assert lt["epoch"] == TAKEOVER_EPOCH and lt["reattached"] == 0 and lt["reset"] == 0
    assert before <= lt["at"] <= time.time() and "keepalived made this node master" in lt["reason"]
    assert st["counters"]["takeovers"] == 1
    assert (Path(n.pair.cfg.epoch_file).read_text()) == f"{TAKEOVER_EPOCH}\n"

    m = n.metrics()
    assert {k: v for k, v in m["gateway_replication_role"].items() if v} == {(("role", "active"),): 1.0}
    assert one(m, "gateway_replication_epoch") == TAKEOVER_EPOCH
    assert one(m, "gateway_replication_alone") == 1.0 and one(m, "gateway_replication_degraded") == 1.0
    assert "gateway_replication_in_sync" not in m                 # a standby's gauge only
    assert one(m, "gateway_replication_takeovers_total") == 1.0
    assert one(m, "gateway_replication_last_takeover_timestamp_seconds") == pytest.approx(lt["at"])
    assert one(m, "gateway_replication_commits_total", result="acked") == 0.0

    page = n.page("/services")
    banner = page.split('id="pair-banner"')[1].split("</section>")[0]
    assert '<b id="p-role">active</b>' in banner and f'<b id="p-epoch">{TAKEOVER_EPOCH}</b>' in banner
    assert '<b id="p-vrrp">MASTER</b>' in banner
    takeover = banner.split('id="p-takeover">')[1].split("</b>")[0]
    assert f"epoch {TAKEOVER_EPOCH}: keepalived made this node master" in takeover and "0 re-attached" in takeover
    assert "the standby is not in sync (the former active is gone)" in banner.split('id="pair-degraded"')[1]

    # the former active's store comes back as the new active's replica: commits are synchronous again
    redis(n.peer.port, "REPLICAOF", "127.0.0.1", n.local.port)
    st = n.status_when(lambda s: not s["alone"], "replication synchronous")
    assert st["degraded"] is None and st["peer"] == "reachable" and st["peer_reachable"] is True
    m = n.metrics()
    assert one(m, "gateway_replication_alone") == 0.0 and one(m, "gateway_replication_degraded") == 0.0
    assert one(m, "gateway_replication_peer_reachable") == 1.0
    page = n.page("/")
    assert 'id="pair-banner"' in page and 'id="pair-degraded"' not in page

    # the standby's store dies: the active goes on alone, visibly, with the reason
    n.peer.kill()
    st = n.status_when(lambda s: bool(s["alone"]), "committing alone")
    assert st["degraded"] == "the standby is not in sync (the peer's store is out of reach)"
    assert st["peer"] == "unreachable"
    m = n.metrics()
    assert one(m, "gateway_replication_alone") == 1.0 and one(m, "gateway_replication_peer_reachable") == 0.0
    page = n.page("/")
    assert "the peer&#39;s store is out of reach" in page.split('id="pair-degraded"')[1].split("</div>")[0]
    kinds = [e.details.get("what") for e in n.gw.events.list(kind="pair", limit=None)]
    assert "takeover" in kinds and "degraded" in kinds


def test_a_fenced_node_is_shown_fenced(node: Node) -> None:
    """Driven to fenced through its role (the controller would make it a standby again at once)."""
    n = node
    in_sync(n)
    take_over(n)

    def fence() -> None:
        n.pair.role.fence("the peer's store holds epoch 5, newer than this node's 3", n.pair.clock())

    asyncio.run_coroutine_threadsafe(_call(fence), n.loop).result(10)
    st = n.status()
    assert st["role"] == "fenced" and st["forwarding"] is False
    assert st["degraded"] == "fenced: the peer's store holds epoch 5, newer than this node's 3"
    m = n.metrics()
    assert {k: v for k, v in m["gateway_replication_role"].items() if v} == {(("role", "fenced"),): 1.0}
    assert one(m, "gateway_replication_forwarding") == 0.0


async def _call(fn: Callable[[], None]) -> None:
    fn()


# --- live, in a browser ----------------------------------------------------------------------------

def test_the_pair_banner_follows_a_takeover_live(browser: Any, node: Node) -> None:
    n = node
    in_sync(n)
    page = browser.new_context().new_page()
    try:
        page.goto(f"{n.url}/login")
        page.fill("input[name=token]", TOKEN)
        page.click("button[type=submit]")
        page.wait_for_url(f"{n.url}/")
        assert page.locator("#pair-banner #p-role").inner_text() == "standby"
        assert page.locator("#pair-degraded").count() == 0
        page.locator("#pair-banner #p-lag").filter(has_text=" B, ").wait_for(timeout=10000)

        n.keepalived("MASTER")                                      # no reload: the status stream updates the banner
        page.locator("#pair-banner #p-role").filter(has_text="active").wait_for(timeout=10000)
        page.locator("#pair-degraded").filter(has_text="the former active is gone").wait_for(timeout=10000)
        assert page.locator("#pair-banner #p-epoch").inner_text() == str(TAKEOVER_EPOCH)
        assert page.locator("#banner #b-role").inner_text() == "active"
        assert f"epoch {TAKEOVER_EPOCH}: keepalived made this node master" in page.locator("#p-takeover").inner_text()
        assert "pair-bad" in (page.locator("#pair-banner").get_attribute("class") or "")

        redis(n.peer.port, "REPLICAOF", "127.0.0.1", n.local.port)
        page.locator("#pair-degraded").wait_for(state="detached", timeout=15000)
        assert "pair-bad" not in (page.locator("#pair-banner").get_attribute("class") or "")
    finally:
        page.context.close()
