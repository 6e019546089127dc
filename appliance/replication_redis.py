"""Checkpoint replication through Redis (issue 13): the gateway side of the pair's transport.

Why Redis: ``appliance.bench.replication`` measured a commit carried by Redis 7 (``MULTI … EXEC``
then ``WAIT 1``) at 60 µs median / 130 µs p99 against 190 / 377 µs for our own TCP stream, so the
issue's rule (an existing engine unless our own stream wins) picks Redis.  Each gateway runs a
``redis-server`` bound to its sync-link address; the active's is the master, the standby's a
replica of it (``REPLICAOF``).  Redis moves the bytes, resends, and does the bulk resync of a node
that rejoins; this module decides what is written and reads it back.

Theory of operation
-------------------
*Active* (:class:`RedisPrimary`).  One commit batch (the ops of
:func:`checkpoint.replication.ops_from_batch`) is one ``EVALSHA`` of :data:`COMMIT_SCRIPT`
pipelined with ``WAIT 1 <timeout_ms>`` (one write, two replies).  The script, atomically:

1. checks ``repl:epoch`` is the caller's epoch (else ``FENCED``: a former master whose store was
   told of a newer epoch writes nothing) and that the new stream id is above ``repl:last``;
2. checks the ops against the stored state (a log append must not leave a hole, a chunk write
   neither) *before writing anything* (a Lua error does not undo earlier writes);
3. appends the batch as the codec's BATCH frame to the stream ``repl:log`` with the id
   ``<epoch>-<seq>`` (monotonic across epochs: the epoch is the major part) and the id of the entry
   before it (``p``): a reader sees a gap as a ``p`` that is not what it applied last;
4. applies the ops to the per-connection keys (below): the keyspace alone rebuilds the table;
5. sets ``repl:last`` to the new id and trims ``repl:log`` to ``MINID repl:applied`` (what the
   standby reported applied) and to at most ``max_entries`` entries.

``WAIT`` answering 0 (no replica acknowledged within the timeout), a lost connection or a timeout
make :meth:`RedisPrimary.commit` return False: the batch is not held by both gateways and the
caller degrades.  On such a failure, if the peer's Redis is known, the primary asks it for its
``repl:epoch``; a higher one raises :class:`Fenced` (a thawed former master learns it lost).

*Standby* (:class:`RedisStandby`) reads its LOCAL replica only.  At start, and whenever the chain
breaks (an entry whose ``p`` is not the id it applied last: the stream was trimmed past it, or the
replica did a full resync onto another history; or an idle stream whose ``repl:last`` is not what
it applied), it rebuilds the table from the keyspace: it reads ``repl:last`` (L0), then every
connection (``SCAN MATCH c:*``, each connection's keys in one ``MULTI``: consistent per
connection, each read at some point after L0), then replays the stream entries after L0 on top.
The ops are positional and idempotent, so applying entries planned before a state was read gives
that state again (the property :mod:`checkpoint.replication` documents); if the stream no longer
holds L0's successor the rebuild starts over.  Then it follows the stream with
``XREAD BLOCK`` from the id it applied, checking the chain, and reports that id to the master
(``SET repl:applied``, on a second connection to the master named by its replica's
``INFO replication``) so the master may trim.

*Roles.*  :func:`promote` (``REPLICAOF NO ONE``, then ``repl:epoch`` raised by
:data:`EPOCH_SCRIPT`, which refuses to lower it) makes a node's Redis the master of a new epoch;
:meth:`RedisStandby.promote` first stops following, drains what its replica holds, promotes, tries
to raise the former master's ``repl:epoch`` too (best effort, short timeout: a live former master
is fenced at once, a frozen one when it thaws and sees the peer), and returns the table to take
over with.  The active proves its role every few tens of milliseconds with :func:`grant` on the
standby's store, which stamps the time of each grant there; :func:`promote` returns how long ago
the last one was, and the new active waits until a lease has passed since (a thawed former active
may still hold that proof until then).  :func:`demote` (``REPLICAOF host port``) turns a node's
Redis into a replica: Redis does the bulk resync; a new :class:`RedisStandby` then rebuilds from
the keyspace.

Key layout (one Redis database, 0)
----------------------------------
::

    repl:epoch      string   the epoch that owns this data (raised by promote, checked by commits)
    repl:last       string   id of the last batch applied to the keys ("0-0": none)
    repl:applied    string   the standby's last applied id (written by the standby on the master)
    repl:granted    string   on a replica only: when (µs, its Redis's clock) it last granted the
                             active a proof of its role (GRANT_SCRIPT; written by the active)
    repl:log        stream   id <epoch>-<seq>, fields f = BATCH frame bytes, p = previous id
    c:<conn>        hash     b: log base; rec: record JSON; fin: "1"; fs: fin_server;
                             mv: move JSON; dm: digest meta JSON; db: digest base;
                             dd: chunks dropped; ds: samples JSON
    l:<conn>        string   the client log bytes from the base (APPEND/SETRANGE; a trim rewrites)
    d:<conn>        list     digest chunks from number dd: "<hex>|<bound>" ("" for None)

RESP client
-----------
:class:`RedisClient` is a minimal RESP2 client on asyncio streams (no dependency): commands are
lists of ``bytes | str | int``, :meth:`RedisClient.pipeline` writes many in one ``write``; replies
are ``str`` (simple string), ``int``, ``bytes | None`` (bulk), ``list | None`` (array) and
:class:`RedisError` values (an error reply, naming the command); a bulk or an array larger than
``max_reply`` bytes / elements is refused; every call has a timeout.  After a timeout or a protocol
error the connection is closed (its replies can no longer be matched to commands) and the next
call reconnects.

    python -m appliance.replication_redis --bench [--batches 20000]

measures a commit through this module (script + WAIT, master and replica on 127.0.0.1): on the
shared 2-CPU development host, 1448-byte batches with the ICI, 20,000 of them: 227 µs median,
771 µs p99 (the raw ``MULTI … EXEC; WAIT`` of the bench: about 60 µs on the same host).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from checkpoint.replication import (
    BATCH,
    MAX_FRAME,
    VERSION,
    Append,
    Batch,
    Digest,
    Forget,
    Move,
    Op,
    Record,
    ReplConn,
    ReplicationError,
    Table,
    Trim,
    _op_json,
    apply_ops,
    decode,
)

log = logging.getLogger(__name__)

Arg = Union[bytes, str, int]
Reply = Union[str, int, bytes, None, "RedisError", list["Reply"]]

STREAM = b"repl:log"
NO_ID = "0-0"
MAX_REPLY = 512 << 20     # the largest bulk (bytes) or array (elements) accepted


# ----- RESP2 client --------------------------------------------------------------------------

class RedisError(Exception):
    """An error reply (``command`` names the command it answered), or a failed exchange."""

    def __init__(self, command: str, message: str) -> None:
        super().__init__(f"redis {command}: {message}")
        self.command = command
        self.message = message


class RedisConnectionError(RedisError, ConnectionError):
    """The connection failed, was closed, timed out or spoke something that is not RESP2."""


class Fenced(RedisError):
    """A newer epoch owns the data: this node must stop committing and forwarding."""


def _arg(a: Arg) -> bytes:
    if isinstance(a, bytes):
        return a
    if isinstance(a, str):
        return a.encode()
    return str(a).encode()


def pack(commands: Sequence[Sequence[Arg]]) -> bytes:
    """RESP2 arrays of bulk strings, one per command."""
    out: list[bytes] = []
    for cmd in commands:
        out.append(b"*%d\r\n" % len(cmd))
        for a in cmd:
            b = _arg(a)
            out += (b"$%d\r\n" % len(b), b, b"\r\n")
    return b"".join(out)


def _name(cmd: Sequence[Arg]) -> str:
    return _arg(cmd[0]).decode(errors="replace").upper() if cmd else "?"


def parse_reply(buf: bytearray | bytes, pos: int, cmd: str, max_reply: int = MAX_REPLY) -> tuple[Reply, int] | None:
    """One RESP2 reply from ``buf[pos:]``: (the reply, the position after it), or None if it is
    not all there yet.  Raises :class:`RedisConnectionError` for what is not RESP2 or too large."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        if len(buf) - pos > 65536:
            raise RedisConnectionError(cmd, "reply line too long")
        return None
    kind, rest = buf[pos:pos + 1], bytes(buf[pos + 1:end])
    nxt = end + 2
    if kind == b"+":
        return rest.decode(errors="replace"), nxt
    if kind == b"-":
        return RedisError(cmd, rest.decode(errors="replace")), nxt
    try:
        n = int(rest)
    except ValueError:
        raise RedisConnectionError(cmd, f"unexpected reply {bytes(buf[pos:end])[:40]!r}") from None
    if kind == b":":
        return n, nxt
    if kind not in (b"$", b"*"):
        raise RedisConnectionError(cmd, f"unexpected reply {bytes(buf[pos:end])[:40]!r}")
    if n < 0:
        return None, nxt
    if n > max_reply:
        raise RedisConnectionError(cmd, f"reply of {n} {'bytes' if kind == b'$' else 'elements'}, "
                                   f"over the limit of {max_reply}")
    if kind == b"$":
        if len(buf) < nxt + n + 2:
            return None
        return bytes(buf[nxt:nxt + n]), nxt + n + 2
    items: list[Reply] = []
    for _ in range(n):
        r = parse_reply(buf, nxt, cmd, max_reply)
        if r is None:
            return None
        item, nxt = r
        items.append(item)
    return items, nxt


