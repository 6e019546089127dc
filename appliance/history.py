"""Connection history: what the gateway keeps of a connection once it is over.

Theory of operation
-------------------
The data plane says once when a connection is over (``ConnectionClosed``: closed, reset, idle,
evicted, replaced); the gateway passes it to its ``closed_listeners``, on its loop, at the batch the
connection ended in.  :class:`History` is one of them.  It keeps a :class:`ClosedConnection`:

* the final document (``Gateway._connection_doc``) with ``"closed": true``, ``"closed_at"`` and
  ``"why"``, and ``"backends"``: the backends that served it, in order;
* its timeline: the events naming it, and the failovers that list it in their details (``moved``,
  ``reset``, ``repinned``).  Events that name it after it closed (the API's reset is recorded
  just after the reset itself) are added while they are in the event log;
* its moves: the document's ``move`` (the last splice: phase, ``timings_ms``, counters) and the
  migration events' details (each move's timings);
* its last packets: a copy of the packet ring's pcap for it (:mod:`appliance.packetring`), taken
  at close time, since the ring forgets a flow when a newer one needs the room.

The history is bounded by count (``[history] max_connections``) and by bytes
(``max_bytes``: the pcap copies plus the JSON size of document and timeline); the oldest
entry is dropped first, and ``dropped`` / ``dropped_bytes`` count what was.

Finding a connection's events without scanning the whole event log at every close: the
history follows the log incrementally (``_catch_up``: the events added since the last one it
read), keeps each live connection's events in an index, and hands them to the entry when the
connection closes.  Ids that are not in the table and were not named
for a minute leave the index (unknown ids; its close drains in the batch it happened in).

A closed connection may stay in the live table until it expires (``finished`` timeout).  The
API shows every connection once: the history's entry once it is closed, else the live record
(:func:`connection_doc`, :func:`connections_page`).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from checkpoint.addr import pack, with_port

from . import packetring
from .events import FAILOVER_LISTS, names_connection
from .connfilter import record_matches

INDEX_GRACE = 60.0  # seconds an id outside the table keeps its indexed events (its close may be pending)


@dataclass(slots=True)
class ClosedConnection:
    id: int
    doc: dict[str, Any]                         # the final document, "closed": true
    events: list[dict[str, Any]] = field(default_factory=list)  # its timeline, oldest first
    pcap: bytes = b""
    size: int = 0                               # what it counts against max_bytes
    first_fin: str | None = None                # "client" or "server": who sent the first FIN seen

    @property
    def moved(self) -> bool:
        return bool(self.doc.get("moves"))

    def timeline(self) -> list[dict[str, Any]]:
        return list(self.events)

    def moves(self) -> list[dict[str, Any]]:
        """Each move's details, oldest first: from the migration events (timings_ms when a splice
        reported it), and the last splice's state from the document."""
        return [e["details"] | {"event": e["id"], "time": e["time"], "to": e.get("backend"), "reason": e["reason"]}
                for e in self.events if e["kind"] == "migration"]


