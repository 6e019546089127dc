"""The ICI's sanity checks (tcpcp 7.1): bad documents are refused, naming the
field, before create() makes a single system call; without CAP_NET_ADMIN
the error says so."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.lab.repair_topology import SERVICE_ADDR, Topology
from checkpoint.io import tcp_repair as repair
from checkpoint.ici import ConnectionRecord, HalfConnection
from checkpoint.repair_ici import (
    Ici,
    IciError,
    Limits,
    check_ici,
    ici_from_record,
    record_fields_from_ici,
)

ROOT = Path(__file__).resolve().parents[2]
NOW = 1_800_000_000.0


def good(**over: object) -> Ici:
    base = Ici(local_addr="203.0.113.10", local_port=7000, remote_addr="192.0.2.10", remote_port=40000,
               snd_una=0xFFFFFF00, snd_nxt=(0xFFFFFF00 + 300) & 0xFFFFFFFF, rcv_nxt=5000, mss=1448,
               snd_wscale=7, rcv_wscale=7, sack_permitted=True, timestamps=True, ts_val=123456, ts_hz=1000,
               taken_at=NOW - 0.5, snd_wl1=5000, snd_wnd=64000, max_window=128000, rcv_wnd=65536,
               rcv_wup=4990, sent_queue=b"s" * 300, unsent_queue=b"u" * 20, recv_queue=b"r" * 10,
               send_base=0xFFFFF000, recv_base=1000)
    return dataclasses.replace(base, **over)


def test_a_good_ici_passes_and_round_trips_through_json() -> None:
    ici = good()
    check_ici(ici, Limits(), now=NOW)
    back = Ici.from_dict(json.loads(json.dumps(ici.to_dict())))
    assert back == ici
    assert ici.out_offset == 0xFFFFFF00 + 320 - 0xFFFFF000
    assert ici.in_offset == 5000 - 10 - 1000


# (field, bad value, field named in the error)
BAD = [
    ("state", "TIME_WAIT", "state"),
    ("state", "CLOSE_WAIT", "peer_fin"),          # the peer's FIN must be recorded
    ("state", "FIN_WAIT1", "fin"),                # ours too
    ("fin", "sent", "fin"),                       # not in ESTABLISHED
    ("peer_fin", True, "peer_fin"),
    ("version", 3, "version"),
    ("family", "ipv5", "family"),
    ("family", "ipv6", "local_addr"),             # IPv4 addresses in an IPv6 document
    ("local_addr", "203.0.113.300", "local_addr"),
    ("remote_port", 0, "remote_port"),
    ("snd_nxt", 5, "snd_nxt"),                    # disagrees with len(sent_queue)
    ("snd_una", -1, "snd_una"),
    ("rcv_nxt", 1 << 32, "rcv_nxt"),
    ("mss", 40, "mss"),
    ("mss", 70000, "mss"),
    ("snd_wscale", 15, "snd_wscale"),
    ("rcv_wscale", None, "rcv_wscale"),           # one direction only
    ("ts_val", None, "ts_val"),
    ("taken_at", NOW + 3600, "taken_at"),
    ("taken_at", NOW - 600, "taken_at"),          # older than the MSL
    ("snd_wnd", 200000, "snd_wnd"),               # above max_window
    ("max_window", 65535 << 8, "max_window"),     # not expressible with snd_wscale 7
    ("rcv_wnd", 65535 << 8, "rcv_wnd"),
    ("rcv_wup", 6000, "rcv_wup"),                 # after rcv_nxt
    ("snd_wl1", 5000 + 65536 + 10, "snd_wl1"),    # after rcv_nxt + rcv_wnd
    ("recv_queue", b"r" * (7 << 20), "recv_queue"),
    ("sent_queue", b"s" * (5 << 20), "sent_queue"),
    ("send_base", 0x10000000, "send_base"),      # snd_una would be 'before' stream byte 0
]


@pytest.mark.parametrize("name,value,named", BAD)
def test_each_bad_field_is_named(name: str, value: object, named: str) -> None:
    ici = good(**{name: value})
    if name == "sent_queue":
        ici = dataclasses.replace(ici, snd_nxt=(ici.snd_una + len(value)) & 0xFFFFFFFF)  # type: ignore[arg-type]
    with pytest.raises(IciError) as exc:
        check_ici(ici, Limits(rmem_max=6 << 20, wmem_max=4 << 20), now=NOW)
    assert exc.value.field == named
    assert str(exc.value).startswith(f"ici.{named}:")


U32 = st.integers(min_value=0, max_value=0xFFFFFFFF)
ANY = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(1 << 40), max_value=1 << 40),
                st.text(max_size=20), st.floats(allow_nan=True), st.binary(max_size=40))
FIELDS = [f.name for f in dataclasses.fields(Ici)]


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(changes=st.dictionaries(st.sampled_from(FIELDS), ANY, min_size=1, max_size=4))
def test_fuzzed_icis_are_refused_or_sane(changes: dict[str, object]) -> None:
    """Any mutation either passes every check or raises IciError naming a
    real field -- never another exception, never a crash."""
    ici = good(**changes)
    try:
        check_ici(ici, Limits(), now=NOW)
    except IciError as exc:
        assert exc.field in FIELDS
        return
    # it passed: then it is really coherent
    assert (ici.snd_nxt - ici.snd_una) & 0xFFFFFFFF == len(ici.sent_queue)
    assert ici.state == "ESTABLISHED" and 88 <= ici.mss <= 65495


@settings(max_examples=200)
@given(doc=st.dictionaries(st.sampled_from(FIELDS + ["bogus"]), ANY, max_size=6))
def test_fuzzed_documents_are_refused_with_a_field(doc: dict[str, object]) -> None:
    full = good().to_dict()
    full.update(doc)
    try:
        ici = Ici.from_dict(full)
        check_ici(ici, Limits(), now=NOW)
    except IciError as exc:
        assert exc.field in FIELDS + ["bogus", "<document>"]


@pytest.mark.parametrize("name,value,named", BAD)
def test_create_refuses_before_any_system_call(topo: Topology, name: str, value: object, named: str) -> None:
    """A bad ICI handed to create() with a pre-bound socket: IciError, and the
    socket is untouched (not in repair mode, still unconnected, same MSS) and
    nothing new was opened."""
    fresh = time.time() - 0.5
    ici = good(**{"taken_at": fresh, name: value})
    if name == "taken_at":
        ici = dataclasses.replace(ici, taken_at=time.time() + (3600 if value > NOW else -600))  # type: ignore[operator]
    if name == "sent_queue":
        ici = dataclasses.replace(ici, snd_nxt=(ici.snd_una + len(ici.sent_queue)) & 0xFFFFFFFF)
    pre = topo.socket("a")
    try:
        pre.bind((SERVICE_ADDR, 0))
        mss_before = pre.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
        fds_before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(IciError):
            repair.create(ici, port_choice="prebound", sock=pre,
                          limits=Limits(rmem_max=6 << 20, wmem_max=4 << 20))
        assert len(os.listdir("/proc/self/fd")) == fds_before, "create() opened something"
        assert pre.fileno() != -1, "create() took the socket"
        assert not repair.in_repair(pre)
        assert pre.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG) == mss_before
        with pytest.raises(OSError):
            pre.getpeername()
    finally:
        pre.close()


CHILD = r"""
import json, socket, sys
sys.path.insert(0, sys.argv[1])
from checkpoint.io import tcp_repair as repair
from checkpoint.repair_ici import Ici
out = {}
lst = socket.socket(); lst.bind(("203.0.113.10", 0)); lst.listen()
c = socket.create_connection(lst.getsockname()); s, _ = lst.accept()
try:
    repair.get(s)
    out["get"] = "ok"
