"""ICI version 2 without root: IPv6 documents, the closing states, listening and
bound socket documents, version-1 documents still read, the peer's crafted
FIN, and the agents' parsing of /proc/net/tcp6 and ``[IPv6]:port``."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import socket
import struct
import sys

import pytest

from appliance.agent import protocol as proto
from appliance.agent.server import proc_addr
from checkpoint.io import tcp_repair as repair
from checkpoint.repair_ici import (
    ICI_VERSION,
    Ici,
    IciError,
    Limits,
    SocketDoc,
    check_ici,
    check_socket_doc,
    socket_doc_from_dict,
)

from .test_ici_checks import NOW, good


def good6(**over: object) -> Ici:
    return dataclasses.replace(good(local_addr="2001:db8:113::10", remote_addr="2001:db8:2::10", family="ipv6"),
                               **over)


def test_version_1_document_still_imports() -> None:
    """A document written by the version-1 library (no family, no FIN fields) reads as an
    IPv4 ESTABLISHED connection and passes the checks."""
    v1 = {k: v for k, v in good().to_dict().items() if k not in ("family", "fin", "peer_fin")}
    v1["version"] = 1
    ici = Ici.from_dict(json.loads(json.dumps(v1)))
    assert ici.family == "ipv4" and ici.state == "ESTABLISHED" and ici.fin == "none" and not ici.peer_fin
    assert ici.version == ICI_VERSION == 2
    check_ici(ici, Limits(), now=NOW)
    # and is written back as version 1: an agent with the old library still takes it
    assert ici.to_dict() == {**v1, "family": "ipv4"}
    assert good6().to_dict()["version"] == 2 and good(state="CLOSE_WAIT", peer_fin=True).to_dict()["version"] == 2
    # version 1 had no FIN fields: one there is refused, named
    with pytest.raises(IciError) as exc:
        Ici.from_dict({**v1, "fin": "sent"})
    assert exc.value.field == "fin"


def test_ipv6_document_round_trips_and_passes() -> None:
    ici = good6()
    check_ici(ici, Limits(), now=NOW)
    back = Ici.from_dict(json.loads(json.dumps(ici.to_dict())))
    assert back == ici and back.family == "ipv6"


@pytest.mark.parametrize("over,named", [
    ({"remote_addr": "192.0.2.10"}, "remote_addr"),        # IPv4 peer in an IPv6 document
    ({"local_addr": "2001:db8::zz"}, "local_addr"),
    ({"family": "ipv4"}, "local_addr"),
])
def test_ipv6_bad_addresses_are_named(over: dict[str, object], named: str) -> None:
    with pytest.raises(IciError) as exc:
        check_ici(good6(**over), Limits(), now=NOW)
    assert exc.value.field == named


@pytest.mark.parametrize("state,fin,peer_fin,queues", [
    ("FIN_WAIT1", "sent", False, {"unsent_queue": b""}),
    ("FIN_WAIT1", "unsent", False, {}),
    ("FIN_WAIT2", "acked", False, {"unsent_queue": b"", "sent_queue": b"", "snd_nxt": 0xFFFFFF00}),
    ("CLOSE_WAIT", "none", True, {}),
    ("LAST_ACK", "sent", True, {"unsent_queue": b""}),
    ("CLOSING", "unsent", True, {}),
])
def test_closing_states_pass(state: str, fin: str, peer_fin: bool, queues: dict[str, object]) -> None:
    for make in (good, good6):
        ici = make(state=state, fin=fin, peer_fin=peer_fin, **queues)
        check_ici(ici, Limits(), now=NOW)
        assert Ici.from_dict(json.loads(json.dumps(ici.to_dict()))) == ici


def test_fin_sent_after_unsent_bytes_is_refused() -> None:
    """Our FIN is the last sequence number: it cannot be sent while bytes before it were not."""
    with pytest.raises(IciError) as exc:
        check_ici(good(state="FIN_WAIT1", fin="sent"), Limits(), now=NOW)
    assert exc.value.field == "unsent_queue"
    with pytest.raises(IciError) as exc:
        check_ici(good(state="FIN_WAIT2", fin="acked", unsent_queue=b""), Limits(), now=NOW)
    assert exc.value.field == "sent_queue"


def test_socket_documents() -> None:
    doc = SocketDoc(kind="listen", local_addr="2001:db8:113::10", local_port=7100, family="ipv6", backlog=17,
                    options={"SO_REUSEADDR": 1, "IPV6_V6ONLY": 1, "TCP_NODELAY": 1}, taken_at=NOW)
    back = socket_doc_from_dict(json.loads(json.dumps(doc.to_dict())))
    assert back == doc
    check_socket_doc(SocketDoc(kind="bound", local_addr="203.0.113.10", local_port=7200))
    for over, named in [({"kind": "connected"}, "kind"), ({"local_port": 0}, "local_port"),
                        ({"backlog": -1}, "backlog"), ({"options": {"SO_LINGER": 1}}, "options.SO_LINGER"),
                        ({"family": "ipv4"}, "local_addr"), ({"local_addr": "203.0.113.10"}, "local_addr")]:
        with pytest.raises(IciError) as exc:
            check_socket_doc(dataclasses.replace(doc, **over))    # type: ignore[arg-type]
        assert exc.value.field == named
    v4 = dataclasses.replace(doc, family="ipv4", local_addr="203.0.113.10")
    with pytest.raises(IciError) as exc:
        check_socket_doc(v4)
    assert exc.value.field == "options.IPV6_V6ONLY"
    # a connection reader refuses a socket document, naming why
    with pytest.raises(IciError) as exc:
        Ici.from_dict(doc.to_dict())
    assert exc.value.field == "kind"


def _sum16(b: bytes) -> int:
    if len(b) % 2:
        b += b"\0"
    t = sum(struct.unpack(f"!{len(b) // 2}H", b))
    while t >> 16:
        t = (t & 0xFFFF) + (t >> 16)
    return t


@pytest.mark.parametrize("v6", [False, True])
def test_peer_fin_segment(v6: bool) -> None:
    """The crafted FIN: from the peer to the socket, at rcv_nxt, acknowledging snd_una,
    the peer's unscaled window, a valid TCP checksum."""
    ici = (good6 if v6 else good)(state="CLOSE_WAIT", peer_fin=True)
    local = (ici.local_addr, 7000)
    pkt = repair.peer_segment(ici, local)
    if v6:
        assert pkt[0] >> 4 == 6 and pkt[6] == socket.IPPROTO_TCP
        src, dst, tcp = pkt[8:24], pkt[24:40], pkt[40:]
        assert struct.unpack("!H", pkt[4:6])[0] == len(tcp)
        pseudo = src + dst + struct.pack("!IxxxB", len(tcp), 6)
        af = socket.AF_INET6
    else:
        assert pkt[0] == 0x45 and pkt[9] == socket.IPPROTO_TCP
        src, dst, tcp = pkt[12:16], pkt[16:20], pkt[20:]
        pseudo = src + dst + struct.pack("!xBH", 6, len(tcp))
        af = socket.AF_INET
    assert socket.inet_ntop(af, src) == ici.remote_addr and socket.inet_ntop(af, dst) == ici.local_addr
    sport, dport, seq, ack, off, flags, wnd = struct.unpack("!HHIIBBH", tcp[:16])
    assert (sport, dport, seq, ack) == (ici.remote_port, 7000, ici.rcv_nxt, ici.snd_una)
    assert flags == 0x11 and off >> 4 == 5 and wnd == ici.snd_wnd >> 7
    assert _sum16(pseudo + tcp) == 0xFFFF