class _Request:
    __slots__ = ("names", "replies", "fut")

    def __init__(self, names: list[str], fut: asyncio.Future[list[Reply]]) -> None:
        self.names = names
        self.replies: list[Reply] = []
        self.fut = fut


class _Protocol(asyncio.Protocol):
    """The connection: replies are parsed as they arrive and matched, in order, to requests."""

    def __init__(self, max_reply: int) -> None:
        self.max_reply = max_reply
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.pending: deque[_Request] = deque()
        self.lost: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        pos = 0
        try:
            while self.pending:
                req = self.pending[0]
                while len(req.replies) < len(req.names):
                    r = parse_reply(self.buf, pos, req.names[len(req.replies)], self.max_reply)
                    if r is None:
                        break
                    reply, pos = r
                    req.replies.append(reply)
                if len(req.replies) < len(req.names):
                    break
                self.pending.popleft()
                if not req.fut.done():
                    req.fut.set_result(req.replies)
            if not self.pending and len(self.buf) > pos:
                raise RedisConnectionError("?", "a reply nobody asked for")
        except RedisConnectionError as exc:
            self._fail(exc)
            if self.transport is not None:
                self.transport.close()
            return
        if pos:
            del self.buf[:pos]

    def _fail(self, exc: RedisConnectionError) -> None:
        self.lost = exc.message
        while self.pending:
            req = self.pending.popleft()
            if not req.fut.done():
                req.fut.set_exception(RedisConnectionError(req.names[0] if req.names else "?", exc.message))

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RedisConnectionError("?", f"connection lost ({exc or 'closed by the server'})"))


class RedisClient:
    """A minimal async RESP2 client (see the module docstring): one connection; requests (a
    request may be a pipeline) are answered in order; reconnects on the next call after a
    failure.  A request that times out closes the connection."""

    def __init__(self, host: str, port: int, *, timeout: float = 1.0, max_reply: int = MAX_REPLY) -> None:
        self.host, self.port = host, port
        self.timeout = timeout
        self.max_reply = max_reply
        self._p: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None

    @property
    def connected(self) -> bool:
        return self._p is not None and self._p.lost is None

    async def _proto(self) -> _Protocol:
        p = self._p
        if p is not None and p.lost is None and p.transport is not None and not p.transport.is_closing():
            return p
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            p = self._p
            if p is not None and p.lost is None and p.transport is not None and not p.transport.is_closing():
                return p
            loop = asyncio.get_running_loop()
            try:
                _, proto = await loop.create_connection(lambda: _Protocol(self.max_reply), self.host, self.port)
            except OSError as exc:
                raise RedisConnectionError("connect", f"{self.host}:{self.port}: {exc}") from None
            self._p = proto
            return proto

    def close(self) -> None:
        p, self._p = self._p, None
        if p is not None and p.transport is not None:
            p.transport.close()

    async def aclose(self) -> None:
        self.close()
        await asyncio.sleep(0)

    async def pipeline(self, commands: Sequence[Sequence[Arg]], timeout: float | None = None) -> list[Reply]:
        """Send every command in one write; their replies, in order (error replies as
        :class:`RedisError` values).  Raises :class:`RedisConnectionError` on a failure of the
        connection or after ``timeout`` seconds (default: the client's); the connection is then
        closed."""
        names = [_name(c) for c in commands]
        t = self.timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(t):
                p = await self._proto()
                assert p.transport is not None
                fut: asyncio.Future[list[Reply]] = asyncio.get_running_loop().create_future()
                p.pending.append(_Request(names, fut))
                p.transport.write(pack(commands))
                return await fut
        except TimeoutError:
            self.close()
            raise RedisConnectionError(names[0] if names else "?", f"no reply within {t} s") from None
        except RedisConnectionError:
            self.close()
            raise
        except asyncio.CancelledError:
            self.close()        # cancelled mid-exchange: later replies would go to the wrong request
            raise

    async def execute(self, *cmd: Arg, timeout: float | None = None) -> Reply:
        """One command; an error reply raises it."""
        (reply,) = await self.pipeline([cmd], timeout)
        if isinstance(reply, RedisError):
            raise reply
        return reply


