"""``appliance run``: the gateway process.

One asyncio loop does everything, so the data plane, the controller and the
API share state without locks: the NFQUEUE sockets are readers on the loop
(each wake-up drains a bounded batch of packets through the data plane, acts
on the engine's events, then sends what it asked to inject), the health
checker's probes are tasks, one timer task sleeps until the gateway's next
deadline (``Gateway.run_timers``: no fixed-rate tick), and uvicorn serves the
REST API and the panel, whose handlers are coroutines on the same loop.  A
:class:`~appliance.loopstall.LoopMonitor` times every callback the loop runs:
the longest stalls are in the status document.

Three queues, numbered from ``gateway.queue_num``:

* ``queue_num`` holds client->service packets (full copies: tracked, logged,
  rewritten);
* ``queue_num + 1`` holds backend->client packets with full copies: those of
  services with ``verify = "full"`` (tracked, every byte hashed) and those of
  moved connections (translated);
* ``queue_num + 2`` observes backend->client packets of services with
  ``verify = "sampled"``: a 4016-byte copy, GSO super-packets whole, one
  verdict each, never rewritten (tracked, sampled).

The kernel rewrites the source of every return packet it was not given
translated (``nfq.kernelnat``).  With ``store.mode = "disk"`` every return
packet is held (``queue_num + 1``): its acknowledgment may have to wait for a
commit (delayed ACKs, ``appliance.dataplane``).

With ``store.mode = "peer"`` the appliance is one node of a gateway pair
(``appliance.pairctl``): it starts as the standby, its queues bound but not read, and the group
commit goes to its Redis and waits for the standby's (docs/GATEWAY_PAIR.md).

With ``store.mode = "disk"`` a second task runs the group commit: at most every
``store.commit_interval`` (``appliance.cadence``: starts paced, so a write longer than the
interval is followed at once) it cuts a batch (``checkpoint.store``), writes it on
a thread of its own (one transaction, one fsync), then advances the commit
points and sends the acknowledgments they release.  At start-up, before the
queues are bound, the store is read back and its connections re-attached
(``Gateway.restore``): an appliance killed and started again goes on
protecting them.

Start-up installs, in this order: the kernel NAT table (return path and
fail-open fallback), the queue bindings (with the kernel's fail-open flag),
the injector, then the iptables rules that feed the queues — so no packet is
ever queued to a queue nobody reads.  A clean exit (SIGTERM, SIGINT) removes
them in the reverse order.  SIGKILL removes nothing, on purpose: the rules'
``--queue-bypass`` and the kernel NAT carry the traffic of connections that
were not moved until the appliance is started again (``appliance cleanup``
removes them by hand).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
from collections.abc import Generator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import uvicorn

from checkpoint import memsearch
from checkpoint.io.sqlite import SqliteBackend

from nfq import kernelnat, rules
from nfq.inject import INJECT_MARK, Injector
from nfq.queue import COPY_RANGE, Handler, PacketQueue, Queue, Verdict

from . import connlog, packetring
from .cadence import Cadence
from .config import Config, GatewayConfig
from .dataplane import Dataplane
from .gateway import Gateway
from .health import HealthChecker
from .loopstall import LoopMonitor
from .notify import Notifier

log = logging.getLogger("appliance")


def flows_for(config: Config) -> list[rules.FlowMatch]:
    q = config.gateway.queue_num
    flows = []
    for svc in config.services:
        ret = q + 2 if svc.failover.verify == "sampled" and config.store.mode == "memory" else q + 1
        for vip in svc.vips:  # each family's rules go to its own table (the address says which)
            flows.append(rules.FlowMatch(comment=f"{svc.name} client->vip", queue=q, dst=vip, dport=svc.port))
        for b in svc.backends:
            for a in b.addresses:
                flows.append(rules.FlowMatch(comment=f"{svc.name} {b.name}->client", queue=ret,
                                             src=a, sport=b.port, not_local=True))
    return flows


def nat_for(dp: Dataplane) -> list[kernelnat.ServiceNat]:
    """One entry per service and family: a ServiceNat's addresses are all of one family."""
    return [
        kernelnat.ServiceNat(
            vip=vip, port=s.port, active=(s.active_backend.addr(v6), s.active_backend.port),
            backends=tuple((b.addr(v6), b.port) for b in s.backends.values()),
        )
        for s in dp.services.values() for vip, v6 in ((s.vip, False), (s.vip6, True)) if vip is not None
    ]


