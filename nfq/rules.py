"""The appliance's iptables rules, through python-iptables (iptables-legacy and
ip6tables-legacy).

Everything lives in one chain of our own in the ``raw`` table, ``APPLIANCE``,
jumped to from ``PREROUTING`` (packets arriving from clients and servers)
and from ``OUTPUT`` (packets the appliance itself injects).  Queuing in
``raw`` acts before conntrack; each matched flow is first marked NOTRACK so
the kernel's conntrack neither NATs nor judges flows whose addresses and
sequence numbers the appliance rewrites (DESIGN.md), then queued with
``--queue-bypass``: while no process is bound to the queue (the appliance
died), the kernel accepts the packets instead of dropping them.

Packets the appliance injects itself carry a mark (``nfq.inject``); the
chain's first rules mark them NOTRACK and return them, so they are never
queued.  Return-path matches exclude packets addressed to the gateway itself
(``addrtype ! --dst-type LOCAL``): the appliance's own health checks talk to
the backends from the gateway's address, and their answers are not service
traffic.

The whole table is written in one commit (python-iptables with
``autocommit = False``: one ``iptc_commit``, which replaces the table
atomically), so a reader never sees a half-built chain.  ``remove`` takes the
jumps and the chain away again; both are idempotent.

Both families, the same layout: IPv4 in the ``raw`` table of iptables
(``iptc.Table``), IPv6 in the ``raw`` table of ip6tables (``iptc.Table6``,
same priority, also before conntrack).  A :class:`FlowMatch` goes to the
family of its address (``":"`` in it: IPv6).  The inject-mark and moved-mark
rules are in both chains, which are always installed together (an IPv4-only
configuration gets an IPv6 chain with only those).  Each family's table is
one commit; ``install`` writes IPv4 then IPv6 and, if the second commit
fails, removes both again before raising, so the appliance never runs with one
family queued and the other not.  (``addrtype`` exists for ip6tables too:
``! --dst-type LOCAL`` excludes the gateway's own IPv6 addresses the same way.)
NFQUEUE delivers both families on one queue number (since Linux 3.8 the
queue is not bound per protocol family), so the queue layout does not change.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

CHAIN = "APPLIANCE"
HOOKS = ("PREROUTING", "OUTPUT")
COMMENT_PREFIX = "appliance:"


@dataclass(frozen=True, slots=True)
class FlowMatch:
    """One direction of a service's traffic: TCP to ``dst:dport`` or from ``src:sport``."""

    comment: str
    queue: int
    dst: str | None = None
    dport: int | None = None
    src: str | None = None
    sport: int | None = None
    not_local: bool = False  # only packets not addressed to this host

    @property
    def v6(self) -> bool:
        """An IPv6 flow: its address (``dst`` or ``src``) has a colon."""
        return ":" in (self.dst or self.src or "")


# python-iptables has no type information: the module and its rules are Any here
def _iptc() -> Any:  # imported lazily: loading libiptc needs the shared library, not root
    import iptc

    return iptc


def _table(iptc: Any, v6: bool) -> Any:
    return iptc.Table6(iptc.Table6.RAW) if v6 else iptc.Table(iptc.Table.RAW)


def _new_rule(iptc: Any, v6: bool) -> Any:
    return iptc.Rule6() if v6 else iptc.Rule()


def _rule(iptc: Any, flow: FlowMatch, target: str, **target_args: str) -> Any:
    r = _new_rule(iptc, flow.v6)
    host = "/128" if flow.v6 else "/32"
    r.protocol = "tcp"
    if flow.dst:
        r.dst = f"{flow.dst}{host}"
    if flow.src:
        r.src = f"{flow.src}{host}"
    m = r.create_match("tcp")
    if flow.dport is not None:
        m.dport = str(flow.dport)
    if flow.sport is not None:
        m.sport = str(flow.sport)
    if flow.not_local:
        a = r.create_match("addrtype")
        a.dst_type = "!LOCAL"
    return _finish(r, flow.comment, target, target_args)


