"""A dual-stack service through the Gateway and its data plane, without a kernel: IPv6 clients
reach the backends' IPv6 addresses, IPv4 clients their IPv4 ones, and a failover moves both
(replay: the SYN as the client, the catch-up, the translated answer), every packet built and
checked by scapy (sans-I/O, no root)."""

from __future__ import annotations

import pytest
from scapy.all import IP, TCP, IPv6, Raw

from appliance.config import ConfigError, parse
from appliance.gateway import Gateway, build_packet
from checkpoint.document import export_document, import_document
from checkpoint.segment import RST, SYN
from nfq.queue import Verdict

TOKEN = "dual-stack-token"
VIP4, VIP6 = "203.0.113.10", "2001:db8:113::10"
P4, P6, B4, B6 = "198.51.100.10", "2001:db8:100::10", "198.51.100.20", "2001:db8:100::20"
C4, C6 = "192.0.2.10", "2001:db8:2::10"
REQUEST = b"GET /file HTTP/1.1\r\nHost: x\r\n\r\n"
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"


def config(**extra) -> dict:
    return {"api": {"token": TOKEN}, "checkpoint": {"key": "k" * 32},
            "service": [{"name": "web", "vip": VIP4, "vip6": VIP6, "port": 80, **extra,
                         "backend": [{"name": "primary", "address": P4, "address6": P6},
                                     {"name": "backup", "address": B4, "address6": B6}]}]}


def ip(src: str, dst: str):
    return IPv6(src=src, dst=dst) if ":" in src else IP(src=src, dst=dst)


def parsed(buf: bytes | bytearray):
    return IPv6(bytes(buf)) if buf[0] >> 4 == 6 else IP(bytes(buf))


def checksum_ok(buf: bytes | bytearray) -> bool:
    """The TCP checksum (and the IPv4 header's) as scapy computes them from scratch."""
    p = parsed(buf)
    q = p.copy()
    del q[TCP].chksum
    if isinstance(q, IP):
        del q.chksum
    q = parsed(bytes(q))
    return p[TCP].chksum == q[TCP].chksum and (not isinstance(p, IP) or p.chksum == q.chksum)


TS = [("NOP", None), ("NOP", None)]


def connect(gw: Gateway, client: str, vip: str, server: str, sport: int = 40000) -> None:
    """Handshake, a request and the first bytes of the answer, as the data plane sees them."""
    h = gw.dataplane.handle
    syn = bytearray(bytes(ip(client, vip) / TCP(sport=sport, dport=80, flags="S", seq=1000,
                                                options=[("MSS", 1400), ("SAckOK", b""), ("Timestamp", (100, 0)),
                                                         ("WScale", 7)])))
    assert h(syn, 1.0) is Verdict.REWRITTEN
    assert parsed(syn).dst == server and checksum_ok(syn)  # to the backend of the client's own family
    synack = bytearray(bytes(ip(server, client) / TCP(sport=80, dport=sport, flags="SA", seq=5000, ack=1001,
                                                      options=[("MSS", 1400), ("SAckOK", b""),
                                                               ("Timestamp", (7000, 100)), ("WScale", 7)])))
    assert h(synack, 1.0) is Verdict.ACCEPT  # observed; the kernel rewrites its source
    for seg in (TCP(sport=sport, dport=80, flags="A", seq=1001, ack=5001, options=TS + [("Timestamp", (101, 7000))]),
                TCP(sport=sport, dport=80, flags="PA", seq=1001, ack=5001,
                    options=TS + [("Timestamp", (102, 7000))]) / Raw(REQUEST)):
        buf = bytearray(bytes(ip(client, vip) / seg))
        assert h(buf, 1.0) is Verdict.REWRITTEN and parsed(buf).dst == server and checksum_ok(buf)
    data = bytearray(bytes(ip(server, client) / TCP(sport=80, dport=sport, flags="PA", seq=5001,
                                                    ack=1001 + len(REQUEST),
                                                    options=TS + [("Timestamp", (7001, 102))]) / Raw(ANSWER[:20])))
    assert h(data, 1.0) is Verdict.ACCEPT
    ack = bytearray(bytes(ip(client, vip) / TCP(sport=sport, dport=80, flags="A", seq=1001 + len(REQUEST),
                                                ack=5021, options=TS + [("Timestamp", (103, 7001))])))
    assert h(ack, 1.0) is Verdict.REWRITTEN