def _str(v: Reply) -> str | None:
    if v is None:
        return None
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, (str, int)):
        return str(v)
    raise RedisError("reply", f"expected a string, got {v!r:.80}")


def parse_info(text: Reply) -> dict[str, str]:
    """``INFO``'s ``key:value`` lines."""
    out: dict[str, str] = {}
    for line in (_str(text) or "").splitlines():
        if ":" in line and not line.startswith("#"):
            k, v = line.split(":", 1)
            out[k] = v.strip()
    return out


def id_tuple(sid: str) -> tuple[int, int]:
    a, _, b = sid.partition("-")
    return int(a), int(b or 0)


# ----- scripts -------------------------------------------------------------------------------

COMMIT_SCRIPT = r"""
-- ARGV: epoch, seq, frame, max_entries, then ops (see appliance/replication_redis.py: _script_ops)
local epoch, seq = ARGV[1], ARGV[2]
local cur = redis.call('GET', 'repl:epoch')
if cur ~= epoch then
  return redis.error_reply('FENCED epoch ' .. tostring(cur) .. ' owns this store, not ' .. epoch)
end
local id = epoch .. '-' .. seq
local last = redis.call('GET', 'repl:last') or '0-0'
local le, ls = string.match(last, '^(%d+)-(%d+)$')
le, ls = tonumber(le), tonumber(ls)
local ne, ns = tonumber(epoch), tonumber(seq)
if ne < le or (ne == le and ns <= ls) then
  return redis.error_reply('STALE batch ' .. id .. ' is not after ' .. last)
end

local initial = {}     -- per connection: the stored state before this batch (read once)
local function run(write)
  local st = {}
  local function get(c)
    local s = st[c]
    if s == nil then
      local i0 = initial[c]
      if i0 == nil then
        local h = redis.call('HMGET', 'c:' .. c, 'b', 'dd')
        i0 = {base = tonumber(h[1] or '0'), len = redis.call('STRLEN', 'l:' .. c),
              dd = tonumber(h[2] or '0'), nch = redis.call('LLEN', 'd:' .. c)}
        initial[c] = i0
      end
      s = {base = i0.base, len = i0.len, dd = i0.dd, nch = i0.nch}
      st[c] = s
      if write then redis.call('HSETNX', 'c:' .. c, 'b', '0') end
    end
    return s
  end
  local i = 5
  local n = #ARGV
  while i <= n do
    local op, c = ARGV[i], ARGV[i + 1]
    local ck, lk, dk = 'c:' .. c, 'l:' .. c, 'd:' .. c
    if op == 'F' then
      if st[c] == nil and initial[c] == nil then initial[c] = {base = 0, len = 0, dd = 0, nch = 0} end
      st[c] = {base = 0, len = 0, dd = 0, nch = 0, fresh = true}
      if write then redis.call('DEL', ck, lk, dk) end
      i = i + 2
    else
      local s = get(c)
      if write and s.fresh then
        redis.call('HSETNX', ck, 'b', '0')
        s.fresh = nil
      end
      if op == 'R' then
        if write then redis.call('HSET', ck, 'rec', ARGV[i + 2]) end
        i = i + 3
      elseif op == 'L' then
        local off, fin, fs, data = tonumber(ARGV[i + 2]), ARGV[i + 3], ARGV[i + 4], ARGV[i + 5]
        if off > s.base + s.len then
          return redis.error_reply('HOLE connection ' .. c .. ': bytes at ' .. off .. ', the log ends at '
                                   .. (s.base + s.len))
        end
        local skip = math.max(0, s.base - off)
        local dlen = #data - skip
        if dlen > 0 then
          local at = off + skip - s.base
          if write then redis.call('SETRANGE', lk, at, string.sub(data, skip + 1)) end
          s.len = math.max(s.len, at + dlen)
        end
        if write and fin == '1' then
          redis.call('HSET', ck, 'fin', '1')
          if fs ~= '' then redis.call('HSET', ck, 'fs', fs) end
        end
        i = i + 6
      elseif op == 'T' then
        local b = tonumber(ARGV[i + 2])
        if b > s.base then
          local cut = b - s.base
          if write then
            if cut >= s.len then
              redis.call('DEL', lk)
            else
              redis.call('SET', lk, redis.call('GETRANGE', lk, cut, -1))
            end
            redis.call('HSET', ck, 'b', b)
          end
          s.len = math.max(0, s.len - cut)
          s.base = b
        end
        i = i + 3
      elseif op == 'D' then
        local meta, db, dd, first, cnt = ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], tonumber(ARGV[i + 5]),
                                         tonumber(ARGV[i + 6])
        local samples = ARGV[i + 7 + cnt]
        if write and meta ~= '' then redis.call('HSET', ck, 'dm', meta) end
        if db ~= '' then
          if write then redis.call('HSET', ck, 'db', db) end
          local d = tonumber(dd)
          if d > s.dd then
            if write then
              redis.call('LTRIM', dk, d - s.dd, -1)
              redis.call('HSET', ck, 'dd', d)
            end
            s.nch = math.max(0, s.nch - (d - s.dd))
            s.dd = d
          end
        end
        if cnt > 0 then
          if first > s.dd + s.nch then
            return redis.error_reply('HOLE connection ' .. c .. ': chunk ' .. first .. ', ' .. (s.dd + s.nch)
                                     .. ' held')
          end
          for k = math.max(0, s.dd - first), cnt - 1 do
            local idx = first + k - s.dd
            local el = ARGV[i + 7 + k]
            if idx < s.nch then
              if write then redis.call('LSET', dk, idx, el) end
            else
              if write then redis.call('RPUSH', dk, el) end
              s.nch = s.nch + 1
            end
          end
        end
        if write and samples ~= '' then redis.call('HSET', ck, 'ds', samples) end
        i = i + 8 + cnt
      elseif op == 'M' then
        if write then
          if ARGV[i + 2] == '' then redis.call('HDEL', ck, 'mv') else redis.call('HSET', ck, 'mv', ARGV[i + 2]) end
        end
        i = i + 3
      else
        return redis.error_reply('BADOP ' .. tostring(op))
      end
    end
  end
  return nil
end

local err = run(false)
if err then return err end
redis.call('XADD', 'repl:log', id, 'f', ARGV[3], 'p', last)
run(true)
redis.call('SET', 'repl:last', id)
local applied = redis.call('GET', 'repl:applied')
if applied then redis.call('XTRIM', 'repl:log', 'MINID', applied) end
local cap = tonumber(ARGV[4])
if cap > 0 then redis.call('XTRIM', 'repl:log', 'MAXLEN', cap) end
return id
"""

