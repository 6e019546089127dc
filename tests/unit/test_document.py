"""checkpoint.document: signed checkpoint documents, exported and imported with tcpcp 7's checks."""

from __future__ import annotations

import base64
import copy
import hashlib
import hmac
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.config import BackendConfig, ServiceConfig
from checkpoint.document import (
    TOP_KEYS, CheckpointError, ImportLimits, Imported, export_document, import_document, sign,
)
from checkpoint.segment import ACK, FIN
from checkpoint.state import digest_state, log_state, record_state
from checkpoint.streamlog import ByteLog, SampledDigest, StreamDigest
from checkpoint.tracker import observe

from ._helpers import CLIENT_IP, CLIENT_PORT, VIP, VPORT, cseg, handshake, make_record, sseg

KEY = b"k" * 32
CLIENT6, VIP6 = "2001:db8:2::10", "2001:db8:113::1"
SERVICES = (
    ServiceConfig(name="web", vip=VIP, vip6=VIP6, port=VPORT,
                  backends=(BackendConfig("b1", "10.0.0.2", 8080, address6="2001:db8:100::2"),
                            BackendConfig("b2", "10.0.0.3", 8080, address6="2001:db8:100::3"))),
    ServiceConfig(name="other", vip="198.51.100.2", port=443, backends=(BackendConfig("x", "10.0.0.9", 443),)),
)
CISN, SISN = 2**32 - 10, 2**32 - 3  # both streams wrap past 0 within the first bytes
REQUEST = b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n"
RESPONSE = bytes(range(256)) * 300  # 76800 bytes: one full digest chunk and a partial one


def connection(sampled: bool = False, fin: bool = False, v6: bool = False):
    """A connection as the data plane keeps it: handshake, a request logged and committed,
    a response hashed, every segment observed by the tracker."""
    rec = make_record(now=10.0, key=(CLIENT6, 40000, VIP6, VPORT) if v6 else (CLIENT_IP, CLIENT_PORT, VIP, VPORT))
    if v6:
        rec.backend_ip = "2001:db8:100::2"
    handshake(rec, CISN, SISN, now=10.0)
    rec.log = ByteLog(1 << 20)
    rec.digest = SampledDigest(("http-date",)) if sampled else StreamDigest(("http-date",))
    c0, s0 = (CISN + 1) % 2**32, (SISN + 1) % 2**32
    observe(rec, cseg(c0, s0, ACK, REQUEST, window=502, tsval=200, tsecr=7000), True, 10.1)
    rec.log.add(0, REQUEST)
    pos, now = 0, 10.2
    while pos < len(RESPONSE):
        part = RESPONSE[pos:pos + 1400]
        observe(rec, sseg(s0 + pos, c0 + len(REQUEST), ACK, part, window=500, tsval=7100 + pos // 1400,
                          tsecr=200), False, now)
        if sampled:
            rec.digest.add(pos, part, len(part))
        else:
            rec.digest.add(pos, part)
        pos += len(part)
        now += 0.01
    observe(rec, cseg(c0 + len(REQUEST), s0 + len(RESPONSE), ACK, window=800, tsval=300, tsecr=7150), True, now)
    if fin:
        observe(rec, cseg(c0 + len(REQUEST), s0 + len(RESPONSE), ACK | FIN, window=800, tsval=301, tsecr=7150),
                True, now)
        rec.log.fin_offset = len(REQUEST)
        observe(rec, sseg(s0 + len(RESPONSE), c0 + len(REQUEST) + 1, ACK, window=500, tsval=7200, tsecr=301),
                False, now)
    rec.commit_offset = len(REQUEST)
    rec.commit_fin = fin
    return rec


def document(**kw):
    return export_document(connection(**kw), KEY, now_wall=1_763_700_000.5, checkpoint_time=1_763_700_000.25)


def resign(doc):
    doc["signature"] = sign(doc, KEY)
    return doc


def refused(doc, limits=ImportLimits(), key=KEY) -> CheckpointError:
    with pytest.raises(CheckpointError) as e:
        import_document(doc, key, SERVICES, limits)
    assert str(e.value).startswith(f"{e.value.field}: ")
    return e.value