except repair.RepairPermissionError as exc:
    out["get"] = "perm: " + str(exc)
except Exception as exc:
    out["get"] = "other: %r" % exc
ici = Ici.from_dict(json.loads(sys.argv[2]))
for name, doc in (("good", ici), ("bad", Ici.from_dict({**json.loads(sys.argv[2]), "mss": 20}))):
    try:
        repair.create(doc)
        out[name] = "ok"
    except repair.RepairPermissionError as exc:
        out[name] = "perm: " + str(exc)
    except Exception as exc:
        out[name] = type(exc).__name__ + ": " + str(exc)
print(json.dumps(out))
"""


@pytest.mark.parametrize("how", ["setpriv", "nobody"])
def test_without_cap_net_admin_the_error_says_so(topo: Topology, how: str) -> None:
    """An unprivileged process: get() and create() raise RepairPermissionError
    naming CAP_NET_ADMIN, and a bad ICI is still refused by the checks first."""
    ici = good(local_addr=SERVICE_ADDR, remote_addr=SERVICE_ADDR, taken_at=time.time())
    drop = (["setpriv", "--inh-caps=-all", "--bounding-set=-net_admin"] if how == "setpriv"
            else ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--inh-caps=-all"])
    r = subprocess.run(["ip", "netns", "exec", topo.ns("a"), *drop, sys.executable, "-c", CHILD, str(ROOT),
                        json.dumps(ici.to_dict())],
                       capture_output=True, text=True, check=False, timeout=30)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["get"].startswith("perm: ") and "CAP_NET_ADMIN" in out["get"], out
    assert out["good"].startswith("perm: ") and "CAP_NET_ADMIN" in out["good"], out
    assert out["bad"].startswith("IciError: ici.mss:"), out


# --- the wire record ------------------------------------------------------------

def record() -> ConnectionRecord:
    rec = ConnectionRecord(id=1, client_ip="192.0.2.10", client_port=40000, vip="203.0.113.10", vport=80,
                           service="web", backend="primary", backend_ip="198.51.100.10", backend_port=80,
                           created=NOW - 10, last_seen=NOW - 0.2)
    rec.client = HalfConnection(isn=999, data_base=1000, next_seq=1000 + 500, data_high=1500, ack=70001,
                                window=64256, max_window=64256, mss=1460, wscale=7, sack_permitted=True,
                                ts_offered=True, tsval=5555)
    rec.server = HalfConnection(isn=69999, data_base=70000, next_seq=90000, data_high=90000, ack=1500,
                                window=65160, max_window=65160, mss=1460, wscale=7, sack_permitted=True,
                                ts_offered=True, tsval=777)
    return rec


def test_a_wire_checkpoint_becomes_a_creatable_ici() -> None:
    rec = record()
    ici = ici_from_record(rec, client_bytes=b"GET /x HTTP/1.1\r\n\r\n"[:19], consumed=481)
    check_ici(ici, Limits(), now=NOW)
    assert (ici.local_addr, ici.local_port, ici.remote_addr, ici.remote_port) == ("203.0.113.10", 80,
                                                                                   "192.0.2.10", 40000)
    assert ici.snd_una == ici.snd_nxt == 70001            # what the client acknowledged
    assert ici.out_offset == 1 and ici.acked_offset == 1    # the application resumes from there
    assert ici.in_offset == 481 and ici.rcv_nxt == 1500     # unread client bytes end where the client is
    assert ici.recv_queue == b"GET /x HTTP/1.1\r\n\r\n"[:19]
    assert (ici.snd_wscale, ici.rcv_wscale, ici.sack_permitted, ici.timestamps) == (7, 7, True, True)
    assert ici.ts_val is not None and ici.ts_val >= 777 and ici.ts_val % 2 == 0
    back = record_fields_from_ici(ici)
    assert back["client"]["ack"] == rec.client.ack and back["server"]["data_base"] == rec.server.data_base
    assert back["client"]["data_base"] == rec.client.data_base


def test_a_wire_checkpoint_with_bytes_the_client_never_sent_is_refused() -> None:
    with pytest.raises(IciError) as exc:
        ici_from_record(record(), client_bytes=b"x" * 100, consumed=450)
    assert exc.value.field == "recv_queue"


def test_wire_checkpoint_resumes_a_live_connection(topo: Topology, tmp_path: Path) -> None:
    """End to end without a gateway: the wire facts of a live connection (what
    a tracker would have seen) plus the unread client bytes re-create the
    server end in another namespace; the client's next exchange works."""
    lst = topo.socket("a")
    lst.bind((SERVICE_ADDR, 7001))
    lst.listen()
    cli = topo.socket("c")
    cli.settimeout(5)
    cli.connect((SERVICE_ADDR, 7001))
    srv, _ = lst.accept()
    lst.close()
    try:
        srv.sendall(b"hello")
        assert cli.recv(5) == b"hello"
        cli.sendall(b"request-1;")
        time.sleep(0.1)
        # what the wire showed, in a record (a socket stands in for the tracker)
        topo.hold()
        truth = repair.get(srv)
        srv.close()
        rec = record()
        rec.client_ip, rec.client_port, rec.vip, rec.vport = "192.0.2.10", cli.getsockname()[1], SERVICE_ADDR, 7001
        rec.last_seen = time.time()
        rec.client.data_base, rec.client.data_high = truth.recv_base, truth.rcv_nxt
        rec.client.ack, rec.client.window, rec.client.max_window = truth.snd_una, truth.snd_wnd, truth.max_window
        rec.client.wscale, rec.server.wscale = truth.snd_wscale, truth.rcv_wscale
        rec.client.mss = truth.mss
        rec.server.data_base, rec.server.tsval, rec.server.window = truth.send_base, truth.ts_val, truth.rcv_wnd
        # the application consumed nothing: the gateway hands all 10 client bytes
        ici = ici_from_record(rec, client_bytes=b"request-1;", consumed=0)
        topo.place("b")
        new = topo_create(topo, "b", ici)
        topo.route_to("b")
        repair.activate(new)
        assert new.recv(100) == b"request-1;"
        new.sendall(b"world")
        assert cli.recv(5) == b"world"
        cli.sendall(b"request-2;")
        assert new.recv(100) == b"request-2;"
        new.close()
    finally:
        cli.close()


