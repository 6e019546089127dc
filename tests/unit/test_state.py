"""checkpoint.state: the ICI, byte log and digest as plain JSON, and back, exactly."""

from __future__ import annotations

import copy
import dataclasses
import json
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from checkpoint.ici import ConnectionRecord, HalfConnection, TcpState
from checkpoint.state import (
    EXCLUDED, INT_RANGES, MAX_INT, StateError, digest_from_state, digest_state, log_from_state, log_state,
    record_from_state, record_state,
)
from checkpoint.streamlog import (
    CHUNK, ByteLog, SampledDigest, SampledVerifier, StreamDigest, StreamVerifier,
)

from ._helpers import handshake, make_record

PROP = settings(max_examples=200, deadline=None)


# ----- records built by hypothesis, field by field --------------------------------------

def _int(name: str) -> st.SearchStrategy[int]:
    lo, hi = INT_RANGES.get(name, (0, MAX_INT))
    return st.one_of(st.sampled_from([lo, hi]), st.integers(lo, hi))


finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
ts_sample = st.none() | st.tuples(finite, _int("tsval"))


def half_strategy() -> st.SearchStrategy[HalfConnection]:
    kinds = {
        "int": lambda n: _int(n), "int | None": lambda n: st.none() | _int(n), "bool": lambda n: st.booleans(),
        "tuple[float, int] | None": lambda n: ts_sample,
    }
    return st.builds(HalfConnection, **{f.name: kinds[f.type](f.name) for f in dataclasses.fields(HalfConnection)})


def record_strategy() -> st.SearchStrategy[ConnectionRecord]:
    text = st.text(max_size=20)
    kinds = {
        "int": lambda n: _int(n), "int | None": lambda n: st.none() | _int(n), "bool": lambda n: st.booleans(),
        "float": lambda n: finite, "float | None": lambda n: st.none() | finite, "str": lambda n: text,
        "str | None": lambda n: st.none() | text, "TcpState": lambda n: st.sampled_from(list(TcpState)),
        "HalfConnection": lambda n: half_strategy(),
    }
    return st.builds(ConnectionRecord, **{f.name: kinds[f.type](f.name)
                                          for f in dataclasses.fields(ConnectionRecord) if f.name not in EXCLUDED})


def _plain(v) -> bool:
    """Only the types the brief allows: dict of str/int/float/bool/None/list."""
    if isinstance(v, dict):
        return all(type(k) is str and _plain(x) for k, x in v.items())
    if isinstance(v, list):
        return all(_plain(x) for x in v)
    return v is None or type(v) in (str, int, float, bool)


@PROP
@given(rec=record_strategy())
def test_record_round_trip_is_exact(rec):
    state = record_state(rec)
    assert _plain(state)
    text = json.dumps(state, allow_nan=False)  # strict JSON: no NaN or infinity
    back = record_from_state(json.loads(text))
    assert back == rec
    assert record_state(back) == state


def test_every_field_is_carried_except_log_and_digest():
    """Generic over the dataclass: a field the ICI gains (commit_offset, ...) is carried."""
    rec = make_record()
    handshake(rec, 1000, 5000, now=1.5)
    state = record_state(rec)
    assert set(state) == {f.name for f in dataclasses.fields(ConnectionRecord)} - {"log", "digest"}
    assert set(state["client"]) == {f.name for f in dataclasses.fields(HalfConnection)}
    assert {"commit_offset", "commit_fin"} <= set(state)
    assert state["state"] == "ESTABLISHED" and state["client"]["isn"] == 1000
    assert state["server"]["ts_first"] == [1.5, 7000]  # a tuple becomes a list
    rec.log, rec.digest = ByteLog(100), StreamDigest()
    back = record_from_state(record_state(rec))
    assert back.log is None and back.digest is None
    rec.log = rec.digest = None
    assert back == rec


def _state():
    rec = make_record()
    handshake(rec, 1000, 5000, now=1.0)
    return record_state(rec)