EPOCH_SCRIPT = r"""
-- ARGV[1]: the new epoch; refuses to lower or repeat it.  Returns {the epoch it replaces,
-- microseconds since this store last granted the former active a proof of its role (GRANT_SCRIPT),
-- or -1: no grant recorded}; the grant's mark is deleted (a master holds none: a replica's full
-- resync never brings back an old one)
local cur = tonumber(redis.call('GET', 'repl:epoch') or '0')
local new = tonumber(ARGV[1])
if new <= cur then return redis.error_reply('FENCED epoch ' .. cur .. ' is not below ' .. new) end
redis.call('SET', 'repl:epoch', ARGV[1])
local g = redis.call('GET', 'repl:granted')
redis.call('DEL', 'repl:granted')
if not g then return {cur, -1} end
local t = redis.call('TIME')
local age = tonumber(t[1] .. string.format('%06d', tonumber(t[2]))) - tonumber(g)
if age < 0 then age = 0 end
return {cur, age}
"""

GRANT_SCRIPT = r"""
-- ARGV[1]: the asking active's epoch.  The active's heartbeat on its peer's store (a replica,
-- written locally: replica-read-only no): returns the epoch stored here, and when that is not
-- above the asker's (the answer is a proof of its role for a lease from when it asked) stamps
-- the time of the grant, by this Redis's clock, for EPOCH_SCRIPT: a takeover waits it out
local cur = tonumber(redis.call('GET', 'repl:epoch') or '0')
if cur <= tonumber(ARGV[1]) then
  local t = redis.call('TIME')
  redis.call('SET', 'repl:granted', t[1] .. string.format('%06d', tonumber(t[2])))
end
return cur
"""


def _sha(script: str) -> str:
    return hashlib.sha1(script.encode()).hexdigest()


async def _evalsha(client: RedisClient, script: str, args: Sequence[Arg], *, extra: Sequence[Sequence[Arg]] = (),
                   timeout: float | None = None) -> list[Reply]:
    """EVALSHA (loading the script on NOSCRIPT), pipelined with ``extra`` commands."""
    sha = _sha(script)
    for attempt in (0, 1):
        replies = await client.pipeline([["EVALSHA", sha, 0, *args], *extra], timeout)
        r0 = replies[0]
        if isinstance(r0, RedisError) and r0.message.startswith("NOSCRIPT") and attempt == 0:
            await client.execute("SCRIPT", "LOAD", script, timeout=timeout)
            continue
        return replies
    raise AssertionError("unreachable")


def _script_error(reply: Reply, what: str) -> None:
    if isinstance(reply, RedisError):
        if reply.message.startswith("FENCED"):
            raise Fenced(what, reply.message)
        raise reply


def _j(v: object) -> str:
    return json.dumps(v, separators=(",", ":"), allow_nan=False)


_FRAME_HEAD = struct.Struct(">IBBI")


def batch_frame(epoch: int, seq: int, ops: Sequence[Op]) -> tuple[bytes, list[Arg]]:
    """The codec's BATCH frame (lease null; byte for byte what ``encode(Batch(...))`` gives) and
    the commit script's arguments, serialising each record's state once for both."""
    parts: list[str] = []
    body: list[bytes] = []
    args: list[Arg] = []
    for op in ops:
        if isinstance(op, Record):
            sj = _j(op.state)
            parts.append('{"op":"record","conn":%d,"state":%s}' % (op.conn, sj))
            args += ("R", op.conn, sj)
        elif isinstance(op, Append):
            parts.append(_j({"op": "log", "conn": op.conn, "off": op.off, "len": len(op.data), "fin": op.fin,
                             "fin_server": op.fin_server}))
            body.append(op.data)
            args += script_ops([op])
        else:
            parts.append(_j(_op_json(op, body)))
            args += script_ops([op])
    header = ('{"epoch":%d,"seq":%d,"lease":null,"ops":[%s]}' % (epoch, seq, ",".join(parts))).encode()
    size = 6 + len(header) + sum(len(b) for b in body)
    if size > MAX_FRAME:
        raise ReplicationError("BATCH", f"frame of {size} bytes, over {MAX_FRAME}")
    return b"".join([_FRAME_HEAD.pack(size, VERSION, BATCH, len(header)), header, *body]), args