def same_as_original(imp: Imported, rec) -> None:
    assert record_state(imp.rec) == record_state(rec)
    assert bytes(imp.log.data) == bytes(rec.log.data) and log_state(imp.log) == log_state(rec.log)
    assert imp.rec.log is imp.log and imp.rec.digest is imp.digest
    want, got = digest_state(rec.digest), digest_state(imp.digest)
    if want["kind"] == "stream":  # the running hash of the partial chunk is not carried
        want.pop("partial"), got.pop("partial")
    assert got == want


# ----- round trips -----------------------------------------------------------------------

@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("fin", [False, True])
@pytest.mark.parametrize("form", ["dict", "str", "bytes"])
def test_export_import_round_trip(sampled, fin, form):
    rec = connection(sampled=sampled, fin=fin)
    assert rec.protected and rec.state.value in ("ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT")
    doc = export_document(rec, KEY, now_wall=1000.5, checkpoint_time=999.0)
    assert [k for k in doc] == list(TOP_KEYS)
    assert doc["format"] == "tcp-failover-checkpoint" and doc["version"] == 2 and doc["family"] == "ipv4"
    assert doc["exported_at"] == 1000.5 and doc["checkpoint_time"] == 999.0
    assert base64.b64decode(doc["log"]["data_b64"]) == REQUEST
    raw = {"dict": doc, "str": json.dumps(doc), "bytes": json.dumps(doc, indent=2).encode()}[form]
    imp = import_document(raw, KEY, SERVICES, ImportLimits())
    same_as_original(imp, rec)
    assert imp.checkpoint_time == 999.0 and imp.rec.protected


def test_checkpoint_time_defaults_to_now_and_log_is_required():
    doc = export_document(connection(), KEY, now_wall=50.0)
    assert doc["checkpoint_time"] == 50.0
    rec = connection()
    rec.log = None
    with pytest.raises(CheckpointError, match="^log: "):
        export_document(rec, KEY, 1.0)
    with pytest.raises(CheckpointError, match="^signature: no checkpoint key"):
        export_document(connection(), b"", 1.0)


def test_signature_is_hmac_sha256_of_the_canonical_json():
    """Any reader can check it: the rule in the docstring, computed independently."""
    doc = document()
    body = {k: v for k, v in doc.items() if k != "signature"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    assert doc["signature"] == "hmac-sha256:" + hmac.new(KEY, text.encode(), hashlib.sha256).hexdigest()


def test_only_the_contiguous_log_prefix_is_exported():
    rec = connection()
    rec.log.add(len(REQUEST) + 10, b"beyond a gap")
    doc = export_document(rec, KEY, 1.0)
    assert base64.b64decode(doc["log"]["data_b64"]) == REQUEST and doc["log"]["end"] == len(REQUEST)
    assert import_document(doc, KEY, SERVICES).log.ooo == {}


# ----- authentication --------------------------------------------------------------------

def test_wrong_key_is_refused_by_signature():
    e = refused(document(), key=b"another key")
    assert e.field == "signature" and "does not match" in str(e)
    assert refused(document(), key=b"").field == "signature"


def test_any_change_without_resigning_is_refused_by_signature():
    for mutate in (lambda d: d["connection"].__setitem__("backend", "b2"),
                   lambda d: d["log"].__setitem__("data_b64", base64.b64encode(b"GET /etc/passwd").decode()),
                   lambda d: d.__setitem__("checkpoint_time", 1.0),
                   lambda d: d.__setitem__("extra", 1),
                   lambda d: d.__setitem__("signature", d["signature"].upper()),
                   lambda d: d.__delitem__("signature")):
        doc = document()
        mutate(doc)
        assert refused(doc).field == "signature"


def test_signature_is_checked_before_anything_else_is_read():
    """A forged document with a bad field is refused for its signature, not its field."""
    doc = document()
    doc["connection"]["server"]["wscale"] = "lots"
    doc["log"] = None
    assert refused(doc).field == "signature"


# ----- parsing ---------------------------------------------------------------------------

@pytest.mark.parametrize("raw, words", [
    (b"", "not valid JSON"),
    (b"{", "not valid JSON"),
    (b"\xff\xfe{}", "not valid JSON"),
    (b'{"format": NaN}', "not valid JSON"),
    (b"[1, 2]", "expected a JSON object"),
    (b"[" * 100000 + b"]" * 100000, ""),
    (b'{"a": ' + b"9" * 5000 + b"}", "not valid JSON"),
    (17, "expected JSON text"),
])
def test_unparsable_documents(raw, words):
    e = refused(raw)
    assert e.field == "document" and words in str(e)


def test_non_json_values_in_a_dict_are_refused():
    doc = document()
    doc["exported_at"] = float("inf")
    assert refused(doc).field == "document"
    doc["exported_at"] = b"bytes"
    assert refused(doc).field == "document"


def test_document_size_limit():
    raw = json.dumps(document()).encode()
    assert refused(raw, ImportLimits(max_document_bytes=len(raw) - 1)).field == "document"
    import_document(raw, KEY, SERVICES, ImportLimits(max_document_bytes=len(raw)))


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d.__setitem__("format", "tcpcp"), "format"),
    (lambda d: d.__delitem__("format"), "format"),
    (lambda d: d.__setitem__("version", 3), "version"),
    (lambda d: d.__setitem__("version", 0), "version"),
    (lambda d: d.__setitem__("version", True), "version"),
    (lambda d: d.__setitem__("version", "1"), "version"),
])
def test_format_and_version(mutate, field):
    doc = document()
    mutate(doc)
    assert refused(resign(doc)).field == field


