"""appliance.bench.handler runs every search variant on a connection the data plane really tracks (a
bench that silently measured dropped or untracked packets would flatter the figures)."""

from __future__ import annotations

from appliance.bench import handler
from checkpoint import memsearch


def test_every_variant_runs_and_the_fastest_is_restored() -> None:
    res = handler.handler_bench(size=4000, packets=20, rounds=1)
    assert set(res["variants"]) == {"memfind", "memmem", "bytes.find"}
    assert all(v["segment_us"] > 0 and v["ack_us"] > 0 for v in res["variants"].values())
    assert res["default"] == memsearch.implementation() == "memfind"


def test_the_measured_connection_is_tracked_and_digested() -> None:
    seen = {}
    real = handler.Dataplane

    class Spy(real):  # type: ignore[misc, valid-type]
        def __init__(self, *a: object, **kw: object) -> None:
            super().__init__(*a, **kw)
            seen["dp"] = self

    handler.Dataplane = Spy  # type: ignore[misc]
    try:
        handler._one_run(4000, 10)
    finally:
        handler.Dataplane = real  # type: ignore[misc]
    (rec,) = seen["dp"].connections()
    assert rec.established and rec.server.next_seq == 5001 + 10 * 4000
    assert rec.digest is not None and rec.digest.end == 10 * 4000
    c = seen["dp"].counters
    assert c.untracked == 0 and c.malformed == 0 and c.kernel_rewrites == c.client_packets == 13  # SYN, ACK, GET, 10 ACKs