def test_each_family_reaches_the_backend_over_its_own_family() -> None:
    gw = Gateway(parse(config()), clock=lambda: 2.0)
    connect(gw, C4, VIP4, P4, 40000)
    connect(gw, C6, VIP6, P6, 40001)
    recs = {r.client_ip: r for r in gw.dataplane.connections()}
    assert (recs[C4].vip, recs[C4].backend_ip) == (VIP4, P4)
    assert (recs[C6].vip, recs[C6].backend_ip) == (VIP6, P6)
    assert recs[C6].client.bytes == len(REQUEST) and recs[C6].server.bytes == 20 and recs[C6].protected
    doc = gw.connection(recs[C6].id)
    assert doc is not None
    assert doc["client"] == f"[{C6}]:40001" and doc["service"] == f"[{VIP6}]:80" and doc["family"] == "ipv6"
    assert doc["backend_address"] == f"[{P6}]:80"
    total, page = gw.connections_page(q="ipv6")
    assert total == 1 and page[0]["id"] == recs[C6].id
    total, page = gw.connections_page(q="2001:db8:2::10")
    assert total == 1
    metrics = gw.connection_gauges()["web"]["by_family"]
    assert metrics == {"ipv4": 1, "ipv6": 1}


def test_failover_moves_both_families_by_replay() -> None:
    gw = Gateway(parse(config()), clock=lambda: 2.0)
    connect(gw, C4, VIP4, P4, 40000)
    connect(gw, C6, VIP6, P6, 40001)
    ev = gw.failover("web")
    assert sorted(ev["details"]["moved"]) == [1, 2]
    syns = {o.src: o for o in gw.unsent if o.flags == SYN}
    assert (syns[C6].dst, syns[C6].sport, syns[C6].seq) == (B6, 40001, 1000)  # as the client, to the backup's IPv6
    assert (syns[C4].dst, syns[C4].seq) == (B4, 1000)
    wire = build_packet(syns[C6])
    p = IPv6(wire)
    assert (p.src, p.dst, p.nh, p[TCP].flags) == (C6, B6, 6, "S") and checksum_ok(wire)
    fences = [o for o in gw.unsent if o.to == "old" and o.flags == RST]
    assert {o.dst for o in fences} == {P4, P6}
    # the backup answers the IPv6 SYN: the splice replays the request to it
    gw.unsent.clear()
    h = gw.dataplane.handle
    synack = bytearray(bytes(IPv6(src=B6, dst=C6) / TCP(sport=80, dport=40001, flags="SA", seq=90000, ack=1001,
                                                       options=[("MSS", 1400), ("SAckOK", b""),
                                                                ("Timestamp", (50, 102)), ("WScale", 7)])))
    assert h(synack, 2.0) is Verdict.DROP  # absorbed by the splice
    gw.flush()
    replay = [o for o in gw.unsent if o.payload]
    assert replay and replay[0].dst == B6 and b"".join(o.payload for o in replay) == REQUEST
    assert IPv6(build_packet(replay[0]))[Raw].load == REQUEST
    # the backup regenerates the answer: what the client has is suppressed, the rest reaches it
    # translated into the primary's sequence space, from the IPv6 VIP
    ans = bytearray(bytes(IPv6(src=B6, dst=C6) / TCP(sport=80, dport=40001, flags="PA", seq=90001,
                                                    ack=1001 + len(REQUEST),
                                                    options=TS + [("Timestamp", (51, 102))]) / Raw(ANSWER)))
    verdict = h(ans, 2.1)
    gw.flush()
    out = [parsed(b) for b in gw.dataplane.raw_out] + [IPv6(build_packet(o)) for o in gw.unsent if o.to == "client"]
    if verdict is not Verdict.DROP:
        out.append(parsed(ans))
    # every byte the client gets sits at its place in the primary's stream (overlap with what it
    # has is allowed, TCP drops it), and the stream reaches the end of the answer
    end = 5021
    for q in sorted((q for q in out if Raw in q), key=lambda q: q[TCP].seq):
        off = q[TCP].seq - 5001
        load = bytes(q[Raw].load)
        assert load == ANSWER[off:off + len(load)] and q[TCP].seq <= end
        end = max(end, q[TCP].seq + len(load))
        assert q.src == VIP6 and q.dst == C6 and q[TCP].sport == 80 and checksum_ok(bytes(q))
    assert end == 5001 + len(ANSWER)
    rec = gw.dataplane.table.by_id(2)
    assert rec is not None and rec.backend == "backup" and rec.backend_ip == B6


def test_reset_of_an_ipv6_connection_goes_out_as_ipv6() -> None:
    gw = Gateway(parse(config()), clock=lambda: 2.0)
    connect(gw, C6, VIP6, P6, 40001)
    gw.reset_connection(1)
    rsts = [o for o in gw.unsent if o.flags & RST]
    assert {(o.src, o.dst) for o in rsts} == {(VIP6, C6), (C6, P6)}
    for o in rsts:
        assert IPv6(build_packet(o)).nh == 6 and checksum_ok(build_packet(o))