@pytest.mark.parametrize("mutate, field, words", [
    (lambda s: s["server"].__setitem__("wscale", 15), "server.wscale", "expected an integer 0..14 or null"),
    (lambda s: s["server"].__setitem__("wscale", "7"), "server.wscale", "0..14"),
    (lambda s: s["client"].__setitem__("isn", 1 << 32), "client.isn", "0..4294967295"),
    (lambda s: s["client"].__setitem__("isn", -1), "client.isn", "0..4294967295"),
    (lambda s: s.__setitem__("id", True), "id", "integer"),  # a bool is not an integer
    (lambda s: s.__setitem__("vport", 70000), "vport", "0..65535"),
    (lambda s: s.__setitem__("created", float("nan")), "created", "finite"),
    (lambda s: s.__setitem__("created", "now"), "created", "finite number"),
    (lambda s: s.__setitem__("state", "LISTEN"), "state", "ESTABLISHED"),
    (lambda s: s.__setitem__("mid_stream", 0), "mid_stream", "true or false"),
    (lambda s: s.__setitem__("client_ip", None), "client_ip", "string"),
    (lambda s: s["server"].__setitem__("ts_last", [1.0]), "server.ts_last", "[time, tsval]"),
    (lambda s: s["server"].__setitem__("ts_last", [1.0, 2**32]), "server.ts_last[1]", "integer"),
    (lambda s: s.__delitem__("commit_offset"), "commit_offset", "missing"),
    (lambda s: s["client"].__delitem__("mss"), "client.mss", "missing"),
    (lambda s: s.__setitem__("colour", "red"), "colour", "unknown key"),
    (lambda s: s["client"].__setitem__("colour", 1), "client.colour", "unknown key"),
    (lambda s: s.__setitem__("server", []), "server", "expected an object"),
    (lambda s: s.__setitem__("log", None), "log", "unknown key"),  # the log travels separately
])
def test_bad_state_names_the_field(mutate, field, words):
    s = _state()
    mutate(s)
    with pytest.raises(StateError) as e:
        record_from_state(s)
    assert e.value.field == field and str(e.value).startswith(f"{field}: ") and words in str(e.value)


def test_path_prefixes_the_field():
    s = _state()
    s["server"]["wscale"] = 99
    with pytest.raises(StateError, match=r"^connection\.server\.wscale: expected an integer 0\.\.14 or null$"):
        record_from_state(s, "connection")
    with pytest.raises(StateError, match="^state: expected an object"):
        record_from_state([1, 2])


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)


@PROP
@given(data=st.data())
def test_mutated_states_are_read_or_refused_by_field(data):
    """Replace any one value (at any depth) by any JSON value: the result is a record
    or a StateError naming a field, never another exception."""
    s = _state()
    paths = [(k,) for k in s] + [(h, k) for h in ("client", "server") for k in s[h]]
    path = data.draw(st.sampled_from(paths))
    target = s if len(path) == 1 else s[path[0]]
    target[path[-1]] = data.draw(json_values)
    try:
        rec = record_from_state(s)
    except StateError as e:
        assert e.field.split(".")[0].split("[")[0] in s
    else:
        assert record_state(rec) == s  # accepted only as exactly what it says


# ----- the byte log ----------------------------------------------------------------------

def test_log_round_trip():
    log = ByteLog(1000)
    log.add(0, b"hello ")
    log.add(6, b"world")
    log.add(50, b"held aside")  # beyond a gap: not part of the state
    log.fin_offset = None
    st_ = log_state(log)
    assert st_ == {"limit": 1000, "end": 11, "fin_offset": None, "overflow": None}
    back = log_from_state(json.loads(json.dumps(st_)), bytes(log.data))
    assert bytes(back.data) == b"hello world" and back.limit == 1000 and back.end == 11
    assert back.ooo == {} and back.complete
    back.add(11, b"!")  # it keeps working as a log
    assert bytes(back.data) == b"hello world!"

    log.fin_offset = 11
    log.overflow = "client sent more than the log limit (1000 bytes)"
    back = log_from_state(log_state(log), bytes(log.data))
    assert back.fin_offset == 11 and back.overflow == log.overflow and not back.complete


@pytest.mark.parametrize("state, data, field", [
    ({"limit": 10, "end": 3, "fin_offset": None, "overflow": None}, b"ab", "end"),
    ({"limit": 2, "end": 3, "fin_offset": None, "overflow": None}, b"abc", "end"),
    ({"limit": 10, "end": 3, "fin_offset": 2, "overflow": None}, b"abc", "fin_offset"),
    ({"limit": 10, "end": 3, "fin_offset": None}, b"abc", "overflow"),
    ({"limit": "10", "end": 3, "fin_offset": None, "overflow": None}, b"abc", "limit"),
    ({"limit": 10, "end": 3, "fin_offset": None, "overflow": None, "ooo": {}}, b"abc", "ooo"),
])
def test_bad_log_state_names_the_field(state, data, field):
    with pytest.raises(StateError) as e:
        log_from_state(state, data, "log")
    assert e.value.field == f"log.{field}"