def _mark_rule(iptc: Any, v6: bool, mark: int, comment: str, target: str, **target_args: str) -> Any:
    r = _new_rule(iptc, v6)
    m = r.create_match("mark")
    m.mark = hex(mark)
    return _finish(r, comment, target, target_args)


def _finish(r: Any, comment: str, target: str, target_args: dict[str, str]) -> Any:
    """The comment every rule of ours carries, and its target."""
    c = r.create_match("comment")
    c.comment = f"{COMMENT_PREFIX} {comment}"
    t = r.create_target(target)
    for k, v in target_args.items():
        setattr(t, k, v)
    return r


def _install_family(iptc: Any, v6: bool, flows: list[FlowMatch], inject_mark: int | None, bypass: bool,
                    moved: tuple[int, int] | None) -> None:
    """One family's chain and jumps, in one commit."""
    table = _table(iptc, v6)
    table.autocommit = False
    try:
        table.refresh()
        if table.is_chain(CHAIN):
            chain = iptc.Chain(table, CHAIN)
            chain.flush()
        else:
            chain = table.create_chain(CHAIN)
        if inject_mark is not None:
            chain.append_rule(_mark_rule(iptc, v6, inject_mark, "injected by the appliance", "CT", notrack=""))
            chain.append_rule(_mark_rule(iptc, v6, inject_mark, "injected by the appliance", "RETURN"))
        if moved is not None:
            mark, queue = moved
            q = {"queue_num": str(queue), **({"queue_bypass": ""} if bypass else {})}
            for target, args in (("CT", {"notrack": ""}), ("NFQUEUE", q)):
                chain.append_rule(_mark_rule(iptc, v6, mark, "moved connections, from their new backend",
                                             target, **args))
        for flow in flows:
            chain.append_rule(_rule(iptc, flow, "CT", notrack=""))
            q = {"queue_num": str(flow.queue)}
            if bypass:
                q["queue_bypass"] = ""
            chain.append_rule(_rule(iptc, flow, "NFQUEUE", **q))
        for hook in HOOKS:
            builtin = iptc.Chain(table, hook)
            if not any(r.target.name == CHAIN for r in builtin.rules):
                jump = _new_rule(iptc, v6)
                jump.create_target(CHAIN)
                builtin.insert_rule(jump)
        table.commit()
    finally:
        table.autocommit = True
        table.refresh()


def install(flows: list[FlowMatch], inject_mark: int | None = None, bypass: bool = True,
            moved: tuple[int, int] | None = None) -> None:
    """(Re)write the ``APPLIANCE`` chains (IPv4 and IPv6) for ``flows`` and hook
    them, each family atomically; if the second family fails, neither stays.
    ``moved``: (mark, queue): packets with that mark go to that queue first."""
    iptc = _iptc()
    for flow in flows:
        if flow.dst and flow.src and (":" in flow.dst) != (":" in flow.src):
            raise ValueError(f"{flow.comment}: addresses of two families ({flow.dst}, {flow.src})")
    try:
        for v6 in (False, True):
            _install_family(iptc, v6, [f for f in flows if f.v6 == v6], inject_mark, bypass, moved)
    except BaseException:
        try:
            remove()
        except Exception:  # the install's error is the one to report
            log.exception("removing the rules after a failed install")
        raise


def _remove_family(iptc: Any, v6: bool) -> bool:
    table = _table(iptc, v6)
    table.autocommit = False
    found = False
    try:
        table.refresh()
        for hook in HOOKS:
            builtin = iptc.Chain(table, hook)
            for r in list(builtin.rules):
                if r.target.name == CHAIN:
                    builtin.delete_rule(r)
                    found = True
        if table.is_chain(CHAIN):
            chain = iptc.Chain(table, CHAIN)
            chain.flush()
            chain.delete()
            found = True
        table.commit()
    finally:
        table.autocommit = True
        table.refresh()
    return found


def remove() -> bool:
    """Remove the jumps and the chains of both families.  True when there was something to remove."""
    iptc = _iptc()
    found4 = _remove_family(iptc, False)
    found6 = _remove_family(iptc, True)
    return found4 or found6
