"""``appliance run``: the gateway process.

One asyncio loop does everything, so the data plane and the API share state
without locks: the NFQUEUE socket is a reader on the loop (each wake-up drains
every waiting packet through :class:`~appliance.dataplane.Dataplane`), a
periodic task expires idle connections, and uvicorn serves the REST API and
the panel on the same loop.

Start-up installs, in this order: the fail-open kernel fallback, the queue
binding (with the kernel's fail-open flag), then the iptables rules that feed
the queue — so no packet is ever queued to a queue nobody reads.  A clean
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

from nfq import failopen, rules
from nfq.queue import PacketQueue

from .config import Config
from .dataplane import Dataplane

log = logging.getLogger("appliance")


def flows_for(config: Config) -> list[rules.FlowMatch]:
    flows = []
    for svc in config.services:
        flows.append(rules.FlowMatch(comment=f"{svc.name} client->vip", dst=svc.vip, dport=svc.port))
        for b in svc.backends:
            flows.append(rules.FlowMatch(comment=f"{svc.name} {b.name}->client", src=b.address, sport=b.port))
    return flows


def fallbacks_for(dp: Dataplane) -> list[failopen.Fallback]:
    return [
        failopen.Fallback(vip=s.vip, port=s.port, backend_ip=s.active_backend.address, backend_port=s.active_backend.port)
        for s in dp.services.values()
    ]


class Gateway:
    """The running appliance: data plane, queue, and what the API reads."""

    def __init__(self, config: Config, *, kernel: bool = True) -> None:
        self.config = config
        self.dataplane = Dataplane(config)
        self.started = time.time()
        self.kernel = kernel
        self.queue: PacketQueue | None = None

    # --- lifecycle ---------------------------------------------------------------
    def start_kernel(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.config.gateway.fail_open:
            failopen.install(fallbacks_for(self.dataplane))
        dp = self.dataplane
        self.queue = PacketQueue(self.config.gateway.queue_num, lambda buf: dp.handle(buf, time.time()))
        if self.config.gateway.fail_open:
            self.queue.set_fail_open(True)
        loop.add_reader(self.queue.fileno(), self.queue.process_pending)
        rules.install(flows_for(self.config), self.config.gateway.queue_num)
        log.info("data plane up: queue %d, %d services", self.config.gateway.queue_num, len(self.config.services))

    def stop_kernel(self, loop: asyncio.AbstractEventLoop | None) -> None:
        rules.remove()
        if self.queue is not None:
            if loop is not None:
                loop.remove_reader(self.queue.fileno())
            self.queue.close()
            self.queue = None
        failopen.remove()
        log.info("data plane down: rules and fallback removed")

    async def housekeeping(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.dataplane.table.expire(time.time())

    # --- what the API shows ----------------------------------------------------------
    def status(self) -> dict[str, Any]:
        dp = self.dataplane
        q = self.queue.stats.as_dict() if self.queue else None
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


def run(config: Config, listen_fd: int | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(config, listen_fd))


def cleanup() -> list[str]:
    """Remove rules and fallback left by an appliance that did not exit cleanly."""
    done = []
    if rules.remove():
        done.append(f"removed iptables chain {rules.CHAIN}")
    if failopen.remove():
        done.append(f"removed nftables table {failopen.TABLE}")
    return done