def script_ops(ops: Sequence[Op]) -> list[Arg]:
    """The ops as the commit script's arguments."""
    out: list[Arg] = []
    for op in ops:
        if isinstance(op, Forget):
            out += ("F", op.conn)
        elif isinstance(op, Record):
            out += ("R", op.conn, _j(op.state))
        elif isinstance(op, Append):
            out += ("L", op.conn, op.off, "1" if op.fin else "0",
                    "" if op.fin_server is None else op.fin_server, op.data)
        elif isinstance(op, Trim):
            out += ("T", op.conn, op.base)
        elif isinstance(op, Digest):
            bounds = op.bounds if op.bounds else (None,) * len(op.chunks)
            els = [("" if c is None else c.hex()) + "|" + ("" if b is None else str(b))
                   for c, b in zip(op.chunks, bounds)]
            out += ("D", op.conn, "" if op.meta is None else _j(op.meta),
                    "" if op.base is None else op.base[0], "" if op.base is None else op.base[1],
                    op.first, len(els), *els,
                    "" if op.samples is None else _j([[o, n, h.hex()] for o, n, h in op.samples]))
        else:
            out += ("M", op.conn, "" if op.state is None else _j(op.state))
    return out


def conn_from_keys(h: dict[bytes, bytes], logb: bytes | None, chunks: Sequence[bytes]) -> ReplConn:
    """One connection's keys (``c:``, ``l:``, ``d:``) as the table entry they describe."""
    rc = ReplConn()
    if b"rec" in h:
        rc.record = json.loads(h[b"rec"])
    rc.log_base = int(h.get(b"b", b"0"))
    rc.log = bytearray(logb or b"")
    rc.fin = h.get(b"fin") == b"1"
    rc.fin_server = int(h[b"fs"]) if b"fs" in h else None
    if b"mv" in h:
        rc.move = json.loads(h[b"mv"])
    if b"dm" in h:
        rc.digest_meta = json.loads(h[b"dm"])
    rc.digest_base = int(h.get(b"db", b"0"))
    rc.digest_dropped = int(h.get(b"dd", b"0"))
    for el in chunks:
        c, _, b = el.partition(b"|")
        rc.chunks.append(bytes.fromhex(c.decode()) if c else None)
        rc.bounds.append(int(b) if b else None)
    if b"ds" in h:
        rc.samples = [(o, n, bytes.fromhex(x)) for o, n, x in json.loads(h[b"ds"])]
    return rc


def _pairs(v: Reply) -> dict[bytes, bytes]:
    if not isinstance(v, list):
        raise RedisError("HGETALL", f"unexpected reply {v!r:.80}")
    it = iter(v)
    return {k: x for k, x in zip(it, it) if isinstance(k, bytes) and isinstance(x, bytes)}


# ----- roles ---------------------------------------------------------------------------------

async def promote(client: RedisClient, new_epoch: int) -> float | None:
    """Make this Redis a master (``REPLICAOF NO ONE``) owned by ``new_epoch``; raises
    :class:`Fenced` if it already knows that epoch or a higher one.  Returns the seconds since
    this store last granted the former active a proof of its role (:func:`grant`), None when it
    holds no record of one: the new active forwards only once a lease has passed since then."""
    await client.execute("REPLICAOF", "NO", "ONE")
    (r,) = await _evalsha(client, EPOCH_SCRIPT, [new_epoch])
    _script_error(r, "promote")
    if isinstance(r, list) and len(r) == 2 and isinstance(r[1], int) and r[1] >= 0:
        return r[1] / 1e6
    return None


DURABILITY = [["INFO", "persistence"], ["CONFIG", "GET", "appendfsync"]]


def not_durable(persistence: Reply, appendfsync: Reply) -> str | None:
    """Why a Redis does not keep every write on disk before it answers (the replies to
    :data:`DURABILITY`), or None when it does (``[pair] disk``: an append-only file, fsynced on
    every write: Redis writes and fsyncs it before it sends its replies)."""
    for r in (persistence, appendfsync):
        if isinstance(r, RedisError):
            return f"cannot say whether it is durable ({r.message})"
    info = parse_info(persistence)
    fsync = _str(appendfsync[1]) if isinstance(appendfsync, list) and len(appendfsync) == 2 else None
    if info.get("aof_enabled") != "1" or fsync != "always":
        return (f"does not fsync every write (appendonly {'yes' if info.get('aof_enabled') == '1' else 'no'}, "
                f"appendfsync {fsync}): run it with appendonly yes and appendfsync always")
    if info.get("aof_rewrite_scheduled") == "1" or info.get("aof_last_write_status", "ok") != "ok":
        return f"cannot write its append-only file now (last write: {info.get('aof_last_write_status')})"
    return None


async def grant(client: RedisClient, epoch: int, extra: Sequence[Sequence[Arg]] = ()) -> tuple[int, list[Reply]]:
    """The active (of ``epoch``) asks its peer's store for a proof of its role: the epoch stored
    there (a higher one fences the asker), the grant stamped there when it is a proof
    (:data:`GRANT_SCRIPT`); ``extra`` commands pipelined after it, their replies returned."""
    replies = await _evalsha(client, GRANT_SCRIPT, [epoch], extra=extra)
    r = replies[0]
    if isinstance(r, RedisError):
        raise r
    if not isinstance(r, int):
        raise RedisError("grant", f"unexpected reply {r!r}")
    return r, replies[1:]


async def fence_peer(host: str, port: int, epoch: int, timeout: float = 0.2) -> bool:
    """Best effort: raise the peer Redis's ``repl:epoch`` to ``epoch`` (its own commits then
    fail with FENCED).  True if it is now fenced (or knew a higher epoch already)."""
    c = RedisClient(host, port, timeout=timeout)
    try:
        (r,) = await _evalsha(c, EPOCH_SCRIPT, [epoch])
        return not isinstance(r, RedisError) or r.message.startswith("FENCED")
    except RedisError:
        return False
    finally:
        await c.aclose()


async def demote(client: RedisClient, master_host: str, master_port: int) -> None:
    """Make this Redis a replica of the master (Redis does the bulk resync)."""
    await client.execute("REPLICAOF", master_host, master_port)


# ----- the active side -----------------------------------------------------------------------