def test_ipv6_checkpoint_document_round_trip_through_the_gateway() -> None:
    gw = Gateway(parse(config()), clock=lambda: 2.0)
    connect(gw, C6, VIP6, P6, 40001)
    rec = gw.dataplane.table.by_id(1)
    assert rec is not None
    doc = export_document(rec, b"k" * 32, now_wall=10.0)
    assert doc["family"] == "ipv6"
    imp = import_document(doc, b"k" * 32, gw.config.services)
    assert (imp.rec.client_ip, imp.rec.vip, imp.rec.backend_ip) == (C6, VIP6, P6)


@pytest.mark.parametrize("service, field", [
    ({"vip6": "203.0.113.10"}, "service[0].vip6"),
    ({"vip": "2001:db8:113::10"}, "service[0].vip"),
    ({"vip6": "fe80::1"}, "service[0].vip6"),
    ({"vip6": "::ffff:203.0.113.10"}, "service[0].vip6"),
    ({"vip6": VIP6, "backend": [{"name": "p", "address": P4}]}, "service[0].backend[0].address6"),
    ({"vip6": VIP6, "backend": [{"name": "p", "address6": P6}]}, "service[0].backend[0].address"),
    ({"vip": None, "vip6": VIP6, "backend": [{"name": "p", "address": P4, "address6": P6}]},
     "service[0].backend[0].address"),
    ({"backend": [{"name": "p", "address": P4, "address6": P6}]}, "service[0].backend[0].address6"),
    ({"vip": None}, "service[0].vip"),
    ({"vip": None, "vip6": VIP6, "backend": [{"name": "p", "address6": VIP6}]}, "service[0].backend[0].address6"),
])
def test_config_names_the_field_of_a_mixed_or_bad_family(service: dict, field: str) -> None:
    svc = {"name": "web", "vip": VIP4, "port": 80, "backend": [{"name": "p", "address": P4}]}
    svc.update(service)
    svc = {k: v for k, v in svc.items() if v is not None}
    with pytest.raises(ConfigError) as e:
        parse({"api": {"token": TOKEN}, "service": [svc]})
    assert e.value.field == field, str(e.value)


def test_ipv6_only_service() -> None:
    cfg = parse({"api": {"token": TOKEN}, "service": [{"name": "v6", "vip6": VIP6, "port": 80,
                                                       "backend": [{"name": "p", "address6": P6}]}]})
    svc = cfg.services[0]
    assert (svc.vip, svc.vip6, svc.vips, svc.backends[0].addresses) == (None, VIP6, (VIP6,), (P6,))
    gw = Gateway(cfg, clock=lambda: 2.0)
    connect(gw, C6, VIP6, P6)
    (s,) = gw.services()
    assert (s["vip"], s["vip6"], s["backends"][0]["address6"]) == (None, VIP6, P6)


def test_a_closed_ipv6_connection_is_found_by_family_in_the_history() -> None:
    from appliance import history

    gw = Gateway(parse(config()), clock=lambda: 2.0)
    connect(gw, C4, VIP4, P4, 40000)
    connect(gw, C6, VIP6, P6, 40001)
    gw.reset_connection(2)
    gw.dataplane.expire(1000.0)  # both leave the table; the reset one is in the history
    total, page = history.connections_page(gw, q="ipv6", closed=True)
    assert total == 1 and page[0]["client"] == f"[{C6}]:40001" and page[0]["closed"] is True


def test_the_panel_and_the_api_show_and_filter_ipv6_connections() -> None:
    from fastapi.testclient import TestClient

    from webui.auth import hash_password
    from webui.app import create_app

    cfg = config()
    cfg["api"]["user"] = [{"name": "vera", "role": "viewer", "password_hash": hash_password("pw-long-enough", n=1024)}]
    gw = Gateway(parse(cfg), clock=lambda: 2.0)
    connect(gw, C4, VIP4, P4, 40000)
    connect(gw, C6, VIP6, P6, 40001)
    c = TestClient(create_app(gw))
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = c.get("/api/v1/connections?q=ipv6", headers=auth)
    assert r.headers["x-total-count"] == "1" and r.json()[0]["client"] == f"[{C6}]:40001"
    assert [x["client"] for x in c.get(f"/api/v1/connections?service=[{VIP6}]:80", headers=auth).json()] == [
        f"[{C6}]:40001"]
    (svc,) = c.get("/api/v1/services", headers=auth).json()
    assert svc["vip6"] == VIP6 and svc["backends"][0]["address6"] == P6
    assert c.post("/login", data={"username": "vera", "password": "pw-long-enough"},
                  follow_redirects=False).status_code == 303
    page = c.get("/connections?q=2001:db8").text
    assert f"[{C6}]:40001" in page and f"{C4}:40000" not in page
    assert f"{C4}:40000" in c.get("/connections").text
    backends = c.get("/services").text
    assert f"[{P6}]:80" in backends and f"{P4}:80" in backends
