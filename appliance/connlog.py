"""A log line per connection when it ends, and one per failover and per move.

Theory of operation
-------------------
:class:`ConnLog` is one of the gateway's ``closed_listeners``: when a connection is over it
writes one line saying who the client was, which service and which backends served it (in
order), when it started, how long it lasted, the bytes each way (payload stream lengths, as
the client's sequence numbers count them), whether and how it moved (strategy ``replay`` or
``resume``, the splice's timings), why it ended, and a two-letter **termination state** in the
spirit of HAProxy's:

first letter, who or what ended it:

* ``C`` the client (its FIN came first, or its RST)
* ``S`` the server (its FIN came first, or its RST)
* ``G`` the gateway reset it (the API's reset, a failed move, a refused resume)
* ``D`` the gateway reset it on a divergence (the backup's bytes differed)
* ``U`` the gateway reset it at a failover: it was unprotected (log overflow, picked up mid-stream)
* ``I`` it was idle past its state's timeout and forgotten
* ``E`` it was evicted from a full table, or replaced by a new connection from the same client port
* ``-`` unknown (both sides closed and the packets that say who was first are gone)

second letter, how or when:

* ``F`` closed by FINs
* ``R`` ended by a RST
* ``T`` by a timeout
* ``M`` while a move of it was under way (started, not yet verified)
* ``-`` nothing more to say (evicted)

So a download the client closes is ``CF``, one reset from the API ``GR``, a divergence ``DM``.

Formats: ``text`` (one line, ``key=value`` pairs after a fixed prefix; see README, "Connection
log") or ``json`` (one object per line).  Destinations: ``stdout`` (the journal under systemd),
a ``file`` (``[log] path``), or ``off``.  Writing never blocks the packets' loop: the loop only
puts the record on a bounded queue (``logging.handlers.QueueHandler``); a thread
(``QueueListener``) formats nothing and writes the lines.  When the queue is full the line is
dropped and counted (``dropped``), never waited for.
"""

from __future__ import annotations

import asyncio
import json
import logging
import logging.handlers
import queue
import sys
import time
from typing import Any, TextIO

from . import history as history_mod
from . import packetring

QUEUE_SIZE = 65536


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int((t % 1) * 1000):03d}Z"


class _Dropping(logging.handlers.QueueHandler):
    """A QueueHandler that never waits and never prints a traceback: a full queue drops the line."""

    def __init__(self, q: queue.Queue[Any]) -> None:
        super().__init__(q)
        self.dropped = 0

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record  # the message is the finished line already

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1


def termination_state(doc: dict[str, Any], why: str, events: list[dict[str, Any]], first_fin: str | None) -> str:
    """The two letters (see the module's doc)."""
    kinds = {e["kind"] for e in events}
    in_move = _in_move(doc, events)
    rst_from = doc.get("rst_from")
    if why == "idle":
        return "I" + ("M" if in_move else "T")
    if why in ("evicted", "replaced"):
        return "E" + ("M" if in_move else "-")
    if "divergence" in kinds:
        first = "D"
    elif any(e["kind"] == "reset" and str(e.get("reason", "")).startswith("unprotected") for e in events):
        first = "U"
    elif rst_from == "gateway":
        first = "G"
    elif rst_from in ("client", "server"):
        first = rst_from[0].upper()
    else:
        fin_c, fin_s = doc.get("client_fin_seq") is not None, doc.get("server_fin_seq") is not None
        if first_fin in ("client", "server"):
            first = first_fin[0].upper()
        elif fin_c != fin_s:
            first = "C" if fin_c else "S"
        else:
            first = "-"
    if in_move:
        second = "M"
    elif rst_from is not None or why == "reset":
        second = "R"
    else:
        second = "F"
    return first + second


def _in_move(doc: dict[str, Any], events: list[dict[str, Any]]) -> bool:
    """A move of it was under way when it ended: a failed or unfinished splice, or one not verified."""
    for e in events:
        d = e.get("details") or {}
        if e["kind"] == "divergence" or d.get("phase") == "FAILED" or d.get("outcome") == "ended":
            return True
    m = doc.get("move")
    if m:
        if m.get("phase") in ("CONNECTING", "REPLAYING"):
            return True
        if m.get("phase") == "SPLICED" and (m.get("verified") or 0) < (m.get("to_verify") or 0):
            return True
    return False


