"""Failover-time histograms (appliance.failover_stats) through a real Gateway and Dataplane, without a
kernel: crafted packets, a health-check or held-close failover, a replay move driven to its
verification; then ``GET /metrics``'s text, parsed with prometheus_client's parser."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from scapy.all import IP, TCP, Raw

from appliance.config import parse
from appliance.failover_stats import CATCHUP_BUCKETS, DECISION_BUCKETS, FIRST_BYTE_BUCKETS, Histogram
from appliance.gateway import Gateway
from appliance.health import HealthChecker
from webui.metrics import Metrics

C, VIP, P, B = "192.0.2.10", "203.0.113.10", "198.51.100.10", "198.51.100.20"
SPORT = 40000
REQUEST = b"GET / HTTP/1.1\r\n\r\n"          # 18 bytes
HEAD = b"HTTP/1.1 200 OK\r\n"                # 17 bytes: sent by the primary and acknowledged by the client
MORE = b"Server: x\r"                         # 10 bytes: sent by the primary, not acknowledged
NEW = b"abc"                                  # the backup's first bytes the client never had
TS = [("NOP", None), ("NOP", None)]
SYN_OPTS = [("MSS", 1460), ("SAckOK", b""), ("WScale", 7)]


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def config(**health: Any) -> dict[str, Any]:
    return {"api": {"token": "metrics-token"},
            "service": [{"name": "web", "vip": VIP, "port": 80, "health": health,
                         "backend": [{"name": "primary", "address": P}, {"name": "backup", "address": B}]}]}


def gateway(t: float = 1.0) -> tuple[Gateway, Clock, HealthChecker]:
    clock = Clock(t)
    gw = Gateway(parse(config(interval=0.125, fall=3)), clock=clock)
    gw.health = HealthChecker(gw.health_targets(), gw.on_health)
    return gw, clock, gw.health


def feed(gw: Gateway, clock: Clock, pkt: Any, t: float) -> None:
    """One packet at time ``t``, then what the appliance's loop does after a batch."""
    clock.t = t
    gw.dataplane.handle(bytearray(bytes(pkt)), t)
    gw.flush()


def client(flags: str, seq: int, ack: int, tsval: int, tsecr: int, data: bytes = b"") -> Any:
    p = IP(src=C, dst=VIP) / TCP(sport=SPORT, dport=80, flags=flags, seq=seq, ack=ack,
                                 options=TS + [("Timestamp", (tsval, tsecr))])
    return p / Raw(data) if data else p


def server(src: str, flags: str, seq: int, ack: int, tsval: int, tsecr: int, data: bytes = b"") -> Any:
    p = IP(src=src, dst=C) / TCP(sport=80, dport=SPORT, flags=flags, seq=seq, ack=ack,
                                 options=TS + [("Timestamp", (tsval, tsecr))])
    return p / Raw(data) if data else p


def converse(gw: Gateway, clock: Clock, client_acked_all: bool = False) -> None:
    """Client <-> primary: a request, 17 bytes of response the client acknowledged, and
    (unless ``client_acked_all``) 10 more it has not acknowledged yet."""
    feed(gw, clock, IP(src=C, dst=VIP) / TCP(sport=SPORT, dport=80, flags="S", seq=1000,
                                             options=SYN_OPTS + [("Timestamp", (100, 0))]), 1.0)
    feed(gw, clock, IP(src=P, dst=C) / TCP(sport=80, dport=SPORT, flags="SA", seq=5000, ack=1001,
                                           options=SYN_OPTS + [("Timestamp", (7000, 100))]), 1.0)
    feed(gw, clock, client("A", 1001, 5001, 101, 7000), 1.0)
    feed(gw, clock, client("PA", 1001, 5001, 102, 7000, REQUEST), 1.0)
    feed(gw, clock, server(P, "PA", 5001, 1019, 7001, 102, HEAD), 1.0)
    feed(gw, clock, client("A", 1019, 5018, 103, 7001), 1.0)
    if not client_acked_all:
        feed(gw, clock, server(P, "PA", 5018, 1019, 7002, 103, MORE), 1.0)