def open_queues(g: GatewayConfig, handle: Handler, gate: Callable[[], bool] | None,
                fastpath: Any = None, clock: Callable[[], float] = time.monotonic) -> list[Queue]:
    """The three queues (client packets; the full-copy return path and moved connections; the
    observed return path), bound with the configured engine (``gateway.engine``).

    The native binding queues GSO super-packets whole on every queue and copies up to 64 KiB,
    so the full-copy queues see whole super-packets; the observed queue copies the headers and a
    sample's prefix (4016 bytes).  The python binding (NetfilterQueue) copies at most 4016 bytes,
    so only its observed queue can take super-packets.  ``fastpath`` (native only): the offload
    whose flow cache decides the pure ACKs and in-order data of ordinary connections in each
    batch."""
    accept = g.queue_full == "accept"
    if g.engine == "native":
        from nfq.native import NativeQueue

        fp = dict(fastpath=fastpath, clock=clock)
        return [
            NativeQueue(g.queue_num, handle, fail_open=accept, gate=gate, **fp),
            NativeQueue(g.queue_num + 1, handle, fail_open=accept, clear_mark=kernelnat.MOVED_MARK, gate=gate, **fp),
            NativeQueue(g.queue_num + 2, handle, fail_open=accept, copy_range=COPY_RANGE, gate=gate, **fp),
        ]
    return [
        PacketQueue(g.queue_num, handle, fail_open=accept, gate=gate),
        PacketQueue(g.queue_num + 1, handle, fail_open=accept, clear_mark=kernelnat.MOVED_MARK, gate=gate),
        PacketQueue(g.queue_num + 2, handle, fail_open=accept, gso=True, gate=gate),
    ]