def topo_create(topo: Topology, host: str, ici: Ici) -> repair.RepairedSocket:
    from appliance.lab import netns

    return netns.call_in(topo.ns(host), lambda: repair.create(ici))


def test_kernel_refusal_names_the_call(topo: Topology) -> None:
    """An ICI that passes the checks but that this host cannot take (no route to
    the peer here; the local address need not be local: create() binds with
    IP_FREEBIND/IP_TRANSPARENT): the error says which call the kernel refused,
    and nothing is left behind."""
    ici = good(taken_at=time.time())
    from appliance.lab import netns

    netns.ip("route", "del", "default", ns=topo.ns("b"))
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(repair.RepairError) as exc:
        netns.call_in(topo.ns("b"), lambda: repair.create(ici))
    assert str(exc.value).startswith("[Errno 101] connect(192.0.2.10:40000) in repair mode refused by the kernel")
    assert len(os.listdir("/proc/self/fd")) == fds


def test_get_refuses_a_socket_that_is_not_established(topo: Topology) -> None:
    lst = topo.socket("a")
    try:
        lst.bind((SERVICE_ADDR, 7009))
        lst.listen()
        with pytest.raises(IciError) as exc:
            repair.get(lst)
        assert exc.value.field == "state" and "LISTEN" in str(exc.value)
        assert not repair.in_repair(lst)
    finally:
        lst.close()