class History:
    def __init__(self, gw: Any, max_connections: int = 10000, max_bytes: int = 64 << 20) -> None:
        self.gw = gw
        self.max_connections = max_connections
        self.max_bytes = max_bytes
        self.entries: OrderedDict[int, ClosedConnection] = OrderedDict()
        self.bytes = 0
        self.recorded = 0
        self.dropped = 0           # entries dropped for the bounds, oldest first
        self.dropped_bytes = 0
        self._seen = 0             # the last event id read
        self._index: dict[int, list[Any]] = {}  # live connection id -> its events (Event objects)

    # --- following the event log -------------------------------------------------------------
    def _new_events(self) -> list[Any]:
        log = self.gw.events
        ring = getattr(log, "_events", None)
        if ring is None:  # another log type: the public, slower way
            return list(log.list(since_id=self._seen, limit=None))
        out = []
        for ev in reversed(ring):
            if ev.id <= self._seen:
                break
            out.append(ev)
        out.reverse()
        return out

    def _catch_up(self) -> None:
        new = self._new_events()
        if not new:
            return
        self._seen = new[-1].id
        for ev in new:
            ids: list[int] = []
            if ev.connection is not None:
                ids.append(ev.connection)
            if ev.kind == "failover":
                for k in FAILOVER_LISTS:
                    ids.extend(i for i in ev.details.get(k, ()) if isinstance(i, int) and i not in ids)
            for cid in ids:
                entry = self.entries.get(cid)
                if entry is not None:  # named after it closed (the API's reset event)
                    if all(e["id"] != ev.id for e in entry.events):
                        entry.events.append(ev.to_dict())
                else:  # a live connection (or one closing in this batch)
                    self._index.setdefault(cid, []).append(ev)

    # --- the listener --------------------------------------------------------------------------
    def on_closed(self, rec: Any, why: str, now: float) -> None:
        gw = self.gw
        self._catch_up()
        doc = gw._connection_doc(rec, now)
        doc["closed"] = True
        doc["closed_at"] = now
        doc["why"] = why
        evs = self._index.pop(rec.id, [])
        # failover events list their connections when they are added, but a failover's outcome
        # lists (reset, repinned) are filled in afterwards: check the index's failovers again
        events = [e.to_dict() for e in evs if names_connection(e, rec.id)]
        doc["backends"] = backends_of(gw, rec, doc, events)
        if doc.get("move") is None and doc.get("moves"):
            # its splice ended with it (a failed move, a reset): the move's last report says
            doc["move"] = next((e["details"] for e in reversed(events) if "timings_ms" in e["details"]), None)
        ring = packetring.of(gw)
        pcap = ring.pcap_of(rec) if ring is not None else b""
        first_fin = ring.first_fin(rec) if ring is not None else None
        size = len(pcap) + len(json.dumps([doc, events], default=str))
        old = self.entries.pop(rec.id, None)
        if old is not None:  # the id came back (a restored record): the newer one wins
            self.bytes -= old.size
        self.entries[rec.id] = ClosedConnection(rec.id, doc, events, pcap, size, first_fin)
        self.bytes += size
        self.recorded += 1
        self._trim()

    def _trim(self) -> None:
        while self.entries and (len(self.entries) > self.max_connections or self.bytes > self.max_bytes):
            _, gone = self.entries.popitem(last=False)
            self.bytes -= gone.size
            self.dropped += 1
            self.dropped_bytes += gone.size
        # the index keeps live connections only: ids that are not in the table and were last named
        # a while ago (unknown ids, connections forgotten without a close) go
        if len(self._index) > 2 * max(len(self.gw.dataplane.table), 64):
            table = self.gw.dataplane.table
            stale = self.gw.clock() - INDEX_GRACE
            for cid in [c for c, evs in self._index.items() if table.by_id(c) is None and evs[-1].time < stale]:
                del self._index[cid]

    # --- reads ---------------------------------------------------------------------------------
    def get(self, cid: int) -> ClosedConnection | None:
        self._catch_up()
        return self.entries.get(cid)

    def __iter__(self) -> Iterator[ClosedConnection]:
        return iter(list(self.entries.values()))

    def __len__(self) -> int:
        return len(self.entries)

    def stats(self) -> dict[str, int]:
        return {"connections": len(self.entries), "bytes": self.bytes, "max_connections": self.max_connections,
                "max_bytes": self.max_bytes, "recorded": self.recorded, "dropped": self.dropped,
                "dropped_bytes": self.dropped_bytes}


def backends_of(gw: Any, rec: Any, doc: dict[str, Any], events: list[dict[str, Any]]) -> list[str]:
    """The backends that served a connection, in order: its first one, then each move's target.
    A connection the gateway reset has lost its backend's name (``(reset)``): its address says."""
    path: list[str] = []

    def add(name: Any) -> None:
        if isinstance(name, str) and name and (not path or path[-1] != name):
            path.append(name)

    for e in events if doc.get("moves") else ():  # never moved: a failover may have listed it, then reset it
        d = e.get("details") or {}
        if e["kind"] == "failover" and rec.id in d.get("moved", ()):
            to = e.get("backend")
        elif e["kind"] == "migration" and d.get("outcome") != "repinned":
            to = d.get("to") or e.get("backend")
        else:
            continue
        if not path:  # where it was before its first move
            add(d.get("from"))
        add(to)
    last = doc.get("backend")
    svc = gw.dataplane.services.get(rec.service)
    if svc is not None and last not in svc.backends:
        last = next((b.name for b in svc.backends.values()
                     if doc.get("backend_address") in [with_port(a, b.port) for a in b.addresses]), None)
    add(last)
    return path


