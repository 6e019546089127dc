"""``GET /metrics``: the gateway's state in the Prometheus text format (``gateway_*``).

Gauges are read from the gateway at scrape time.  Counters must never go
back, but the event log is a bounded ring: :class:`Metrics` folds the events
it has not seen yet (by id) into its own running totals on every scrape, so
failovers, divergences and resets are counted once each, whatever the ring
forgot since.  The failover-time histograms are kept on the gateway
(:mod:`appliance.failover_stats`) and only written out here.  Queue drops come from the kernel
(``/proc/net/netfilter/nfnetlink_queue``: packets the queue had no room for,
and packets the kernel could not hand to user space) for the queues the
appliance binds.  A node of a gateway pair (``gw.pair``) adds ``gateway_replication_*``: its role,
epoch, eligibility, replication lag, commits and takeovers (:func:`_replication`).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence

from appliance.failover_stats import Histogram, failover_reason

__all__ = ["Metrics", "failover_reason", "kernel_queue_drops"]

NFQ_PROC = Path("/proc/net/netfilter/nfnetlink_queue")


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, Any]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_esc(str(v))}"' for k, v in labels.items()) + "}"


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_: str,
               samples: Sequence[tuple[Mapping[str, Any], float]]) -> None:
        # the text format (0.0.4) names a counter's family with its _total suffix
        full = name + "_total" if kind == "counter" else name
        self.lines.append(f"# HELP {full} {help_}")
        self.lines.append(f"# TYPE {full} {kind}")
        for labels, value in samples:
            self.lines.append(f"{full}{_labels(labels)} {float(value)!r}")

    def histogram(self, name: str, help_: str, series: Sequence[tuple[Mapping[str, Any], Histogram]]) -> None:
        """One histogram family: per series its cumulative ``_bucket{le=...}``, ``_sum`` and ``_count``."""
        self.lines.append(f"# HELP {name} {help_}")
        self.lines.append(f"# TYPE {name} histogram")
        for labels, h in series:
            for bound, n in h.cumulative():
                le = "+Inf" if bound == float("inf") else repr(float(bound))
                self.lines.append(f"{name}_bucket{_labels({**labels, 'le': le})} {float(n)!r}")
            self.lines.append(f"{name}_sum{_labels(labels)} {float(h.sum)!r}")
            self.lines.append(f"{name}_count{_labels(labels)} {float(h.count)!r}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def kernel_queue_drops(path: Path = NFQ_PROC) -> dict[int, dict[str, int]]:
    """Per queue number: queue_dropped (queue full) and user_dropped (netlink buffer full)."""
    out: dict[int, dict[str, int]] = {}
    try:
        text = path.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        f = line.split()
        if len(f) >= 7 and f[0].isdigit():
            out[int(f[0])] = {"queue_full": int(f[5]), "user_space": int(f[6])}
    return out


class Metrics:
    """Running counters over the event log, and the text of one scrape."""

    def __init__(self, gw: Any) -> None:
        self.gw = gw
        self._seen = 0
        self.failovers: dict[tuple[str, str], int] = defaultdict(int)
        self.events: dict[str, int] = defaultdict(int)
        self.moves: dict[str, int] = defaultdict(int)

    def _fold_events(self) -> None:
        for e in self.gw.events.list(since_id=self._seen, limit=None):
            self._seen = e.id
            self.events[e.kind] += 1
            if e.kind == "failover":
                self.failovers[(e.service or "", failover_reason(e.reason))] += 1
            elif e.kind == "migration" and e.reason == "moved":
                self.moves[e.service or ""] += 1

    def render(self) -> str:
        gw = self.gw
        self._fold_events()
        st = gw.status()
        services = gw.services()
        w = _Writer()
        w.family("gateway_uptime_seconds", "gauge", "Seconds since the appliance started.",
                 [({}, st["uptime_seconds"])])
        gauges = gw.connection_gauges()
        by_state = {(svc, st): n for svc, g in gauges.items() for st, n in g["by_state"].items()}
        by_family = {(svc, f): n for svc, g in gauges.items() for f, n in g["by_family"].items()}
        prot = {svc: g["protected"] for svc, g in gauges.items()}
        lag_max = {svc: g["lag_max"] for svc, g in gauges.items()}
        age_max = {svc: g["age_max"] for svc, g in gauges.items()}
        w.family("gateway_tracked_connections", "gauge", "Connections in the table, by service and TCP state.",
                 [({"service": s, "state": t}, n) for (s, t), n in sorted(by_state.items())])
        w.family("gateway_tracked_connections_by_family", "gauge",
                 "Connections in the table, by service and address family (ipv4, ipv6).",
                 [({"service": s, "family": f}, n) for (s, f), n in sorted(by_family.items())])
        w.family("gateway_protected_connections", "gauge", "Connections that can be failed over, by service.",
                 [({"service": s}, n) for s, n in sorted(prot.items())])
        w.family("gateway_checkpoint_lag_bytes", "gauge",
                 "Largest commit lag of a connection's checkpoint (client bytes not yet committed), by service.",
                 [({"service": s["name"]}, lag_max.get(s["name"], 0.0)) for s in services])
        w.family("gateway_checkpoint_age_seconds", "gauge",
                 "Oldest checkpoint of a tracked connection (seconds since it was last updated), by service.",
                 [({"service": s["name"]}, age_max.get(s["name"], 0.0)) for s in services])
        up, admin, bconns = [], [], []
        for s in services:
            for b in s["backends"]:
                lab = {"service": s["name"], "backend": b["name"]}
                up.append((lab, 1 if b["health"].get("state") == "up" else 0))
                admin.append(({**lab, "state": b["admin_state"]}, 1))
                bconns.append((lab, b["connections"]))
        w.family("gateway_backend_up", "gauge", "1 when the backend's health check says up.", up)
        w.family("gateway_backend_admin_state", "gauge", "The backend's administrative state (ready/drain/maint).",
                 admin)
        w.family("gateway_backend_connections", "gauge", "Open connections pinned to the backend.", bconns)
        names = [s["name"] for s in services]
        w.family("gateway_failovers", "counter", "Failovers, by service and reason.",
                 [({"service": s, "reason": r}, n) for (s, r), n in sorted(self.failovers.items())]
                 or [({"service": n, "reason": "manual"}, 0) for n in names])
        w.family("gateway_connections_moved", "counter", "Connections moved to another backend and verified.",
                 [({"service": s}, self.moves.get(s, 0)) for s in names])
        w.family("gateway_divergences", "counter", "Moves stopped because the backup's bytes differed.",
                 [({}, self.events.get("divergence", 0))])
        w.family("gateway_events", "counter", "Events recorded, by kind.",
                 [({"kind": k}, n) for k, n in sorted(self.events.items())])
        verdicts: list[tuple[dict[str, Any], float]] = []
        errors: list[tuple[dict[str, Any], float]] = []
        for qname, q in (st.get("queues") or {}).items():
            for v in ("accepted", "rewritten", "dropped"):
                verdicts.append(({"queue": qname, "verdict": v}, q.get(v, 0)))
            errors.append(({"queue": qname}, q.get("handler_errors", 0)))
        w.family("gateway_packets", "counter", "Packets given a verdict, by queue and verdict.", verdicts)
        w.family("gateway_handler_errors", "counter", "Packets whose handler raised, by queue.", errors)
        queues = (st.get("queues") or {}).items()
        w.family("gateway_queue_enobufs", "counter",
                 "Times the kernel could not deliver queued packets to the appliance (ENOBUFS), by queue.",
                 [({"queue": qn}, q.get("enobufs", 0)) for qn, q in queues])
        w.family("gateway_queue_kernel_drops", "counter",
                 "Packets the kernel dropped for a queue: it was full, or delivery failed; by queue and cause.",
                 [({"queue": qn, "cause": c}, q.get(f"kernel_{c}_dropped", 0)) for qn, q in queues
                  for c in ("queue", "user")])
        fp = st.get("fastpath") or {}
        data, logged = fp.get("data_fast", 0), fp.get("logged", 0)
        w.family("gateway_fastpath_packets", "counter",
                 "Packets the compiled fast path decided (fast: pure ACKs, server data hashed, client data "
                 "logged) or left to the Python engine (python), by reason.",
                 [({"path": "fast", "reason": "ack"}, fp.get("fast", 0) - data - logged),
                  ({"path": "fast", "reason": "server_data"}, data), ({"path": "fast", "reason": "client_data"}, logged)]
                 + [({"path": "python", "reason": r}, fp.get(r, 0))
                    for r in ("no_flow", "not_pure_ack", "not_in_order", "unusual", "stale")])
        w.family("gateway_fastpath_flows", "gauge", "Connections offloaded to the compiled fast path.",
                 [({}, fp.get("flows", 0))])
        dp = st.get("dataplane") or {}
        w.family("gateway_malformed_packets", "counter", "Packets that did not parse as IPv4/TCP.",
                 [({}, dp.get("malformed", 0))])
        w.family("gateway_fenced_drops", "counter", "Packets of an old backend dropped for a moved connection.",
                 [({}, dp.get("fenced_drops", 0))])
        w.family("gateway_delayed_acks", "counter",
                 "Acknowledgments to clients that had to wait for a commit (I1), by what was done.",
                 [({"action": a}, dp.get(f"acks_{a}", 0)) for a in ("held", "clamped", "released")])
        store = gw.store_status() if hasattr(gw, "store_status") else {}
        w.family("gateway_store_commits", "counter", "Group commits of the checkpoint store.",
                 [({"mode": store.get("mode", "memory")}, store.get("batches", 0))])
        base = gw.config.gateway.queue_num
        drops = kernel_queue_drops()
        qd = []
        for i, qname in enumerate(("held", "return", "observed")):
            d = drops.get(base + i)
            if d is not None:
                for why, n in d.items():
                    qd.append(({"queue": qname, "reason": why}, n))
        w.family("gateway_queue_drops", "counter", "Packets the kernel dropped before the appliance saw them.", qd)
        t = st.get("table") or {}
        w.family("gateway_table_refused", "counter", "New connections refused because the table was full.",
                 [({}, t.get("refused_full", 0))])
        lf = st.get("last_failover")
        w.family("gateway_last_failover_duration_seconds", "gauge",
                 "How long the last failover took, from its start to the last connection verified.",
                 [({"service": lf["service"]}, (lf["duration_ms"] or 0) / 1000)] if lf else [])
        if st.get("pair") is not None:
            _replication(w, st["pair"])
        fs = getattr(gw, "failover_stats", None)
        if fs is not None:
            w.histogram("gateway_failover_decision_seconds",
                        "Automatic failovers: from the backend's death as the gateway could know it (first failed "
                        "probe since the last success, or a held FIN/RST) to the failover decision.",
                        [({"service": s, "reason": r}, h) for (s, r), h in sorted(fs.decision.items())])
            w.histogram("gateway_move_first_byte_seconds",
                        "Per moved connection: from the move's start to the first byte of the new backend "
                        "forwarded to the client (replay: or to its verification, if nothing was forwarded by then).",
                        [({"service": s, "mode": m}, h) for (s, m), h in sorted(fs.first_byte.items())])
            w.histogram("gateway_move_catchup_bytes",
                        "Per replay move: the backup's regenerated bytes the client already had, verified and "
                        "suppressed before the client got a new byte.",
                        [({"service": s}, h) for (s,), h in sorted(fs.catchup.items())])
            w.family("gateway_moves", "counter",
                     "Replay moves by strategy: stream (from the first byte), quiescent (from the last finished "
                     "HTTP exchange, nothing regenerated), range (the response in flight range-resumed), full "
                     "(the responses in flight regenerated in full).",
                     [({"service": s, "strategy": k}, n) for (s, k), n in sorted(fs.moves.items())])
            w.family("gateway_regenerated_bytes", "counter",
                     "Server bytes the backups sent again that the old primary had already sent (verified, "
                     "then suppressed or delivered).",
                     [({"service": s}, n) for s, n in sorted(fs.regenerated.items())])
        return w.text()


PAIR_ROLES = ("standby", "taking-over", "active", "fenced")


def _flag(v: Any) -> float:
    return 1.0 if v else 0.0


def _replication(w: _Writer, p: Mapping[str, Any]) -> None:
    """``gateway_replication_*``: the gateway pair (issue 13), from ``PairController.status()``.
    Gauges that mean nothing in the node's role now (a standby's in-sync, a lag not measured) have
    no sample rather than a made-up one."""
    w.family("gateway_replication_role", "gauge",
             "This node's role in the gateway pair (one-hot: standby, taking-over, active, fenced).",
             [({"role": r}, _flag(p.get("role") == r)) for r in PAIR_ROLES])
    w.family("gateway_replication_epoch", "gauge",
             "The epoch this node owns (active) or last knew; it increases at every takeover.",
             [({}, p.get("epoch") or 0)])
    w.family("gateway_replication_eligible", "gauge",
             "1 when keepalived may give this node the role (active, or a standby in sync).",
             [({}, _flag(p.get("eligible")))])
    w.family("gateway_replication_in_sync", "gauge",
             "The standby: 1 when its table is a live replica of the active's (it may take over).",
             [({}, _flag(p["in_sync"]))] if p.get("in_sync") is not None else [])
    w.family("gateway_replication_alone", "gauge",
             "The active: 1 when it commits without the standby's acknowledgment (replication degraded).",
             [({}, _flag(p.get("alone")))])
    w.family("gateway_replication_forwarding", "gauge",
             "1 when this node reads its queues and forwards (the active with a fresh proof of its role).",
             [({}, _flag(p.get("forwarding")))])
    w.family("gateway_replication_degraded", "gauge",
             "1 when the pair does not protect the connections against this gateway's death now.",
             [({}, _flag(p.get("degraded")))])
    w.family("gateway_replication_peer_reachable", "gauge",
             "The active: 1 when the peer's store answered its last check or commit.",
             [({}, _flag(p["peer_reachable"]))] if p.get("peer_reachable") is not None else [])
    lag = p.get("lag") or {}
    w.family("gateway_replication_lag_bytes", "gauge",
             "Replication stream bytes the standby's store has not received yet (its offset behind the active's).",
             [({}, lag["bytes"])] if lag.get("bytes") is not None else [])
    w.family("gateway_replication_lag_ms", "gauge",
             "Milliseconds the standby's table has been behind what the active's store holds (0: caught up).",
             [({}, lag["ms"])] if lag.get("ms") is not None else [])
    c = p.get("counters") or {}
    w.family("gateway_replication_commits", "counter",
             "Group commits of the active: acknowledged by the standby, released alone, or refused by the store.",
             [({"result": "acked"}, c.get("commits_acked", 0)), ({"result": "alone"}, c.get("commits_alone", 0)),
              ({"result": "error"}, c.get("commit_errors", 0))])
    for name, key, help_ in (
            ("takeovers", "takeovers", "Takeovers: this node became the active."),
            ("fenced", "fenced", "Times this node was fenced (a newer epoch owned its connections)."),
            ("resyncs", "resyncs", "Bulk resyncs of this node's store from the active's."),
            ("sync_checks_failed", "sync_checks_failed", "The standby's sync checks that found it not in sync."),
            ("refused", "refused", "Times keepalived made this node master while it was not in sync (refused).")):
        w.family(f"gateway_replication_{name}", "counter", help_, [({}, c.get(key, 0))])
    cu = p.get("commit_us") or {}
    w.family("gateway_replication_commit_seconds", "gauge",
             "Duration of the active's replicated commit (the script and WAIT for the standby), by quantile over "
             "the last commits (up to 2000).",
             [({"quantile": q}, cu[k] / 1e6) for q, k in (("0.5", "p50"), ("0.99", "p99")) if cu.get(k) is not None])
    lt = p.get("last_takeover")
    w.family("gateway_replication_last_takeover_timestamp_seconds", "gauge",
             "When this node last took over (Unix time).",
             [({}, lt["at"])] if lt else [])
    w.family("gateway_replication_last_takeover_duration_seconds", "gauge",
             "How long this node's last takeover took (promotion, table re-attached, queues read).",
             [({}, (lt.get("duration_ms") or 0) / 1000)] if lt else [])
