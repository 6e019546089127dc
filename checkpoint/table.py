"""The connection table: every tracked connection, bounded in size and time.

Theory of operation
-------------------
Records are keyed by the client-side 4-tuple (client ip, client port, VIP,
service port), which is what a connection is called on the wire the client
sees and stays its name across failovers.  The table keeps records in
least-recently-seen order (an ``OrderedDict`` moved to the end on each
segment), so expiry and eviction look at the oldest first.

* Timeouts (seconds, from ``Timeouts``) depend on the state: a half-open
  handshake, an idle established connection, one closing (FIN seen), and one
  finished (TIME_WAIT or reset).  ``expire(now)`` removes the records past
  theirs and returns them.
* ``max_connections`` bounds the table.  When a new connection would exceed it
  one record is evicted to make room, in this order:

  1. the least recently seen *finished* record (TIME_WAIT / CLOSED), counted
     in ``evicted``;
  2. else the *oldest half-open* record (SYN_SENT / SYN_RECV: the client has
     not completed the handshake), oldest by **creation** time, counted in
     ``early_drops`` (conntrack's "early drop" of unassured entries);
  3. else the new connection is refused (``admit`` returns None, counted in
     ``refused_full``).

  An ESTABLISHED or closing connection is never evicted: that would drop a
  live connection's protection.  Without step 2 a flood of spoofed SYNs
  larger than the table filled it with handshakes nobody completes and every
  new connection was refused until they expired.  Half-open records go in
  creation order, not last-seen order, because last-seen does not tell a
  real handshake from a spoofed one: the backend retransmits its SYN-ACK to
  a spoofed source and so refreshes that record as often as a real one.  A
  real client completes its handshake within a round trip, so the handshake
  that has been pending longest is the likeliest to be dead; a real client
  whose record was dropped retransmits its SYN, which is admitted afresh.
  Creation order also costs nothing to keep: a record is appended once.

  Eviction is O(1) amortised, never a scan of the table: two side indexes,
  ``_finished`` (least recently seen first) and ``_opening`` (oldest first),
  are kept by ``admit``/``restore``/``observe``/removal.  A record only ever
  leaves the half-open states and never returns to them, and finished states
  are final, so an index entry is added once and dropped once.  Entries made
  stale by a caller that changes ``rec.state`` directly (not through
  ``observe``) are checked and skipped when met; such a caller may call
  ``reindex(rec)``, and ``expire`` (a scan anyway) picks up finished records
  the index missed.
* A SYN (without ACK) for a key whose record is finished starts a new
  incarnation: the old record is replaced.

No I/O and no clock: ``now`` is passed in.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterator

from .ici import ConnectionRecord, TcpState
from .segment import ACK, RST, SYN, SegmentLike
from .tracker import observe

Key = tuple[str, int, str, int]
FINISHED = (TcpState.TIME_WAIT, TcpState.CLOSED)
CLOSING = (TcpState.FIN_WAIT, TcpState.CLOSE_WAIT, TcpState.LAST_ACK)
OPENING = (TcpState.SYN_SENT, TcpState.SYN_RECV)


@dataclass(slots=True)
class Timeouts:
    opening: float = 30.0       # SYN_SENT / SYN_RECV
    established: float = 3600.0  # idle ESTABLISHED
    closing: float = 120.0      # FIN_WAIT / CLOSE_WAIT / LAST_ACK
    finished: float = 10.0      # TIME_WAIT / CLOSED

    def for_state(self, state: TcpState) -> float:
        if state in FINISHED:
            return self.finished
        if state in CLOSING:
            return self.closing
        if state in OPENING:
            return self.opening
        return self.established


class ConnectionTable:
    def __init__(self, max_connections: int = 65536, timeouts: Timeouts | None = None) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self.max_connections = max_connections
        self.timeouts = timeouts or Timeouts()
        self._by_key: OrderedDict[Key, ConnectionRecord] = OrderedDict()
        self._by_id: dict[int, ConnectionRecord] = {}
        self._next_id = 1
        # told the id of a record whose state or backend changed other than by the tracker, or
        # that left the table (the data plane's offload: appliance.dataplane.offload)
        self.on_change: Callable[[int], None] | None = None
        # Eviction indexes (see the module docstring), keyed by record id.
        self._finished: OrderedDict[int, ConnectionRecord] = OrderedDict()  # least recently seen first
        self._opening: OrderedDict[int, ConnectionRecord] = OrderedDict()   # oldest created first
        # Counters (monotonic, public: the data plane reports them).
        self.refused_full = 0  # new connections refused: full, nothing evictable
        self.evicted = 0       # finished records evicted to make room
        self.early_drops = 0   # half-open (SYN_SENT / SYN_RECV) records evicted to make room
        self._evicted_out: list[ConnectionRecord] = []  # evicted since take_evicted()
        self.expired = 0
        self.created = 0

    def __len__(self) -> int:
        return len(self._by_key)

    def __iter__(self) -> Iterator[ConnectionRecord]:
        return iter(list(self._by_key.values()))

    def get(self, key: Key) -> ConnectionRecord | None:
        return self._by_key.get(key)

    def by_id(self, cid: int) -> ConnectionRecord | None:
        return self._by_id.get(cid)

    def admit(
        self,
        key: Key,
        seg: SegmentLike,
        *,
        service: str,
        backend: str,
        backend_ip: str,
        backend_port: int,
        now: float,
    ) -> ConnectionRecord | None:
        """The record for a client segment of ``key``, creating one when the
        segment may open (or pick up) a connection.  None: not tracked."""
        rec = self._by_key.get(key)
        flags = seg.flags
        is_syn = bool(flags & SYN) and not flags & ACK
        if rec is not None:
            if not (is_syn and rec.client.isn != seg.seq and (rec.state in FINISHED or rec.mid_stream)):
                return rec
            # a new connection on the key: the old one finished, or was only ever picked up
            # mid-stream (a leftover packet of a connection the appliance never saw open: without a
            # log it protects nothing, and folding the new SYN into it would leave the new
            # connection unprotected for life — reset at the next failover)
            self._remove(rec)
        if flags & RST:
            return None  # a RST never opens anything
        if len(self._by_key) >= self.max_connections and not self._evict_one():
            self.refused_full += 1
            return None
        rec = ConnectionRecord(
            id=self._next_id,
            client_ip=key[0],
            client_port=key[1],
            vip=key[2],
            vport=key[3],
            service=service,
            backend=backend,
            backend_ip=backend_ip,
            backend_port=backend_port,
            created=now,
            last_seen=now,
        )
        self._next_id += 1
        self._by_key[key] = rec
        self._by_id[rec.id] = rec
        self._index(rec)
        self.created += 1
        return rec

    def next_id(self) -> int:
        """Reserve an id for a record made elsewhere (an imported checkpoint)."""
        self._next_id += 1
        return self._next_id - 1

    def restore(self, rec: ConnectionRecord) -> bool:
        """Put back a record read from the checkpoint store (its id kept).
        False when its key is taken or the table is full."""
        if rec.key in self._by_key or rec.id in self._by_id or len(self._by_key) >= self.max_connections:
            return False
        self._by_key[rec.key] = rec
        self._by_id[rec.id] = rec
        self._index(rec)
        self._next_id = max(self._next_id, rec.id + 1)
        return True

    def observe(self, rec: ConnectionRecord, seg: SegmentLike, from_client: bool, now: float) -> None:
        observe(rec, seg, from_client, now)
        self._by_key.move_to_end(rec.key)
        self._index(rec)

    def reindex(self, rec: ConnectionRecord) -> None:
        """Tell the table that ``rec.state`` was changed other than by :meth:`observe`
        (so its eviction class may have changed).  O(1)."""
        if self._by_id.get(rec.id) is rec:
            self._index(rec)
        if self.on_change is not None:
            self.on_change(rec.id)

    def touch(self, rec: ConnectionRecord) -> None:
        """``rec`` was seen (a segment folded in elsewhere, without a change of state).  O(1)."""
        self._by_key.move_to_end(rec.key)

    def expire(self, now: float) -> list[ConnectionRecord]:
        gone: list[ConnectionRecord] = []
        for rec in self._by_key.values():
            if now - rec.last_seen >= self.timeouts.for_state(rec.state):
                gone.append(rec)
            elif rec.state in FINISHED and rec.id not in self._finished:
                self._index(rec)  # finished behind the table's back: evictable again
        for rec in gone:
            self._remove(rec)
        self.expired += len(gone)
        return gone

    def _index(self, rec: ConnectionRecord) -> None:
        """File ``rec`` in the eviction index its state belongs to.  O(1)."""
        state = rec.state
        if state in OPENING:
            self._opening.setdefault(rec.id, rec)  # creation order: never moved
            return
        self._opening.pop(rec.id, None)
        if state in FINISHED:
            self._finished[rec.id] = rec
            self._finished.move_to_end(rec.id)  # least recently seen first
        else:
            self._finished.pop(rec.id, None)

    def _evict_one(self) -> bool:
        """Make room for one record: the least recently seen finished record, else
        the oldest half-open one.  False when neither exists.  O(1) amortised: an
        entry found stale is dropped from its index, so each is looked at once."""
        finished, opening, by_id = self._finished, self._opening, self._by_id
        while finished:
            cid, rec = next(iter(finished.items()))
            if by_id.get(cid) is rec and rec.state in FINISHED:
                self._remove(rec)
                self._evicted_out.append(rec)
                self.evicted += 1
                return True
            del finished[cid]
        while opening:
            cid, rec = next(iter(opening.items()))
            if by_id.get(cid) is not rec:
                del opening[cid]
            elif rec.state in OPENING:
                self._remove(rec)
                self._evicted_out.append(rec)
                self.early_drops += 1
                return True
            elif rec.state in FINISHED:  # finished without observe(): still the cheaper victim
                self._remove(rec)
                self._evicted_out.append(rec)
                self.evicted += 1
                return True
            else:  # established or closing without observe(): never evicted
                del opening[cid]
        return False

    def take_evicted(self) -> list[ConnectionRecord]:
        """The records evicted to make room since the last call (their owner forgets them too)."""
        out, self._evicted_out = self._evicted_out, []
        return out

    def drop(self, rec: ConnectionRecord) -> None:
        """Take ``rec`` out of the table (its owner forgets the rest)."""
        self._remove(rec)

    def _remove(self, rec: ConnectionRecord) -> None:
        if self.on_change is not None:
            self.on_change(rec.id)
        self._by_key.pop(rec.key, None)
        self._by_id.pop(rec.id, None)
        self._finished.pop(rec.id, None)
        self._opening.pop(rec.id, None)