def attach(gw: Any) -> History:
    """Give ``gw`` a history (bounds from ``[history]``), told of every closed connection."""
    hc = getattr(gw.config, "history", None)
    h = History(gw, hc.max_connections, hc.max_bytes) if hc is not None else History(gw)
    gw.history = h
    gw.closed_listeners.append(h.on_closed)
    return h


def of(gw: Any) -> History | None:
    return getattr(gw, "history", None)


# --- what the API and the panel read ------------------------------------------------------------
def _closed_doc(entry: ClosedConnection) -> dict[str, Any]:
    return dict(entry.doc)


def connection_doc(gw: Any, cid: int) -> dict[str, Any] | None:
    """One connection's document: the history's once it is closed, else the live record's
    (``"closed": false``), else None (unknown, or forgotten)."""
    h = of(gw)
    if h is not None:
        entry = h.get(cid)
        if entry is not None:
            return _closed_doc(entry)
    doc = gw.connection(cid)
    if doc is not None:
        doc.setdefault("closed", False)
    return doc  # type: ignore[no-any-return]


def timeline(gw: Any, cid: int) -> list[dict[str, Any]]:
    """The connection's events, oldest first: the history's (kept when it closed, and what named
    it later) merged with what the event log still has."""
    seen: dict[int, dict[str, Any]] = {}
    h = of(gw)
    entry = h.get(cid) if h is not None else None
    if entry is not None:
        for e in entry.events:
            seen[e["id"]] = e
    for e in gw.events.list(connection=cid, limit=None):  # (failovers that name it included)
        seen.setdefault(e.id, e.to_dict())
    return [seen[k] for k in sorted(seen)]


def pcap(gw: Any, cid: int) -> bytes | None:
    """A closed connection's pcap as kept at close time; None: it is not in the history (or no
    packet ring recorded it)."""
    h = of(gw)
    entry = h.get(cid) if h is not None else None
    return entry.pcap if entry is not None and entry.pcap else None


def connections_page(gw: Any, q: str | None = None, state: str | None = None, service: str | None = None,
                     backend: str | None = None, protected: bool | None = None, open_only: bool = False,
                     offset: int = 0, limit: int = 50, closed: bool | None = None,
                     moved: bool | None = None) -> tuple[int, list[dict[str, Any]]]:
    """A filtered page of every connection known, live and closed, each once, in id order.
    ``closed``: only closed ones (True) or only open ones (False); ``moved``: moved at least once."""
    h = of(gw)
    if h is None:
        if closed:
            return 0, []
        total, page = gw.connections_page(q, state, service, backend, protected, open_only, offset, limit)
        if moved is not None:  # without a history: filter what the page holds
            page = [c for c in page if bool(c.get("moves")) == moved]
        return total, page
    h._catch_up()
    live: list[Any] = []
    if not closed:
        for rec in gw.dataplane.table:
            if rec.id in h.entries:
                continue
            if moved is not None and bool(rec.moves) != moved:
                continue
            live.append(rec)
    old: list[ClosedConnection] = []
    if closed is not False and not open_only:
        old = [e for e in h.entries.values() if moved is None or e.moved == moved]
    found: list[tuple[int, Any]] = [(rec.id, rec) for rec in live
                                    if record_matches(rec, q, state, service, backend, protected, open_only)]
    ql = q.lower() if q else None
    st = state.upper() if state else None
    for e in old:
        d = e.doc
        if st and d["state"] != st:
            continue
        if service and service not in (d.get("service_name"), d.get("service")):
            continue
        if backend and backend != d.get("backend") and backend not in d.get("backends", ()):
            continue
        if protected is not None and bool(d.get("protected")) != protected:
            continue
        if ql and not any(ql in str(d.get(k, "")).lower() for k in (
                "id", "client", "service", "service_name", "backend", "backend_address", "state", "why", "family")):
            continue
        found.append((e.id, e))
    found.sort(key=lambda x: x[0])
    now = gw.clock()
    out = []
    for _, item in found[offset:offset + limit]:
        if isinstance(item, ClosedConnection):
            out.append(_closed_doc(item))
        else:
            d = gw._connection_doc(item, now)
            d["closed"] = False
            out.append(d)
    return len(found), out


def client_key(rec: Any) -> tuple[bytes, int]:
    """(client address as 4 or 16 bytes, client port): the packet ring's key."""
    return pack(rec.client_ip), rec.client_port