# ----- families and versions -------------------------------------------------------------

@pytest.mark.parametrize("fin", [False, True])
def test_ipv6_round_trip(fin):
    rec = connection(fin=fin, v6=True)
    doc = export_document(rec, KEY, now_wall=1000.5, checkpoint_time=999.0)
    assert doc["version"] == 2 and doc["family"] == "ipv6"
    imp = import_document(json.dumps(doc), KEY, SERVICES, ImportLimits())
    same_as_original(imp, rec)
    assert (imp.rec.client_ip, imp.rec.vip, imp.rec.backend_ip) == (CLIENT6, VIP6, "2001:db8:100::2")


def as_version_1(doc):
    """The document as a version-1 appliance (before IPv6) wrote it: no family."""
    doc = copy.deepcopy(doc)
    doc["version"] = 1
    del doc["family"]
    return resign(doc)


def test_version_1_document_still_imports_as_ipv4():
    rec = connection()
    doc = as_version_1(export_document(rec, KEY, now_wall=1000.5, checkpoint_time=999.0))
    assert "family" not in doc
    same_as_original(import_document(doc, KEY, SERVICES, ImportLimits()), rec)


def test_version_1_document_is_ipv4_only():
    doc = as_version_1(export_document(connection(v6=True), KEY, now_wall=1000.5, checkpoint_time=999.0))
    e = refused(doc)
    assert e.field == "connection.client_ip" and "version-1" in e.message


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d.__setitem__("family", "ipv5"), "family"),
    (lambda d: d.__delitem__("family"), "family"),
    (lambda d: d.__setitem__("family", "ipv4"), "connection.client_ip"),   # says IPv4, holds IPv6
    (lambda d: d["connection"].__setitem__("backend_ip", "10.0.0.2"), "connection.backend_ip"),  # mixed families
    (lambda d: d["connection"].__setitem__("client_ip", "2001:DB8:2::10"), "connection.client_ip"),  # not canonical
])
def test_family_checked(mutate, field):
    doc = export_document(connection(v6=True), KEY, now_wall=1000.5, checkpoint_time=999.0)
    mutate(doc)
    assert refused(resign(doc)).field == field


def test_version_1_has_no_family_key():
    doc = as_version_1(document())
    doc["family"] = "ipv4"
    assert refused(resign(doc)).field == "family"