class Kernel:
    """What the appliance installs in the kernel, and takes away again."""

    def __init__(self, gw: Gateway, loop: asyncio.AbstractEventLoop) -> None:
        self.gw = gw
        self.loop = loop
        self.injector: Injector | None = None
        self.reading = False    # the queues' sockets are readers on the loop

    def start(self) -> None:
        gw, g = self.gw, self.gw.config.gateway
        kernelnat.install(nat_for(gw.dataplane))
        self._kernel_targets()
        dp = gw.dataplane
        clock = gw.clock

        record = packetring.attach(gw).record  # recent packets per connection, for the panel's pcap

        pair = gw.pair

        def handle(buf: bytearray) -> Verdict:
            if pair is not None and not pair.forwarding():
                # checked per packet: a node stopped in the middle of a batch (SIGSTOP, a VM
                # paused) and thawed after a takeover must not pass the rest of that batch
                pair.counters["dropped_not_forwarding"] += 1
                return Verdict.DROP
            now = clock()
            record(buf, now)
            verdict = dp.handle(buf, now)
            if dp.outbox:
                # what this packet asked to send leaves before the packet itself:
                # held segments come earlier in the stream, with earlier TSvals
                gw.flush()
            return verdict

        offload = None
        if g.engine == "native" and g.fastpath:
            from .dataplane.offload import Offload

            offload = Offload(dp, g.max_connections, record=record)
        gw.queues = open_queues(g, handle, gate=pair.forwarding if pair is not None else None,
                                fastpath=offload, clock=clock)
        self.set_reading(gw.pair is None or gw.pair.forwarding())
        self.injector = Injector()
        inject: Callable[[bytes | bytearray], None] = self.injector.send
        if g.engine == "native":
            raw_inject, queues = inject, gw.queues

            def ordered(pkt: bytes | bytearray) -> None:
                # what a packet's handler sends leaves after the batch's earlier packets and
                # before the packet itself (nfq.native: verdicts are sent per batch)
                for q in queues:
                    q.flush_verdicts()
                raw_inject(pkt)

            inject = ordered
        if pair is None:
            gw.send = inject
        else:
            def send(pkt: bytes) -> None:  # as above: checked per packet, not per flush
                if pair.forwarding():
                    inject(pkt)
                else:
                    pair.counters["unsent_not_forwarding"] += 1

            gw.send = send
        gw.on_active_change = self.repoint
        gw.on_moved = kernelnat.add_moved
        gw.on_unmoved = kernelnat.del_moved
        rules.install(flows_for(gw.config), inject_mark=INJECT_MARK, bypass=g.fail_open,
                      moved=(kernelnat.MOVED_MARK, g.queue_num + 1))
        log.info("data plane up: queues %d-%d, %d services", g.queue_num, g.queue_num + 1, len(gw.config.services))

    def set_reading(self, on: bool) -> None:
        """Read the queues, or leave their packets waiting in the kernel (a node of a pair that
        does not forward now: a standby, a takeover under way, a master whose role is not proved)."""
        if on == self.reading:
            return
        self.reading = on
        for q in self.gw.queues:
            if on:
                self.loop.add_reader(q.fileno(), self._drain, q)
            else:
                self.loop.remove_reader(q.fileno())

    def _drain(self, q: Queue) -> None:
        pair = self.gw.pair
        if pair is not None and not pair.forwarding():
            self.set_reading(False)   # a thawed node: nothing is read until the role is proved again
            return
        q.process_pending()
        self.gw.flush()

    def repoint(self) -> None:
        """The active backend changed: move the kernel's client rule along.  This never runs
        inside a queue batch (failovers and admin changes are loop tasks; a batch's verdicts are
        all sent before its reader callback returns), so no packet passed unchanged for the old
        target meets the new rule."""
        dp = self.gw.dataplane
        for svc in dp.services.values():
            svc.kernel_target = None  # until the new rule is in place: the appliance rewrites
        if dp.offload is not None:
            dp.offload.clear()
        kernelnat.repoint(nat_for(self.gw.dataplane))
        self._kernel_targets()

    def _kernel_targets(self) -> None:
        """Tell the data plane where the kernel's client rule now sends each service's packets."""
        dp = self.gw.dataplane
        for svc in dp.services.values():
            svc.kernel_target = svc.active
        if dp.offload is not None:  # a flow offloaded for the old target would pass unchanged
            dp.offload.clear()

    def stop(self) -> None:
        gw = self.gw
        rules.remove()
        self.set_reading(False)
        for q in gw.queues:
            q.close()
        gw.queues = []
        if self.injector is not None:
            self.injector.close()
            gw.send = None
        kernelnat.remove()
        log.info("data plane down: rules and kernel NAT removed")


async def committer(gw: Gateway, backend: SqliteBackend, interval: float) -> None:
    """The group commit: one batch in flight, written on a thread of its own."""
    loop = asyncio.get_running_loop()
    planner = gw.dataplane.store
    assert planner is not None
    cadence = Cadence(interval)
    with ThreadPoolExecutor(1, thread_name_prefix="store") as pool:
        while True:
            await cadence.next()
            batch = planner.plan(time.time())
            if batch is None:
                continue
            try:
                await loop.run_in_executor(pool, backend.write, batch)
            except Exception as exc:  # a full or failing disk: nothing is committed, ACKs stay held
                log.error("checkpoint store write failed: %s", exc)
                planner.failed(batch)
                gw.store_error = f"{type(exc).__name__}: {exc}"
                continue
            gw.store_error = None
            gw.dataplane.committed(planner.done(batch))
            gw.flush()