# ----- digests ---------------------------------------------------------------------------

def test_stream_digest_round_trip_then_keeps_hashing():
    rng = random.Random(11)
    data = rng.randbytes(3 * CHUNK + 777)
    cut = 2 * CHUNK + 100
    d = StreamDigest(("http-date",))
    d.add(0, data[:cut])
    s = digest_state(d)
    assert s["kind"] == "stream" and s["end"] == cut and len(s["chunks"]) == 2
    assert s["partial"] == d.snapshot().partial.hex() and s["volatile"] == ["http-date"]
    back = digest_from_state(json.loads(json.dumps(s)))
    assert isinstance(back, StreamDigest) and back.chunks == d.chunks and back.end == cut
    assert back.volatile == ("http-date",)
    back.add(cut, data[cut:])
    snap = back.snapshot()
    assert snap.chunks[:2] == tuple(d.chunks) and snap.chunks[2] is None  # the chunk it was in is blind
    v = StreamVerifier(snap)
    assert v.add(0, data) and v.done and v.unverified_bytes == CHUNK
    # state of a blind digest carries the None chunk and no partial while blind
    again = digest_state(back)
    assert again["chunks"][2] is None and again["partial"] is not None  # past the blind chunk again
    mid = digest_from_state(s)
    mid.add(cut, data[cut:cut + 10])
    assert digest_state(mid)["partial"] is None


def test_sampled_digest_round_trip():
    rng = random.Random(12)
    data = rng.randbytes(100000)
    d = SampledDigest()
    for pos in range(0, len(data), 10000):
        d.add(pos, data[pos:pos + 4000], 10000)
    s = digest_state(d)
    assert s["kind"] == "sampled" and len(s["samples"]) == 10 and s["stride"] == 1
    back = digest_from_state(json.loads(json.dumps(s)))
    assert isinstance(back, SampledDigest)
    assert back.samples == d.samples and back.end == d.end and back.stride == d.stride
    assert SampledVerifier(back.snapshot()).add(0, data)
    bad = bytearray(data)
    bad[30000 + 100] ^= 1
    assert not SampledVerifier(back.snapshot()).add(0, bytes(bad))


def _stream_state():
    d = StreamDigest()
    d.add(0, bytes(CHUNK + 5))
    return digest_state(d)


def _sampled_state():
    d = SampledDigest()
    d.add(0, bytes(200), 1000)
    d.add(1000, bytes(200), 1000)
    return digest_state(d)


@pytest.mark.parametrize("make, mutate, field", [
    (_stream_state, lambda s: s.__setitem__("kind", "md5"), "digest.kind"),
    (_stream_state, lambda s: s.__setitem__("chunks", []), "digest.chunks"),
    (_stream_state, lambda s: s["chunks"].__setitem__(0, "zz" * 16), "digest.chunks[0]"),
    (_stream_state, lambda s: s["chunks"].__setitem__(0, "ab"), "digest.chunks[0]"),
    (_stream_state, lambda s: s.__setitem__("partial", 5), "digest.partial"),
    (_stream_state, lambda s: s.__setitem__("volatile", ["x-date"]), "digest.volatile[0]"),
    (_stream_state, lambda s: s.__setitem__("end", 2**31 + 1), "digest.end"),
    (_stream_state, lambda s: s.__delitem__("overflow"), "digest.overflow"),
    (_sampled_state, lambda s: s.__setitem__("stride", 0), "digest.stride"),
    (_sampled_state, lambda s: s["samples"].reverse(), "digest.samples[1][0]"),
    (_sampled_state, lambda s: s["samples"][0].__setitem__(1, 10), "digest.samples[0][1]"),
    (_sampled_state, lambda s: s["samples"][1].__setitem__(1, 1001), "digest.samples[1][1]"),
    (_sampled_state, lambda s: s["samples"].__setitem__(0, [0, 100]), "digest.samples[0]"),
    (_sampled_state, lambda s: s.__setitem__("chunks", []), "digest.chunks"),
])
def test_bad_digest_state_names_the_field(make, mutate, field):
    s = make()
    digest_from_state(copy.deepcopy(s), "digest")  # valid before the mutation
    mutate(s)
    with pytest.raises(StateError) as e:
        digest_from_state(s, "digest")
    assert e.value.field == field