class RedisPrimary:
    """The active gateway's end: commits batches into its (master) Redis, synchronously with the
    replica through ``WAIT 1``.  See the module's theory of operation."""

    def __init__(self, host: str, port: int, epoch: int, *, wait_ms: int = 500, max_entries: int = 100_000,
                 peer: tuple[str, int] | None = None, timeout: float | None = None) -> None:
        if epoch < 1:
            raise ValueError("an active epoch is >= 1")
        self.epoch = epoch
        self.wait_ms = wait_ms
        self.max_entries = max_entries
        self.peer = peer
        self.client = RedisClient(host, port, timeout=timeout if timeout is not None else wait_ms / 1000 + 0.5)
        self.last_id: str | None = None
        self.acked = 0
        self.unacked = 0
        self.last_error: str | None = None

    async def close(self) -> None:
        await self.client.aclose()

    async def commit(self, seq: int, ops: Sequence[Op], epoch: int | None = None, wait_ms: int | None = None,
                     check_peer: bool = True) -> bool:
        """Write one batch and wait for the replica; True when the replica holds it.  False: not
        acknowledged within ``wait_ms`` (or this Redis unreachable): the caller degrades.
        Raises :class:`Fenced` when a newer epoch owns the data (here or at the peer), and
        :class:`RedisError` for a batch the stored state refuses (a hole: resync).  ``wait_ms``:
        this commit's wait instead of the default (a node committing alone only probes);
        ``check_peer``: ask the peer's epoch when the replica did not answer (a node that already
        commits alone has its heartbeat do that, off the commit path)."""
        epoch = self.epoch if epoch is None else epoch
        wait = self.wait_ms if wait_ms is None else max(1, wait_ms)
        frame, ops_args = batch_frame(epoch, seq, ops)
        args: list[Arg] = [epoch, seq, frame, self.max_entries, *ops_args]
        try:
            replies = await _evalsha(self.client, COMMIT_SCRIPT, args, extra=[["WAIT", 1, wait]])
        except RedisConnectionError as exc:
            self.last_error = str(exc)
            self.unacked += 1
            if check_peer:
                await self._check_peer()
            return False
        _script_error(replies[0], "commit")
        self.last_id = _str(replies[0])
        n = replies[1]
        if isinstance(n, RedisError):
            raise n
        if not isinstance(n, int) or n < 1:
            self.unacked += 1
            self.last_error = f"WAIT: no replica acknowledged {self.last_id} within {wait} ms"
            if check_peer:
                await self._check_peer()
            return False
        self.acked += 1
        return True

    async def _check_peer(self) -> None:
        if self.peer is None:
            return
        c = RedisClient(*self.peer, timeout=0.2)
        try:
            e = await c.execute("GET", "repl:epoch")
        except RedisError:
            return
        finally:
            await c.aclose()
        theirs = int(_str(e) or 0)
        if theirs > self.epoch:
            raise Fenced("commit", f"the peer holds epoch {theirs} (ours {self.epoch})")

    async def replicas(self) -> dict[str, str]:
        """``INFO replication`` of this (master) Redis."""
        return parse_info(await self.client.execute("INFO", "replication"))


# ----- the standby side ----------------------------------------------------------------------

@dataclass
class StandbyStatus:
    applied: str                # the id of the last batch in the table
    in_sync: bool
    link_up: bool               # the replica's master_link_status
    local_last: str | None      # repl:last in the local replica
    master_last: str | None     # repl:last at the master (None: not reachable)
    lag_bytes: int | None       # master_repl_offset - the replica's offset (None: master not reachable)
    lag_ms: float               # how long the table has been behind what the master holds (0: in sync)
    rebuilds: int
    at: float                   # time.monotonic() of this status