# ----- tcpcp section 7: sanity checks on authentic documents ------------------------------

def _conn(d):
    return d["connection"]


def _shorten_log(d, n):
    data = base64.b64decode(d["log"]["data_b64"])[:n]
    d["log"]["data_b64"] = base64.b64encode(data).decode()
    d["log"]["end"] = n
    d["connection"]["commit_offset"] = min(n, d["connection"]["commit_offset"])


SANITY = [
    # state
    (lambda d: _conn(d).__setitem__("state", "SYN_SENT"), "connection.state", "cannot be resumed"),
    (lambda d: _conn(d).__setitem__("state", "TIME_WAIT"), "connection.state", "cannot be resumed"),
    (lambda d: _conn(d).__setitem__("state", "CLOSED"), "connection.state", "cannot be resumed"),
    (lambda d: _conn(d).__setitem__("state", "SOMETHING"), "connection.state", "expected one of"),
    (lambda d: _conn(d).__setitem__("mid_stream", True), "connection.mid_stream", "mid-stream"),
    (lambda d: _conn(d).__setitem__("rst_seen", True), "connection.rst_seen", "reset"),
    # options
    (lambda d: _conn(d)["server"].__setitem__("wscale", 15), "connection.server.wscale", "0..14 or null"),
    (lambda d: _conn(d)["client"].__setitem__("mss", 87), "connection.client.mss", "88..65495"),
    (lambda d: _conn(d)["client"].__setitem__("mss", 65496), "connection.client.mss", "88..65495"),
    (lambda d: _conn(d)["server"].__setitem__("mss", None), "connection.server.mss", "88..65495"),
    (lambda d: _conn(d)["server"].__setitem__("sack_permitted", 1), "connection.server.sack_permitted",
     "true or false"),
    (lambda d: _conn(d)["server"].__setitem__("ts_offered", "yes"), "connection.server.ts_offered", "true or false"),
    (lambda d: _conn(d)["server"].__setitem__("tsval", None), "connection.server.tsval", "timestamps"),
    # windows
    (lambda d: _conn(d)["server"].update(window=65535 << 10, max_window=65535 << 10),
     "connection.server.window", "65535 << 9"),
    (lambda d: _conn(d)["server"].update(window_raw=3), "connection.server.window", "not the window field"),
    (lambda d: _conn(d)["server"].update(max_window=1), "connection.server.max_window", "less than"),
    (lambda d: _conn(d)["client"].__setitem__("window_raw", 65536), "connection.client.window_raw", "0..65535"),
    # addresses
    (lambda d: _conn(d).__setitem__("vip", "198.51.100.99"), "connection.vip", "not a configured service"),
    (lambda d: _conn(d).__setitem__("vport", 443), "connection.vip", "not a configured service"),
    (lambda d: _conn(d).__setitem__("service", "other"), "connection.service", "is service 'web'"),
    (lambda d: _conn(d).__setitem__("backend", "b9"), "connection.backend", "not a backend"),
    (lambda d: _conn(d).__setitem__("backend_ip", "10.0.0.3"), "connection.backend_ip", "is 10.0.0.2"),
    (lambda d: _conn(d).__setitem__("backend_port", 80), "connection.backend_port", "listens on 8080"),
    (lambda d: _conn(d).__setitem__("client_ip", "not-an-ip"), "connection.client_ip", "not an IP"),
    # sequence numbers
    (lambda d: _conn(d)["client"].__setitem__("isn", None), "connection.client.isn", "no SYN"),
    (lambda d: _conn(d)["server"].__setitem__("data_base", 12345), "connection.server.data_base", "isn + 1"),
    (lambda d: _conn(d)["client"].__setitem__("next_seq", 2**32), "connection.client.next_seq", "0..4294967295"),
    (lambda d: _conn(d)["client"].__setitem__("next_seq", (CISN - 5) % 2**32), "connection.client.next_seq",
     "behind"),
    (lambda d: _conn(d)["client"].__setitem__("data_high", (CISN + 1000) % 2**32), "connection.client.data_high",
     "outside"),
    (lambda d: _conn(d)["server"].__setitem__("ack", (CISN + 1 + len(REQUEST) + 5) % 2**32),
     "connection.server.ack", "the peer sent"),
    (lambda d: _conn(d)["server"].__setitem__("ack", (CISN - 100) % 2**32), "connection.server.ack", "below"),
    (lambda d: _conn(d)["client"].__setitem__("ack", (SISN + 1 + len(RESPONSE) + 1) % 2**32),
     "connection.client.ack", "the peer sent"),
    (lambda d: _conn(d)["client"].__setitem__("fin_seq", (CISN + 3) % 2**32), "log.fin_offset", "the client's FIN is at 2"),
    # the log (I1) and the commit point
    (lambda d: _shorten_log(d, 10), "log", f"server acknowledged {len(REQUEST)} bytes, log holds 10"),
    (lambda d: d["log"].update(end=len(REQUEST) + 2, data_b64=base64.b64encode(REQUEST + b"xx").decode()),
     "log.end", "the client sent"),
    (lambda d: d["log"].update(end=5), "log.end", "the data holds"),
    (lambda d: d["log"].update(data_b64="not base64!"), "log.data_b64", "base64"),
    (lambda d: d["log"].update(overflow="client sent more than the log limit"), "log.overflow", "incomplete"),
    (lambda d: d["log"].update(fin_offset=len(REQUEST)), "log.fin_offset", "never seen"),
    (lambda d: d["log"].pop("limit"), "log.limit", "missing"),
    (lambda d: _conn(d).__setitem__("commit_offset", len(REQUEST) + 1), "connection.commit_offset", "past"),
    # (-1 is the store's "record not durable yet"; refused by the state's range or as never committed)
    (lambda d: _conn(d).__setitem__("commit_offset", -1), "connection.commit_offset", ""),
    (lambda d: _conn(d).__setitem__("commit_fin", True), "connection.commit_fin", "FIN"),
    # the digest
    (lambda d: d["digest"].update(end=len(RESPONSE) + 1), "digest.end", "the server sent"),
    (lambda d: d["digest"].update(overflow="too many out-of-order server segments"), "digest.overflow",
     "incomplete"),
    (lambda d: d["digest"].update(kind="crc"), "digest.kind", "stream"),
    # the envelope
    (lambda d: d.__setitem__("checkpoint_time", d["exported_at"] + 1), "checkpoint_time", "after"),
    (lambda d: d.__setitem__("exported_at", "x"), "exported_at", "wall-clock"),
    (lambda d: d.__setitem__("exported_at", -1.0), "exported_at", "wall-clock"),
    (lambda d: d.__setitem__("extra", 1), "extra", "unknown key"),
    (lambda d: d.__delitem__("digest"), "digest", "missing"),
    (lambda d: d.__setitem__("connection", []), "connection", "expected an object"),
]