def _proc6(addr: str, port: int) -> str:
    """How the kernel prints an IPv6 address in /proc/net/tcp6: four 32-bit words, each in host order."""
    raw = ipaddress.IPv6Address(addr).packed
    words = [int.from_bytes(raw[i:i + 4], sys.byteorder) for i in range(0, 16, 4)]
    return "".join(f"{w:08X}" for w in words) + f":{port:04X}"


def test_proc_net_tcp6_addresses() -> None:
    assert proc_addr(_proc6("2001:db8:113::10", 7000)) == ("2001:db8:113::10", 7000)
    assert proc_addr(_proc6("::ffff:192.0.2.10", 40000)) == ("192.0.2.10", 40000)   # dual-stack peer
    le = sys.byteorder == "little"
    # /proc/net/tcp: one word in host order
    assert proc_addr(("0A7100CB" if le else "CB00710A") + ":1B58") == ("203.0.113.10", 7000)
    if le:   # a line as the kernel prints it on x86_64/arm64
        assert proc_addr("B80D0120000000000000000010000000:1F40") == ("2001:db8::10", 8000)


def test_hostport_both_families() -> None:
    assert proto.hostport("2001:db8:2::10", 40000) == "[2001:db8:2::10]:40000"
    assert proto.hostport("192.0.2.10", 40000) == "192.0.2.10:40000"
    assert proto.parse_hostport("[2001:db8:2::10]:40000") == ("2001:db8:2::10", 40000)
    assert proto.parse_hostport("2001:db8:2::10:40000") == ("2001:db8:2::10", 40000)
    assert proto.parse_hostport("[2001:db8:100:1::2]", "agent", 7400) == ("2001:db8:100:1::2", 7400)
    with pytest.raises(proto.ProtocolError):
        proto.parse_hostport("[2001:db8::1:80")
