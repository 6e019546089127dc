"""``appliance run``: the gateway process.

One asyncio loop does everything, so the data plane and the API share state
without locks: the two NFQUEUE sockets are readers on the loop (each wake-up
drains every waiting packet through :class:`~appliance.dataplane.Dataplane`),
a periodic task expires idle connections, and uvicorn serves the REST API and
the panel on the same loop.

Two queues, numbered from ``gateway.queue_num``: ``queue_num`` holds
client->service packets (full copies, rewritten by the appliance);
``queue_num + 1`` carries the return path (header-only copies, GSO
super-packets whole, never rewritten: the kernel translates their source,
see ``nfq.kernelnat``).

Start-up installs, in this order: the kernel NAT table (return path and
fail-open fallback), the queue bindings (with the kernel's fail-open flag),
then the iptables rules that feed the queues — so no packet is ever queued
to a queue nobody reads.  A clean
exit (SIGTERM, SIGINT) removes them in the reverse order.  SIGKILL removes
nothing, on purpose: the rules' ``--queue-bypass`` and the fallback carry the
traffic until the appliance is started again (``appliance cleanup`` removes
them by hand).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from typing import Any

from nfq import kernelnat, rules
from nfq.queue import PacketQueue, Verdict

from .config import Config
from .dataplane import Dataplane

log = logging.getLogger("appliance")


# header bytes copied from return-path packets: IPv4 and TCP headers with options
RETURN_COPY = 128


def flows_for(config: Config) -> list[rules.FlowMatch]:
    q = config.gateway.queue_num
    flows = []
    for svc in config.services:
        flows.append(rules.FlowMatch(comment=f"{svc.name} client->vip", queue=q, dst=svc.vip, dport=svc.port))
        for b in svc.backends:
            flows.append(rules.FlowMatch(comment=f"{svc.name} {b.name}->client", queue=q + 1,
                                         src=b.address, sport=b.port))
    return flows


def nat_for(dp: Dataplane) -> list[kernelnat.ServiceNat]:
    return [
        kernelnat.ServiceNat(
            vip=s.vip, port=s.port, active=(s.active_backend.address, s.active_backend.port),
            backends=tuple((b.address, b.port) for b in s.backends.values()),
        )
        for s in dp.services.values()
    ]


class Gateway:
    """The running appliance: data plane, queue, and what the API reads."""

    def __init__(self, config: Config, *, kernel: bool = True) -> None:
        self.config = config
        self.dataplane = Dataplane(config)
        self.started = time.time()
        self.kernel = kernel
        self.queues: list[PacketQueue] = []

    # --- lifecycle ---------------------------------------------------------------
    def start_kernel(self, loop: asyncio.AbstractEventLoop) -> None:
        g = self.config.gateway
        kernelnat.install(nat_for(self.dataplane))
        dp = self.dataplane

        def handle(buf: bytearray) -> Verdict:
            return dp.handle(buf, time.time())

        self.queues = [
            PacketQueue(g.queue_num, handle, fail_open=g.fail_open),
            PacketQueue(g.queue_num + 1, handle, fail_open=g.fail_open, gso=True, copy_range=RETURN_COPY),
        ]
        for q in self.queues:
            loop.add_reader(q.fileno(), q.process_pending)
        rules.install(flows_for(self.config))
        log.info("data plane up: queues %d-%d, %d services", g.queue_num, g.queue_num + 1, len(self.config.services))

    def stop_kernel(self, loop: asyncio.AbstractEventLoop | None) -> None:
        rules.remove()
        for q in self.queues:
            if loop is not None:
                loop.remove_reader(q.fileno())
            q.close()
        self.queues = []
        kernelnat.remove()
        log.info("data plane down: rules and kernel NAT removed")

    async def housekeeping(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.dataplane.table.expire(time.time())

    # --- what the API shows ----------------------------------------------------------
    def status(self) -> dict[str, Any]:
        dp = self.dataplane
        q = _sum_stats([q.stats.as_dict() for q in self.queues]) if self.queues else None
        names = ("held", "observed")
        per_queue = {names[i] if i < 2 else str(i): q.stats.as_dict() for i, q in enumerate(self.queues)}
        states: dict[str, int] = {}
        for rec in dp.table:
            states[rec.state.value] = states.get(rec.state.value, 0) + 1
        return {
            "version": _version(),
            "pid": os.getpid(),
            "uptime_seconds": round(time.time() - self.started, 3),
            "queue_num": self.config.gateway.queue_num,
            "fail_open": self.config.gateway.fail_open,
            "connections": len(dp.table),
            "connections_by_state": states,
            "table": {
                "max_connections": dp.table.max_connections,
                "created": dp.table.created,
                "expired": dp.table.expired,
                "evicted": dp.table.evicted,
                "refused_full": dp.table.refused_full,
            },
            "dataplane": dp.counters.as_dict(),
            "queue": q,
            "queues": per_queue,
        }

    def services(self) -> list[dict[str, Any]]:
        out = []
        counts: dict[tuple[str, str], int] = {}
        for rec in self.dataplane.table:
            counts[(rec.service, rec.backend)] = counts.get((rec.service, rec.backend), 0) + 1
        for s in self.dataplane.services.values():
            out.append({
                "name": s.name,
                "vip": s.vip,
                "port": s.port,
                "active_backend": s.active,
                "backends": [
                    {
                        "name": b.name,
                        "address": b.address,
                        "port": b.port,
                        "active": b.name == s.active,
                        "connections": counts.get((s.name, b.name), 0),
                    }
                    for b in s.backends.values()
                ],
            })
        return out

    def connections(self) -> list[dict[str, Any]]:
        now = time.time()
        return [rec.to_dict(now) for rec in self.dataplane.table]

    def connection(self, cid: int) -> dict[str, Any] | None:
        rec = self.dataplane.table.by_id(cid)
        return None if rec is None else rec.to_dict(time.time())


def _sum_stats(stats: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for st in stats:
        for k, v in st.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[k] = out.get(k, 0) + v
            elif v is not None:
                out[k] = v
    out.setdefault("last_error", None)
    out["busy_seconds"] = round(out.get("busy_seconds", 0.0), 6)
    return out


def _version() -> str:
    from . import __version__

    return __version__


def listen_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


async def serve(config: Config, listen_fd: int | None = None) -> None:
    import uvicorn

    from webui.app import create_app

    loop = asyncio.get_running_loop()
    gw = Gateway(config)
    if listen_fd is not None:
        sock = socket.socket(fileno=listen_fd)
    else:
        sock = listen_socket(config.api.host, config.api.port)
    sock.setblocking(False)
    app = create_app(gw)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
    server.install_signal_handlers = lambda: None  # we own the signals
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    gw.start_kernel(loop)
    tasks = [asyncio.create_task(gw.housekeeping()), asyncio.create_task(server.serve(sockets=[sock]))]
    log.info("API on %s", sock.getsockname())
    try:
        await stop.wait()
    finally:
        server.should_exit = True
        gw.stop_kernel(loop)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def run(config: Config, listen_fd: int | None = None, profile: str | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if profile is None:
        asyncio.run(serve(config, listen_fd))
        return
    import cProfile

    prof = cProfile.Profile()
    prof.enable()
    try:
        asyncio.run(serve(config, listen_fd))
    finally:
        prof.disable()
        prof.dump_stats(profile)


def cleanup() -> list[str]:
    """Remove rules and fallback left by an appliance that did not exit cleanly."""
    done = []
    if rules.remove():
        done.append(f"removed iptables chain {rules.CHAIN}")
    if kernelnat.remove():
        done.append(f"removed nftables table {kernelnat.TABLE}")
    return done