@pytest.mark.parametrize("mutate, field, words", SANITY)
def test_sanity_checks_name_the_field(mutate, field, words):
    doc = document()
    import_document(copy.deepcopy(doc), KEY, SERVICES)  # valid before the mutation
    mutate(doc)
    e = refused(resign(doc))
    assert e.field == field and words in str(e), str(e)


def test_limits_on_windows_and_log_size():
    doc = document()
    assert refused(doc, ImportLimits(max_window=1000)).field.endswith("window")
    assert refused(doc, ImportLimits(max_log_bytes=len(REQUEST) - 1)).field == "log.data_b64"
    import_document(doc, KEY, SERVICES, ImportLimits(max_log_bytes=len(REQUEST)))


def test_fin_committed_document_is_accepted_and_fin_mismatch_is_not():
    doc = document(fin=True)
    imp = import_document(doc, KEY, SERVICES)
    assert imp.rec.commit_fin and imp.log.fin_offset == len(REQUEST)
    doc["connection"]["commit_offset"] = 3
    assert refused(resign(doc)).field == "connection.commit_fin"


# ----- fuzzing ---------------------------------------------------------------------------

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ORIGINAL = document()
ORIGINAL_RAW = json.dumps(ORIGINAL).encode()

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)


def check_outcome(doc_or_raw, limits=ImportLimits()) -> Imported | CheckpointError:
    """The one contract: a complete Imported, or a CheckpointError naming a field."""
    try:
        imp = import_document(doc_or_raw, KEY, SERVICES, limits)
    except CheckpointError as e:
        assert e.field and str(e).startswith(f"{e.field}: ")
        assert e.field.split(".")[0].split("[")[0] in (*TOP_KEYS, "document")
        return e
    assert isinstance(imp, Imported) and imp.rec.log is imp.log and imp.rec.digest is imp.digest
    return imp