class RedisStandby:
    """The standby gateway's live table, fed from its local Redis replica (see the theory of
    operation).  ``start()``; read :attr:`table`, :attr:`applied`, :meth:`status`; at takeover
    :meth:`promote`; ``stop()``."""

    def __init__(self, host: str, port: int, *, block_ms: int = 100, report_interval: float = 0.05,
                 count: int = 512, timeout: float = 2.0) -> None:
        self.host, self.port = host, port
        self.block_ms = block_ms
        self.report_interval = report_interval
        self.count = count
        self.reader = RedisClient(host, port, timeout=timeout + block_ms / 1000)
        self.query = RedisClient(host, port, timeout=timeout)
        self.master: RedisClient | None = None
        self.table: Table = {}
        self.applied = NO_ID
        self.rebuilds = 0
        self.need_rebuild = True
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._reported: str | None = None
        self._report_at = 0.0
        self._caught_up_at = time.monotonic()
        self._changed = asyncio.Event()
        # set by promote: seconds since this store last granted the former active a proof of its
        # role (None: no record of one, so the new active waits a whole lease)
        self.granted_ago: float | None = None

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"redis-standby-{self.port}")

    async def stop(self) -> None:
        t, self._task = self._task, None
        if t is not None:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        for c in (self.reader, self.query, self.master):
            if c is not None:
                await c.aclose()

    async def _run(self) -> None:
        backoff = 0.01
        while True:
            try:
                if self.need_rebuild:
                    await self.rebuild()
                await self._follow_once()
                backoff = 0.01
            except (RedisError, ReplicationError, ValueError) as exc:
                self.last_error = str(exc)
                log.debug("standby: %s", exc)
                self.need_rebuild = self.need_rebuild or isinstance(exc, ReplicationError)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 0.5)
            await self._report()

    async def rebuild(self) -> None:
        """The table from the keyspace, then the stream entries after the snapshot's id."""
        c = self.reader
        while True:
            l0 = _str(await c.execute("GET", "repl:last")) or NO_ID
            table: Table = {}
            cursor = b"0"
            while True:
                r = await c.execute("SCAN", cursor, "MATCH", "c:*", "COUNT", 1000)
                assert isinstance(r, list) and len(r) == 2 and isinstance(r[0], bytes) and isinstance(r[1], list)
                cursor, keys = r[0], [k for k in r[1] if isinstance(k, bytes)]
                for i in range(0, len(keys), 64):
                    await self._read_conns(c, [int(k[2:]) for k in keys[i:i + 64]], table)
                if cursor == b"0":
                    break
            entries = await c.execute("XRANGE", STREAM, f"({l0}" if l0 != NO_ID else "-", "+")
            try:
                applied = self._apply_entries(table, l0, entries)
            except _Gap:
                continue        # trimmed past L0 meanwhile: read again
            self.table, self.applied = table, applied
            self.need_rebuild = False
            self.rebuilds += 1
            self._changed.set()
            return

    async def _read_conns(self, c: RedisClient, cids: list[int], table: Table) -> None:
        cmds: list[list[Arg]] = []
        for cid in cids:
            cmds += [["MULTI"], ["HGETALL", f"c:{cid}"], ["GET", f"l:{cid}"], ["LRANGE", f"d:{cid}", 0, -1], ["EXEC"]]
        replies = await c.pipeline(cmds)
        for k, cid in enumerate(cids):
            ex = replies[5 * k + 4]
            if not isinstance(ex, list) or len(ex) != 3:
                raise RedisError("EXEC", f"unexpected reply {ex!r:.80}")
            h, logb, chunks = ex
            hd = _pairs(h)
            if not hd:
                continue        # forgotten between SCAN and here
            if not isinstance(chunks, list) or not (logb is None or isinstance(logb, bytes)):
                raise RedisError("EXEC", "unexpected reply")
            table[cid] = conn_from_keys(hd, logb, [x for x in chunks if isinstance(x, bytes)])

    def _apply_entries(self, table: Table, applied: str, entries: Reply) -> str:
        """Apply XRANGE/XREAD entries in order, checking the chain; returns the new applied id."""
        if not isinstance(entries, list):
            raise RedisError("XRANGE", f"unexpected reply {entries!r:.80}")
        for e in entries:
            if not (isinstance(e, list) and len(e) == 2 and isinstance(e[0], bytes) and isinstance(e[1], list)):
                raise RedisError("XRANGE", f"unexpected entry {e!r:.80}")
            sid = e[0].decode()
            fields = _pairs(e[1])
            prev = fields.get(b"p", b"").decode()
            if prev != applied:
                raise _Gap(f"entry {sid} follows {prev}, applied {applied}")
            frame = decode(fields[b"f"])
            if not isinstance(frame, Batch):
                raise ReplicationError("stream", f"entry {sid} is not a BATCH")
            apply_ops(table, frame.ops)
            applied = sid
        return applied

    async def _follow_once(self) -> None:
        r = await self.reader.execute("XREAD", "COUNT", self.count, "BLOCK", self.block_ms, "STREAMS", STREAM,
                                      self.applied)
        if r is None:
            last = _str(await self.reader.execute("GET", "repl:last")) or NO_ID
            if last != self.applied:
                # nothing after what we applied, yet the keys say otherwise: trimmed or another history
                self.need_rebuild = True
            else:
                self._caught_up_at = time.monotonic()
            return
        if not (isinstance(r, list) and len(r) == 1 and isinstance(r[0], list) and len(r[0]) == 2):
            raise RedisError("XREAD", f"unexpected reply {r!r:.80}")
        try:
            self.applied = self._apply_entries(self.table, self.applied, r[0][1])
        except _Gap as exc:
            self.last_error = str(exc)
            self.need_rebuild = True
        self._changed.set()

    async def _master_client(self) -> RedisClient | None:
        info = parse_info(await self.query.execute("INFO", "replication"))
        if info.get("role") != "slave":
            return None
        host, port = info.get("master_host"), int(info.get("master_port", "0"))
        if self.master is None or (self.master.host, self.master.port) != (host, port):
            if self.master is not None:
                await self.master.aclose()
            self.master = RedisClient(host or "", port, timeout=0.5) if host else None
        return self.master

    async def _report(self) -> None:
        now = time.monotonic()
        if self.applied == self._reported or now < self._report_at or self.need_rebuild:
            return
        self._report_at = now + self.report_interval
        try:
            m = await self._master_client()
            if m is not None:
                await m.execute("SET", "repl:applied", self.applied)
                self._reported = self.applied
        except RedisError as exc:
            self.last_error = f"report: {exc}"

    async def wait_applied(self, sid: str, timeout: float = 5.0) -> None:
        """Until the table holds the batch ``sid`` (or a later one)."""
        deadline = time.monotonic() + timeout
        want = id_tuple(sid)
        while self.need_rebuild or id_tuple(self.applied) < want:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"standby applied {self.applied}, waiting for {sid} ({self.last_error})")
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.05))

    async def status(self) -> StandbyStatus:
        now = time.monotonic()
        rep, last = await self.query.pipeline([["INFO", "replication"], ["GET", "repl:last"]])
        info = parse_info(rep)
        local_last = _str(last) if not isinstance(last, RedisError) else None
        link_up = info.get("role") == "slave" and info.get("master_link_status") == "up"
        master_last: str | None = None
        lag_bytes: int | None = None
        try:
            m = await self._master_client()
            if m is not None and link_up:
                mrep, mlast = await m.pipeline([["INFO", "replication"], ["GET", "repl:last"]])
                master_last = None if isinstance(mlast, RedisError) else _str(mlast) or NO_ID
                lag_bytes = int(parse_info(mrep).get("master_repl_offset", "0")) - int(
                    info.get("slave_repl_offset", "0"))
        except RedisError as exc:
            self.last_error = f"status: {exc}"
        in_sync = (link_up and not self.need_rebuild and (local_last or NO_ID) == self.applied
                   and master_last == self.applied)
        if in_sync:
            self._caught_up_at = now
        return StandbyStatus(self.applied, in_sync, link_up, local_last, master_last, lag_bytes,
                             0.0 if in_sync else (now - self._caught_up_at) * 1000, self.rebuilds, now)

    async def promote(self, new_epoch: int, *, fence_timeout: float = 0.2, fence: bool = True) -> tuple[Table, str]:
        """Take over: stop following, make the local Redis the master of ``new_epoch``, bring the
        table up to everything the replica holds, fence the former master (best effort).  Returns
        the table and the id it reflects; the caller then commits through a
        :class:`RedisPrimary` of ``new_epoch`` (with any seq)."""
        t, self._task = self._task, None
        if t is not None:
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        info = parse_info(await self.query.execute("INFO", "replication"))
        old = (info["master_host"], int(info["master_port"])) if info.get("role") == "slave" else None
        # no more replication: the data is final; when did this store last prove the old active's role?
        self.granted_ago = await promote(self.query, new_epoch)
        if self.need_rebuild:
            await self.rebuild()
        entries = await self.query.execute("XRANGE", STREAM, f"({self.applied}" if self.applied != NO_ID else "-", "+")
        try:
            self.applied = self._apply_entries(self.table, self.applied, entries)
        except _Gap:
            await self.rebuild()
        if old is not None and fence:
            await fence_peer(*old, new_epoch, timeout=fence_timeout)
        for c in (self.reader, self.master):
            if c is not None:
                await c.aclose()
        return self.table, self.applied