def moves_of(doc: dict[str, Any], events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each move of a connection: to which backend, how (replay or resume), outcome and timings."""
    out = []
    for e in events:
        d = e.get("details") or {}
        if e["kind"] not in ("migration", "divergence", "reset") or e.get("connection") != doc.get("id"):
            continue
        if e["kind"] == "reset" and "phase" not in d:
            continue  # a plain reset, not a move's end
        if d.get("outcome") in ("repinned", "reset"):
            continue
        if "phase" not in d and "timings_ms" not in d and d.get("outcome") == "moved":
            continue  # the manual migration's request: its splice reports the move itself
        strategy = "replay" if "phase" in d else d.get("mode", "resume")
        out.append({"to": e.get("backend"), "from": d.get("from"), "strategy": strategy,
                    "outcome": e["kind"] if e["kind"] != "migration" else d.get("outcome", e.get("reason")),
                    "timings_ms": d.get("timings_ms") or d.get("timings") or {},
                    "replay": d.get("strategy"), "regenerated_bytes": d.get("regenerated_bytes")})
    if not out and doc.get("moves") and doc.get("move"):
        m = doc["move"]
        out.append({"to": m.get("to"), "from": m.get("from"), "strategy": "replay", "outcome": m.get("phase"),
                    "timings_ms": m.get("timings_ms") or {}, "replay": m.get("strategy"),
                    "regenerated_bytes": m.get("regenerated_bytes")})
    return out


def connection_record(doc: dict[str, Any], why: str, events: list[dict[str, Any]],
                      first_fin: str | None) -> dict[str, Any]:
    """The JSON form of a connection's line."""
    start = doc.get("created")
    end = doc.get("closed_at")
    moves = moves_of(doc, events)
    return {
        "type": "connection",
        "time": _iso(end),
        "id": doc.get("id"),
        "client": doc.get("client"),
        "service": doc.get("service_name"),
        "frontend": doc.get("service"),
        "backends": doc.get("backends") or [doc.get("backend")],
        "start": _iso(start),
        "duration_s": None if start is None or end is None else round(end - start, 3),
        "bytes_from_client": doc.get("bytes_from_client"),
        "bytes_from_server": doc.get("bytes_from_server"),
        "moved": bool(doc.get("moves")),
        "moves": moves,
        "why": why,
        "termination_state": termination_state(doc, why, events, first_fin),
        "state": doc.get("state"),
        "rst_from": doc.get("rst_from"),
        "protected": doc.get("protected"),
    }


def event_record(ev: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON form of a failover's or a move's line (None for other events)."""
    d = ev.get("details") or {}
    if ev["kind"] == "failover":
        return {"type": "failover", "time": _iso(ev["time"]), "event": ev["id"], "service": ev.get("service"),
                "from": d.get("from"), "to": ev.get("backend"), "reason": ev.get("reason"),
                "mode": d.get("mode", "replay"), "moved": len(d.get("moved", ())),
                "reset": len(d.get("reset", ())), "repinned": len(d.get("repinned", ()))}
    if ev["kind"] in ("migration", "divergence") or (ev["kind"] == "reset" and "phase" in d):
        if d.get("outcome") in ("repinned",):
            return None
        if "phase" not in d and "timings_ms" not in d and d.get("outcome") == "moved":
            return None  # the manual request; the splice's own event follows
        return {"type": "move", "time": _iso(ev["time"]), "event": ev["id"], "connection": ev.get("connection"),
                "service": ev.get("service"), "from": d.get("from"), "to": ev.get("backend"),
                "strategy": "replay" if "phase" in d else d.get("mode", "resume"),
                "outcome": ev["kind"] if ev["kind"] != "migration" else d.get("outcome", ev.get("reason")),
                "timings_ms": d.get("timings_ms") or d.get("timings") or {},
                "replay": d.get("strategy"), "regenerated_bytes": d.get("regenerated_bytes")}
    return None


def _text_value(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (list, tuple)):
        return ">".join(_text_value(x) for x in v) or "-"
    if isinstance(v, dict):
        return ",".join(f"{k}:{_text_value(x)}" for k, x in v.items()) or "-"
    s = str(v)
    return s.replace(" ", "_") if s else "-"


def text_line(r: dict[str, Any]) -> str:
    """``<time> <type> key=value ...``: values without spaces, lists joined with ``>``."""
    if r["type"] == "connection":
        mv = ";".join(f"{m['strategy']}:{m['from'] or '-'}>{m['to'] or '-'}:{m['outcome']}"
                      + "".join(f":{k}={v}" for k, v in (m["timings_ms"] or {}).items()) for m in r["moves"]) or "-"
        head = (f"{r['time']} conn {r['id']} {r['client']} {r['service']}/{_text_value(r['backends'])} "
                f"{r['termination_state']}")
        fields = {"start": r["start"], "duration": r["duration_s"], "up": r["bytes_from_client"],
                  "down": r["bytes_from_server"], "moved": r["moved"], "moves": mv, "why": r["why"],
                  "state": r["state"]}
        return head + " " + " ".join(f"{k}={_text_value(v)}" for k, v in fields.items())
    rest = {k: v for k, v in r.items() if k not in ("type", "time")}
    return f"{r['time']} {r['type']} " + " ".join(f"{k}={_text_value(v)}" for k, v in rest.items())


class ConnLog:
    def __init__(self, gw: Any, connections: str = "stdout", fmt: str = "text", path: str | None = None,
                 stream: TextIO | None = None) -> None:
        self.gw = gw
        self.fmt = fmt
        self.lines = 0
        self.listener: logging.handlers.QueueListener | None = None
        self.handler: _Dropping | None = None
        self._task: asyncio.Task[None] | None = None
        if connections == "off":
            return
        target: logging.Handler
        if connections == "file":
            if not path:
                raise ValueError("log.path is required with log.connections = 'file'")
            target = logging.handlers.WatchedFileHandler(path)  # reopened after logrotate moves it
        else:
            target = logging.StreamHandler(stream or sys.stdout)
        target.setFormatter(logging.Formatter("%(message)s"))
        q: queue.Queue[Any] = queue.Queue(QUEUE_SIZE)
        self.handler = _Dropping(q)
        self.logger = logging.getLogger(f"appliance.connlog.{id(self)}")
        self.logger.propagate = False
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self.handler)
        self.listener = logging.handlers.QueueListener(q, target)
        self.listener.start()
        gw.closed_listeners.append(self.on_closed)

    @property
    def dropped(self) -> int:
        return self.handler.dropped if self.handler is not None else 0

    def emit(self, r: dict[str, Any]) -> None:
        if self.handler is None:
            return
        line = json.dumps(r, separators=(",", ":"), default=str) if self.fmt == "json" else text_line(r)
        self.logger.info(line)
        self.lines += 1

    # --- connections (on the loop, at the batch the connection ended in) ---------------------------
    def on_closed(self, rec: Any, why: str, now: float) -> None:
        h = history_mod.of(self.gw)
        entry = h.entries.get(rec.id) if h is not None else None
        if entry is not None and entry.doc.get("closed_at") == now:  # the history took it already
            doc, events, first_fin = entry.doc, entry.events, entry.first_fin
        else:
            doc = self.gw._connection_doc(rec, now)
            doc["closed_at"] = now
            events = history_mod.timeline(self.gw, rec.id)
            doc["backends"] = history_mod.backends_of(self.gw, rec, doc, events)
            ring = packetring.of(self.gw)
            first_fin = ring.first_fin(rec) if ring is not None else None
        self.emit(connection_record(doc, why, events, first_fin))

    # --- failovers and moves ---------------------------------------------------------------------
    def on_event(self, ev: dict[str, Any]) -> None:
        r = event_record(ev)
        if r is not None:
            self.emit(r)

    async def follow_events(self) -> None:
        """Write a line per failover and per move, as the event log gets them (a task on the loop)."""
        q = self.gw.events.subscribe()
        try:
            while True:
                ev = await q.get()
                self.on_event(ev.to_dict())
        finally:
            self.gw.events.unsubscribe(q)

    def start(self) -> None:
        """Follow the event log from the running loop."""
        if self.handler is not None:
            self._task = asyncio.get_running_loop().create_task(self.follow_events())

    def close(self) -> None:
        """Write what is queued and stop the thread."""
        if self._task is not None:
            self._task.cancel()
        if self.listener is not None:
            self.listener.stop()
            self.listener = None
        if self.handler is not None:
            self.logger.removeHandler(self.handler)


def attach(gw: Any, stream: TextIO | None = None) -> ConnLog:
    """A connection log from ``gw.config.log`` (after :func:`appliance.history.attach`, so the
    history's entry is at hand when the line is written)."""
    lc = gw.config.log
    cl = ConnLog(gw, lc.connections, lc.format, lc.path, stream=stream)
    gw.connlog = cl
    return cl