@FUZZ
@given(value=json_values)
def test_random_json_is_refused(value):
    e = check_outcome(json.dumps(value))
    assert isinstance(e, CheckpointError) and e.field in ("document", "format", "version", "signature")


@FUZZ
@given(raw=st.binary(max_size=300))
def test_random_bytes_are_refused(raw):
    assert isinstance(check_outcome(raw), CheckpointError)


def _paths(v, prefix=()):
    yield prefix
    if isinstance(v, dict):
        for k, x in v.items():
            yield from _paths(x, prefix + (k,))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            yield from _paths(x, prefix + (i,))


ALL_PATHS = [p for p in _paths(ORIGINAL) if p and p != ("signature",)]


def _mutated(value, how: str, new):
    if how == "replace":
        return new
    if how == "flip" and type(value) in (int, float):
        return value + new if isinstance(new, int) and not isinstance(new, bool) else -value
    if how == "retype":
        return {int: str, float: str, str: lambda s: [s], bool: int, type(None): lambda _: 0,
                list: lambda v: {"0": v}, dict: lambda v: list(v.values())}[type(value)](value)
    if how == "truncate" and isinstance(value, (str, list)):
        return value[:len(value) // 2]
    return new


@FUZZ
@given(path=st.sampled_from(ALL_PATHS), how=st.sampled_from(["drop", "replace", "flip", "retype", "truncate"]),
       new=json_values | st.integers(-3, 3) | st.sampled_from([2**31, 2**32, -1, 0.5]), resigned=st.booleans())
def test_mutated_documents_are_refused_by_field_or_accepted_whole(path, how, new, resigned):
    doc = copy.deepcopy(ORIGINAL)
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    last = path[-1]
    if how == "drop" and isinstance(parent, dict):
        del parent[last]
    else:
        parent[last] = _mutated(parent[last], how, new)
    if resigned:
        resign(doc)
    changed = {k: v for k, v in doc.items() if k != "signature"} != \
              {k: v for k, v in ORIGINAL.items() if k != "signature"}
    out = check_outcome(doc)
    if isinstance(out, CheckpointError):
        if not resigned and changed:
            assert out.field in ("signature", "format", "version")
        if resigned:
            assert out.field != "signature"  # the sanity checks themselves were exercised
        return
    # accepted: only a document that still says exactly what the import holds
    assert resigned or not changed
    assert record_state(out.rec) == doc["connection"]
    assert bytes(out.log.data) == base64.b64decode(doc["log"]["data_b64"])
    assert {k: v for k, v in doc["log"].items() if k != "data_b64"} == log_state(out.log)
    if not changed:
        same_as_original(out, connection())


@FUZZ
@given(cut=st.integers(0, len(ORIGINAL_RAW) - 1), flip=st.integers(0, len(ORIGINAL_RAW) - 1),
       bit=st.integers(0, 7), truncate=st.booleans())
def test_damaged_bytes_are_refused(cut, flip, bit, truncate):
    raw = bytearray(ORIGINAL_RAW)
    if truncate:
        raw = raw[:cut]
    else:
        raw[flip] ^= 1 << bit
    out = check_outcome(bytes(raw))
    if isinstance(out, Imported):  # a flip that changes no value (e.g. inside insignificant text): same doc
        assert json.loads(bytes(raw)) == json.loads(ORIGINAL_RAW)
    else:
        assert out.field in ("document", "format", "version", "signature")
