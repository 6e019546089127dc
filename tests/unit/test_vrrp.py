"""keepalived's notify channel: the line parser, the line buffer and the FIFO reader
(a real FIFO in a temporary directory, written as keepalived writes it)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from appliance.vrrp import (
    MAX_LINE,
    FifoReader,
    LineBuffer,
    Notice,
    Refused,
    Scope,
    State,
    Transition,
    parse_line,
)


def test_parse_keepalived_lines() -> None:
    # the exact format of keepalived 2.2.7's vrrp_notify.c: '%s "%s" %s %d\n'
    assert parse_line('INSTANCE "client" MASTER 150\n') == Transition(Scope.INSTANCE, "client", State.MASTER, 150)
    assert parse_line(b'GROUP "lab" BACKUP 0\n') == Transition(Scope.GROUP, "lab", State.BACKUP, 0)
    t = parse_line('INSTANCE "VI_1" MASTER_RX_LOWER_PRI 100')
    assert isinstance(t, Transition) and t.state is State.MASTER_RX_LOWER_PRI and not t.is_role
    for state in ("FAULT", "STOP", "DELETED"):
        t = parse_line(f'GROUP "g" {state} 0')
        assert isinstance(t, Transition) and t.is_role and not t.is_master
    assert parse_line('INSTANCE "x" BACKUP_PRIORITY 255') == Transition(Scope.INSTANCE, "x", State.BACKUP_PRIORITY, 255)


@pytest.mark.parametrize("line, reason", [
    ("", "empty line"),
    ('VS [192.0.2.1]:tcp:80 UP', "not a VRRP line"),
    ('INSTANCE client MASTER 100', "not of the form"),
    ('INSTANCE "client" MASTER', "not of the form"),
    ('INSTANCE "client" MASTER -1', "not of the form"),
    ('INSTANCE "client" MASTER 100 extra', "not of the form"),
    ('INSTANCE "client" LEADER 100', "unknown state 'LEADER'"),
    ('GROUP "lab" MASTER 256', "priority 256 out of 0..255"),
    ('GROUP "two words" MASTER 0', "not of the form"),
    ("INSTANCE \"" + "x" * 600 + "\" MASTER 1", "longer than"),
])
def test_malformed_lines_are_refused_with_a_reason(line: str, reason: str) -> None:
    r = parse_line(line)
    assert isinstance(r, Refused) and reason in r.reason, r


def test_non_ascii_is_refused() -> None:
    r = parse_line(b'GROUP "l\xffb" MASTER 0')
    assert isinstance(r, Refused) and r.reason == "not ASCII"


def test_line_buffer_splits_and_joins_reads() -> None:
    lb = LineBuffer()
    assert lb.feed(b'GROUP "lab" MAS') == []
    assert lb.feed(b'TER 0\nINSTANCE "client" MASTER 101\nINST') == [
        Transition(Scope.GROUP, "lab", State.MASTER, 0), Transition(Scope.INSTANCE, "client", State.MASTER, 101)]
    assert lb.feed(b'ANCE "server" MASTER 101\n') == [Transition(Scope.INSTANCE, "server", State.MASTER, 101)]
    # an overlong line is refused once, skipped up to its newline, and the next line parses
    out = lb.feed(b"x" * (MAX_LINE + 10))
    assert len(out) == 1 and isinstance(out[0], Refused)
    assert lb.feed(b"y" * 3000) == []
    assert lb.feed(b'zzz\nGROUP "lab" FAULT 0\n') == [Transition(Scope.GROUP, "lab", State.FAULT, 0)]
    assert lb.feed(b'GROUP "lab" BAC') == []
    (tail,) = lb.eof()
    assert isinstance(tail, Refused) and "incomplete" in tail.reason
    assert lb.eof() == []


async def _collect(reader: FifoReader, n: int, out: list[Notice]) -> None:
    async for notice in reader:
        out.append(notice)
        if len(out) >= n:
            return


def _writer(path: Path) -> int:
    # as keepalived opens it: read-write, non-blocking (never blocks on a missing reader)
    return os.open(path, os.O_RDWR | os.O_NONBLOCK)


async def _until(pred, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.01)


def test_fifo_reader_survives_writer_restarts_and_garbage(tmp_path: Path) -> None:
    fifo = tmp_path / "vrrp.fifo"
    os.mkfifo(fifo)

    async def main() -> tuple[list[Notice], FifoReader]:
        reader = FifoReader(fifo, min_backoff=0.01, max_backoff=0.05, recheck=0.05)
        out: list[Notice] = []
        task = asyncio.create_task(_collect(reader, 5, out))
        await _until(lambda: reader.opens >= 1)
        w = _writer(fifo)
        os.write(w, b'GROUP "lab" BACKUP 0\nthis is not keepalived\n')
        await _until(lambda: len(out) >= 2)
        os.write(w, b'INSTANCE "client" MAST')  # keepalived dies mid-line
        os.close(w)
        await _until(lambda: reader.writer_gone >= 1 and len(out) >= 3)
        # a new keepalived, a new FIFO at the same path (keepalived unlinks a FIFO it made);
        # the reader may have reopened the old one in between: it notices the new one
        fifo.unlink()
        os.mkfifo(fifo)
        # (keepalived's O_RDWR keeps what it writes in the pipe until a reader comes)
        w = _writer(fifo)
        os.write(w, b'GROUP "lab" MASTER 0\nINSTANCE "client" MASTER 101\n')
        await asyncio.wait_for(task, timeout=5)
        os.close(w)
        reader.close()
        return out, reader

    out, reader = asyncio.run(main())
    assert out[0] == Transition(Scope.GROUP, "lab", State.BACKUP, 0)
    assert isinstance(out[1], Refused) and "not a VRRP line" in out[1].reason
    assert isinstance(out[2], Refused) and "incomplete" in out[2].reason
    assert out[3:] == [Transition(Scope.GROUP, "lab", State.MASTER, 0),
                       Transition(Scope.INSTANCE, "client", State.MASTER, 101)]
    assert reader.refused == 2 and reader.writer_gone >= 1


def test_fifo_reader_waits_for_a_missing_fifo_and_closes(tmp_path: Path) -> None:
    fifo = tmp_path / "later.fifo"

    async def main() -> tuple[list[Notice], FifoReader]:
        reader = FifoReader(fifo, min_backoff=0.01, max_backoff=0.05)
        out: list[Notice] = []
        task = asyncio.create_task(_collect(reader, 10, out))
        await _until(lambda: reader.last_error is not None)
        assert "No such file" in (reader.last_error or "")
        os.mkfifo(fifo)
        await _until(lambda: reader.opens >= 1)
        w = _writer(fifo)
        os.write(w, b'GROUP "lab" FAULT 0\n')
        await _until(lambda: len(out) == 1)
        reader.close()  # ends the iteration although the writer is still there
        await asyncio.wait_for(task, timeout=5)
        os.close(w)
        return out, reader

    out, reader = asyncio.run(main())
    assert out == [Transition(Scope.GROUP, "lab", State.FAULT, 0)]


def test_fifo_reader_does_not_spin_without_a_writer(tmp_path: Path) -> None:
    """A FIFO that never had a writer is not reported readable: the reader opens it once and waits."""
    fifo = tmp_path / "idle.fifo"
    os.mkfifo(fifo)

    async def main() -> FifoReader:
        reader = FifoReader(fifo, min_backoff=0.001, max_backoff=0.001)
        task = asyncio.create_task(_collect(reader, 1, []))
        await _until(lambda: reader.opens >= 1)
        for _ in range(20):  # many event-loop turns
            await asyncio.sleep(0.005)
        reader.close()
        await asyncio.wait_for(task, timeout=5)
        return reader

    reader = asyncio.run(main())
    assert reader.opens == 1 and reader.writer_gone == 0