def regenerate(gw: Gateway, clock: Clock, t: float, client_acked_all: bool = False) -> None:
    """The backup answers the move's SYN at ``t``, acknowledges the replayed request, resends the
    head (suppressed: the client has it) at ``t + 0.125`` and the rest at ``t + 0.25``."""
    feed(gw, clock, IP(src=B, dst=C) / TCP(sport=80, dport=SPORT, flags="SA", seq=70000, ack=1001,
                                           options=SYN_OPTS + [("Timestamp", (50, 102))]), t)
    feed(gw, clock, server(B, "A", 70001, 1019, 51, 103), t)
    feed(gw, clock, server(B, "PA", 70001, 1019, 52, 103, HEAD), t + 0.125)
    if not client_acked_all:
        feed(gw, clock, server(B, "PA", 70018, 1019, 53, 103, MORE + NEW), t + 0.25)


def fail_probes(health: HealthChecker, first_start: float, n: int = 3, interval: float = 0.125) -> None:
    h = health.health["web/primary"]
    h.record(True, 0.001, first_start - interval + 0.001, "HTTP 200", first_start - interval)
    for i in range(n):
        start = first_start + i * interval
        h.record(False, None, start + interval, "timeout", start)


def scrape(gw: Gateway, metrics: Metrics | None = None) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every histogram sample of one scrape, by (sample name, sorted labels)."""
    text = (metrics or Metrics(gw)).render()
    out = {}
    for fam in text_string_to_metric_families(text):
        if fam.type == "histogram":
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def hist(samples: dict, name: str, **labels: str) -> tuple[float, float, dict[str, float]]:
    """(count, sum, cumulative buckets by le) of one series."""
    key = tuple(sorted(labels.items()))
    buckets = {dict(k[1])["le"]: v for k, v in samples.items()
               if k[0] == name + "_bucket" and tuple(sorted((a, b) for a, b in k[1] if a != "le")) == key}
    return samples[(name + "_count", key)], samples[(name + "_sum", key)], buckets


def le_of(bounds: tuple[float, ...], v: float) -> str:
    """The smallest bucket label that holds ``v``."""
    return next((repr(float(b)) for b in bounds if v <= b), "+Inf")


def test_series_exist_from_the_start_with_zero_counts() -> None:
    gw, _, _ = gateway()
    s = scrape(gw)
    for reason in ("health", "backend_closed"):
        count, total, buckets = hist(s, "gateway_failover_decision_seconds", service="web", reason=reason)
        assert (count, total) == (0, 0) and set(buckets.values()) == {0}
        assert len(buckets) == len(DECISION_BUCKETS) + 1 and "+Inf" in buckets
    assert hist(s, "gateway_move_first_byte_seconds", service="web", mode="replay")[:2] == (0, 0)
    count, _, buckets = hist(s, "gateway_move_catchup_bytes", service="web")
    assert count == 0 and len(buckets) == len(CATCHUP_BUCKETS) + 1
    assert "1024.0" in buckets and repr(float(1 << 30)) in buckets  # KiB to GiB


def test_health_failover_observes_decision_first_byte_and_catchup() -> None:
    gw, clock, health = gateway()
    m = Metrics(gw)
    converse(gw, clock)
    before = scrape(gw, m)
    # the primary's last good probe ended at 10.126; the first failed one started at 10.25
    fail_probes(health, 10.25)
    assert health.fail_since("web", "primary") == 10.25 and health.state("web", "primary") == "down"
    clock.t = 10.75  # the third failure is in: the health check says down, the gateway decides
    gw.on_health(health.targets["web/primary"], "up", "down", "timeout")
    assert gw.dataplane.services["web"].active == "backup"
    after_decision = scrape(gw, m)
    count, total, buckets = hist(after_decision, "gateway_failover_decision_seconds", service="web", reason="health")
    assert (count, total) == (1, 0.5)                       # 10.75 - 10.25
    assert buckets[le_of(DECISION_BUCKETS, 0.5)] == 1 and buckets[repr(0.3)] == 0 and buckets["+Inf"] == 1
    assert hist(after_decision, "gateway_failover_decision_seconds", service="web", reason="backend_closed")[0] == 0
    # nothing moved yet: no first byte, no catch-up
    assert hist(after_decision, "gateway_move_first_byte_seconds", service="web", mode="replay")[0] == 0

    regenerate(gw, clock, 11.0)  # SYN-ACK at 11.0, head at 11.125 (suppressed), the rest at 11.25
    ev = gw.events.last("migration")
    assert ev is not None and ev.reason == "moved" and ev.details["timings_ms"]["first_forward_ms"] == 500.0
    assert ev.details["suppressed_bytes"] == len(HEAD)
    s = scrape(gw, m)
    count, total, buckets = hist(s, "gateway_move_first_byte_seconds", service="web", mode="replay")
    assert (count, total) == (1, 0.5)                       # the move started at 10.75, forwarded at 11.25
    assert buckets[le_of(FIRST_BYTE_BUCKETS, 0.5)] == 1 and buckets[repr(0.25)] == 0
    count, total, buckets = hist(s, "gateway_move_catchup_bytes", service="web")
    assert (count, total) == (1, len(HEAD))
    assert buckets["1024.0"] == 1
    # later packets of the moved connection change nothing
    feed(gw, clock, client("A", 1019, 5030, 104, 53), 11.5)
    assert scrape(gw, m) == s
    assert before != s


def test_a_move_with_nothing_to_forward_is_observed_when_verified() -> None:
    gw, clock, _ = gateway()
    converse(gw, clock, client_acked_all=True)
    clock.t = 20.0
    gw.failover("web")  # manual: no decision observed
    regenerate(gw, clock, 20.25, client_acked_all=True)  # everything the backup sends the client had
    ev = gw.events.last("migration")
    assert ev is not None and ev.reason == "moved" and "first_forward_ms" not in ev.details["timings_ms"]
    s = scrape(gw)
    assert hist(s, "gateway_move_first_byte_seconds", service="web", mode="replay")[:2] == (1, 0.375)  # verified at 20.375
    assert hist(s, "gateway_move_catchup_bytes", service="web")[:2] == (1, len(HEAD))
    for reason in ("health", "backend_closed", "manual"):
        key = ("gateway_failover_decision_seconds_count", (("reason", reason), ("service", "web")))
        assert s.get(key, 0) == 0


def test_held_close_failover_measures_from_the_held_close() -> None:
    gw, clock, health = gateway()
    converse(gw, clock)
    probed = []

    async def probe_now(service: str, backend: str) -> bool:  # the primary is dead: the probe fails
        probed.append((service, backend))
        clock.t = 30.25
        health.health[f"{service}/{backend}"].record(False, None, 30.25, "refused", 30.0625)
        return False

    health.probe_now = probe_now  # type: ignore[method-assign]

    async def main() -> None:
        # the primary closes the connection at 30.0: held, probed, failed over
        feed(gw, clock, server(P, "FA", 5028, 1019, 7003, 103), 30.0)
        while gw._probing or probed == []:
            await asyncio.sleep(0)
        for task in list(gw._tasks):
            await task

    asyncio.run(main())
    assert probed == [("web", "primary")] and gw.dataplane.services["web"].active == "backup"
    s = scrape(gw)
    assert hist(s, "gateway_failover_decision_seconds", service="web", reason="backend_closed")[:2] == (1, 0.25)
    assert hist(s, "gateway_failover_decision_seconds", service="web", reason="health")[0] == 0
    assert gw.failover_stats._held == {}


def test_a_released_close_is_forgotten() -> None:
    gw, clock, health = gateway()
    converse(gw, clock, client_acked_all=True)

    async def probe_now(service: str, backend: str) -> bool:
        return True  # alive: the close is let through

    health.probe_now = probe_now  # type: ignore[method-assign]

    async def main() -> None:
        feed(gw, clock, server(P, "FA", 5018, 1019, 7003, 103), 40.0)
        while gw._probing:
            await asyncio.sleep(0)

    asyncio.run(main())
    assert gw.failover_stats._held == {} and gw.dataplane.services["web"].active == "primary"
    # a later health failover measures from its own first failed probe, not from the released close
    fail_probes(health, 50.0)
    clock.t = 50.5
    gw.on_health(health.targets["web/primary"], "up", "down", "timeout")
    assert hist(scrape(gw), "gateway_failover_decision_seconds", service="web", reason="health")[:2] == (1, 0.5)


def test_health_fail_since_is_the_first_failed_probe_since_the_last_success() -> None:
    gw, _, health = gateway()
    h = health.health["web/primary"]
    assert h.fail_since is None
    h.record(False, None, 1.1, "timeout", 1.0)
    h.record(False, None, 1.2, "timeout", 1.1)
    assert h.fail_since == 1.0 and h.as_dict()["fail_since"] == 1.0
    h.record(True, 0.001, 1.3, "HTTP 200", 1.299)
    assert h.fail_since is None
    h.record(False, None, 1.4, "refused")  # no start given: the end
    assert health.fail_since("web", "primary") == 1.4


@pytest.mark.parametrize("v, bucket", [(0.0, 0), (0.01, 0), (0.0100001, 1), (1e9, len(DECISION_BUCKETS))])
def test_histogram_buckets_are_upper_bounds(v: float, bucket: int) -> None:
    h = Histogram(DECISION_BUCKETS)
    h.observe(v)
    assert h.counts[bucket] == 1 and h.count == 1 and h.sum == v
    assert h.cumulative()[-1] == (float("inf"), 1)


# --- resume mode (agents scripted as in tests/gateway/test_resume.py) --------------------------

def resume_gateway() -> tuple[Gateway, Clock, Any]:
    from tests.gateway.test_resume import CFG, Agents

    clock = Clock(100.0)
    gw = Gateway(parse(CFG), clock=clock)
    agents = Agents()
    assert gw.resume is not None
    gw.resume.rpc = agents
    return gw, clock, agents


def test_resume_from_the_wire_is_observed_from_the_hold_to_the_release() -> None:
    from tests.gateway.test_resume import established

    gw, clock, agents = resume_gateway()
    rec = established(gw, 100.0)
    agents.during["activate"] = lambda: setattr(clock, "t", 100.25)  # the backup's endpoint goes live
    gw.failover("files", reason="health check: primary down", dead=True)
    assert rec.backend == "backup"
    s = scrape(gw)
    assert hist(s, "gateway_move_first_byte_seconds", service="files", mode="resume")[:2] == (1, 0.25)
    # no health checker, no held close: the death is unknown, so no decision is observed
    assert hist(s, "gateway_failover_decision_seconds", service="files", reason="health")[0] == 0
    assert ("gateway_move_catchup_bytes_count", (("service", "files"),)) not in s  # replay only


def test_planned_resume_move_is_observed_with_its_hold_to_release() -> None:
    from tests.gateway.test_resume import established

    gw, _, _ = resume_gateway()
    rec = established(gw, 100.0)
    ev = asyncio.run(gw.migrate_async(rec.id, "backup", mode="resume"))
    seconds = ev["details"]["timings_ms"]["hold_to_release"] / 1000
    s = scrape(gw)
    assert hist(s, "gateway_move_first_byte_seconds", service="files", mode="resume")[:2] == (1, seconds)