class _Gap(Exception):
    pass


# ----- local servers (tests, bench, lab) -----------------------------------------------------

def server_argv(bind: str, port: int, workdir: Path, *, replicaof: tuple[str, int] | None = None,
                redis_server: str = "redis-server", durable: bool = False) -> list[str]:
    """The command line of one gateway's redis-server: memory only (``durable``: every write in an
    append-only file in ``workdir``, fsynced before the reply: ``[pair] disk``), no protected mode
    (bound to the sync link), immediate diskless full sync, quick detection of a dead link."""
    aof = ["--appendonly", "yes", "--appendfsync", "always"] if durable else ["--appendonly", "no"]
    argv = [redis_server, "--bind", bind, "--port", str(port), "--dir", str(workdir), "--save", "",
            *aof, "--protected-mode", "no", "--daemonize", "no", "--logfile", "",
            "--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0", "--repl-timeout", "5",
            "--repl-backlog-size", "64mb",
            # the active stamps its proof-of-role grants on its peer's replica (GRANT_SCRIPT)
            "--replica-read-only", "no"]
    if replicaof is not None:
        argv += ["--replicaof", replicaof[0], str(replicaof[1])]
    return argv


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class LocalRedis:
    """A redis-server on 127.0.0.1 in a temporary directory (tests, the bench)."""

    def __init__(self, replicaof: tuple[str, int] | None = None, port: int | None = None) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="repl-redis-"))
        self.proc = subprocess.Popen(server_argv("127.0.0.1", self.port, self.dir, replicaof=replicaof,
                                                 redis_server=exe),
                                     stdout=open(self.dir / "log", "wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: {(self.dir / 'log').read_text()[-2000:]}")
            time.sleep(0.01)

    @property
    def addr(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)

    def close(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def local_pair() -> Iterator[tuple[LocalRedis, LocalRedis]]:
    """A master and its replica on 127.0.0.1, the replica's initial sync done."""
    m = LocalRedis()
    r: LocalRedis | None = None
    try:
        r = LocalRedis(replicaof=m.addr)
        wait_link(r.port)
        yield m, r
    finally:
        if r is not None:
            r.close()
        m.close()


def commands(port: int, cmds: Sequence[Sequence[Arg]], host: str = "127.0.0.1",
             timeout: float = 2.0) -> list[Reply]:
    """Commands to a redis-server in one write, synchronously (tests, the bench; no event loop):
    their replies, in order."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(pack(cmds))
        buf = bytearray()
        replies: list[Reply] = []
        pos = 0
        while True:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
            while len(replies) < len(cmds):
                r = parse_reply(buf, pos, _name(cmds[len(replies)]))
                if r is None:
                    break
                replies.append(r[0])
                pos = r[1]
            if len(replies) == len(cmds):
                return replies


def command(port: int, *cmd: Arg, host: str = "127.0.0.1", timeout: float = 2.0) -> Reply:
    """One command to a redis-server, synchronously."""
    return commands(port, [cmd], host, timeout)[0]


def _info_replication(port: int) -> dict[str, str]:
    return parse_info(command(port, "INFO", "replication", timeout=0.5))


def _probe(port: int) -> bool:
    """A write the replica acknowledges (a fresh replica's first ACK can take a second)."""
    _, n = commands(port, [["INCR", "repl:probe"], ["WAIT", 1, 1000]])
    return isinstance(n, int) and n >= 1


def wait_link(port: int, timeout: float = 10.0) -> None:
    """Until the replica on ``port`` has its master link up and its master counts it online
    (WAIT counts only online replicas) — blocking; tests and bench."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            info = _info_replication(port)
            if info.get("master_link_status") == "up":
                mp = int(info["master_port"])
                if any(k.startswith("slave") and "state=online" in v
                       for k, v in _info_replication(mp).items()) and _probe(mp):
                    return
        if time.monotonic() > deadline:
            raise TimeoutError(f"replica on port {port}: master link not up")
        time.sleep(0.02)


# ----- bench ---------------------------------------------------------------------------------

def _pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


async def bench(master: tuple[str, int], batches: int, warmup: int, log_bytes: int = 1448) -> dict[str, object]:
    """Commit latency through :class:`RedisPrimary`: a ``log_bytes`` append and the connection's
    ICI per batch (what the bench in appliance.bench.replication writes)."""
    from .bench.replication import typical_record

    p = RedisPrimary(*master, epoch=1, wait_ms=1000)
    await promote(p.client, 1)
    record = typical_record(1)
    payload = os.urandom(log_bytes)
    lat: list[float] = []
    unacked = 0
    seq = 0
    for i in range(warmup + batches):
        record["last_seen"] = time.time()
        seq += 1
        t0 = time.perf_counter()
        ok = await p.commit(seq, [Record(1, record), Append(1, i * log_bytes, payload)])
        t1 = time.perf_counter()
        unacked += not ok
        if i >= warmup:
            lat.append(t1 - t0)
        if i % 256 == 255:      # keep the log bounded as the store's trims would (not measured)
            seq += 1
            await p.commit(seq, [Trim(1, (i + 1) * log_bytes)])
    await p.close()
    us = [x * 1e6 for x in lat]
    return {"batches": batches, "log_bytes": log_bytes, "median_us": round(statistics.median(us), 1),
            "p90_us": round(_pct(us, 90), 1), "p99_us": round(_pct(us, 99), 1),
            "p999_us": round(_pct(us, 99.9), 1), "max_us": round(max(us), 1), "unacked": unacked}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Commit latency through Redis (master + replica on 127.0.0.1)")
    ap.add_argument("--bench", action="store_true", required=True)
    ap.add_argument("--batches", type=int, default=20_000)
    ap.add_argument("--warmup", type=int, default=1_000)
    a = ap.parse_args(argv)
    with local_pair() as (m, _r):
        print(json.dumps(asyncio.run(bench(m.addr, a.batches, a.warmup)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