class _Server(uvicorn.Server):
    """uvicorn without signal handlers of its own: the appliance owns SIGTERM and SIGINT (a clean
    exit removes the rules and NAT in order)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    def install_signal_handlers(self) -> None:  # uvicorn before 0.29
        pass


def web_config(app: Any, config: Config) -> uvicorn.Config:
    """uvicorn's settings for the panel and API: HTTPS with ``[api] tls_cert``/``tls_key`` (also on a
    socket opened by someone else: ``serve(sockets=[...])``)."""
    return uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                          ssl_certfile=config.api.tls_cert, ssl_keyfile=config.api.tls_key)


def listen_socket(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


async def serve(config: Config, listen_fd: int | None = None) -> None:
    from webui.app import create_app

    loop = asyncio.get_running_loop()
    monitor = LoopMonitor()
    monitor.install()
    if config.gateway.test_memsearch is not None:  # a benchmark's old path ([testing] memsearch)
        memsearch.use(config.gateway.test_memsearch)
    log.info("digest search: %s", memsearch.implementation())
    gw = Gateway(config)
    gw.loop = loop
    gw.loop_stats = monitor.stats
    conn_log = connlog.attach(gw)  # a line per connection, failover and move ([log]), from a thread
    conn_log.start()
    sock = socket.socket(fileno=listen_fd) if listen_fd is not None else listen_socket(config.api.host, config.api.port)
    sock.setblocking(False)
    app = create_app(gw)
    server = _Server(web_config(app, config))
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    backend = None
    if config.store.mode == "disk":
        backend = SqliteBackend(config.store.path, commit_delay=config.store.test_commit_delay)
        loaded = backend.load()
        for err in backend.load_errors:
            log.error("checkpoint store: %s", err)
        gw.restore(loaded)
        log.info("checkpoint store %s: %d connection(s) read back", config.store.path, len(loaded))
    pair = None
    if config.pair is not None:  # store.mode = "peer": a node of the gateway pair, a standby until it takes over
        from .pairctl import PairController

        pair = gw.pair = PairController(gw, config.pair)
    kernel = Kernel(gw, loop)
    kernel.start()
    gw.flush()  # resets of connections that could not be resumed
    gw.health = HealthChecker(gw.health_targets(), gw.on_health)
    if pair is not None:
        pair.on_forwarding = kernel.set_reading
        await pair.start()
    tasks = [asyncio.create_task(gw.run_timers()), asyncio.create_task(server.serve(sockets=[sock])),
             asyncio.create_task(gw.health.run())]
    if backend is not None:
        tasks.append(asyncio.create_task(committer(gw, backend, config.store.commit_interval)))
    if pair is not None:
        tasks.append(asyncio.create_task(pair.run_commits(config.store.commit_interval)))
    if gw.resume is not None:  # resume mode: the applications' reported offsets, from every agent
        tasks.append(asyncio.create_task(gw.resume.heartbeat(config.agent.heartbeat)))
    notifier = Notifier.start(config.notify, gw.events, app.state.ctx.audit)  # [[notify]]: commands, webhooks
    gw.notify_stats = notifier.stats
    log.info("API on %s (%s)", sock.getsockname(), "https" if config.api.tls_cert else "http")
    try:
        await stop.wait()
    finally:
        server.should_exit = True
        gw.health.stop()
        await notifier.stop()
        kernel.stop()
        conn_log.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if gw.resume is not None:
            gw.resume.close()
        if backend is not None:
            backend.close()
        if pair is not None:
            await pair.stop()


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
    """Remove rules and kernel NAT left by an appliance that did not exit cleanly."""
    done = []
    if rules.remove():
        done.append(f"removed iptables chain {rules.CHAIN}")
    if kernelnat.remove():
        done.append(f"removed nftables table {kernelnat.TABLE}")
    return done
