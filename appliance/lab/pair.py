"""The two-gateway lab: an active–standby pair, keepalived moving the next-hop addresses.

::

                          lab-switch (bridges only, no addresses)
    lab-client  192.0.2.10 ─┐                                      ┌─ 198.51.100.10 lab-primary
    lab-client2 192.0.2.11 ─┤ br-client                  br-server ├─ 198.51.100.20 lab-backup
                            ├─ eth-client ─ lab-gateway  ─ eth-server ─┤
                            │   192.0.2.2      │ sync0      198.51.100.2  │
                            │                  │ 203.0.113.253/30       │
                            │                  │ 2001:db8:ff::1/64      │
                            └─ eth-client ─ lab-gateway2 ─ eth-server ─┘
                                192.0.2.3      sync0      198.51.100.3
                                               203.0.113.254/30, 2001:db8:ff::2/64

    floating (held by the VRRP master only): 192.0.2.1/24 and 2001:db8:2::1/64 on eth-client,
                                             198.51.100.1/24 and 2001:db8:100::1/64 on eth-server

The clients and servers are those of the single-gateway lab (:mod:`.topology`, same
names and addresses, both families); their default routes go to the floating
addresses, so whichever gateway is master carries the traffic.  A gateway's own
legs have their own addresses (client side ``192.0.2.2``/``.3``, ``2001:db8:2::2``/``::3``;
server side ``198.51.100.2``/``.3``, ``2001:db8:100::2``/``::3``): the health checks,
the agent channel and the VRRP adverts of each gateway use them, whatever its role.
The bridges live in ``lab-switch`` so that a dead gateway does not take the L2
segments with it.  ``sync0`` is a direct veth between the gateways (the
replication link); VRRP does not use it, so cutting it cannot cause a split brain.

keepalived (Debian's 2.2.7) runs in each gateway namespace, its config, pid files,
log and notify FIFO in the run dir (:func:`keepalived_config`):

- VRRPv3, two instances (``client`` on eth-client, ``server`` on eth-server),
  unicast adverts between the legs' own addresses (``unicast_src_ip`` /
  ``unicast_peer``, ``check_unicast_src``), ``advert_int`` 0.1 s: a backup declares
  the master dead after 3 adverts plus the skew, about 0.36 s;
- each instance moves its side's IPv4 next hop (``virtual_ipaddress``) and its IPv6
  one (``virtual_ipaddress_excluded``: keepalived wants one family per
  ``virtual_ipaddress`` block, and sends gratuitous ARP / unsolicited NA for both);
- both nodes start BACKUP with ``nopreempt``; a ``vrrp_sync_group`` (``lab``) moves
  the two instances, and so every floating address, together;
- ``vrrp_notify_fifo``: every transition as a line (``GROUP "lab" MASTER 0``), the
  appliance's channel (:mod:`appliance.vrrp` reads it); nothing reads it yet, and
  keepalived never blocks on it;
- two ``track_file`` s on the sync group: ``<node>.ineligible`` (weight 0: any
  non-zero value puts the group in FAULT: it gives up the role and never takes it;
  the appliance's hook to make its node ineligible) and ``<node>.bonus`` (weight 1:
  added to the priority).

Why a bonus: ``nopreempt`` only stops a *backup* of higher priority from taking
over; when two nodes both believe they are master (a master frozen and thawed,
a flapping link) VRRP keeps the higher priority, and on equal priority the
higher IP address, whoever became master last.  So a new master must outrank
any former one: the sync group's notify script (``vrrp-notify.sh``) numbers the
takeovers, on MASTER writes the new number (the lab's stand-in for the
replicated epoch; one counter file for the pair, ``vrrp.epoch``) as its bonus,
and on BACKUP/FAULT/STOP writes 0.  A node that comes back starts at bonus 0
(``init_file 0 overwrite``).  It also appends each transition to
``<node>.state``, read by :func:`vrrp_state`.  The bonus is capped at 154
(priority 254): after 154 takeovers in one lab, ties fall back to the address.

Each gateway runs its own appliance: ``lab-gateway``'s API on 127.0.0.1:8080 (as in
the single-gateway lab, its pid and log ``appliance.pid`` / ``appliance.log``),
``lab-gateway2``'s on 127.0.0.1:8081 (``appliance-gateway2.*``).  Their configs
come from :func:`pair_config` (today the single-gateway lab's config for both;
the hook where the pair's per-node settings go), or from the ``config`` argument
of :func:`up`.

Helpers for tests: :func:`kill_gateway` (silent death), :func:`freeze_gateway` /
:func:`thaw_gateway`, :func:`restart_gateway`, :func:`cut_sync` /
:func:`restore_sync`, :func:`vrrp_master`, :func:`vrrp_state`,
:func:`set_eligible`, :func:`wait_master`.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any
from dataclasses import dataclass
from pathlib import Path

from . import topology as lab

SWITCH = lab.SWITCH
GATEWAY2 = "lab-gateway2"
CLIENT_IF, SERVER_IF, SYNC_IF = "eth-client", "eth-server", "sync0"
SYNC_NET6 = "2001:db8:ff"
REDIS_PORT = 6390         # each gateway's redis-server, bound to its sync address
API_PORT2 = 8081          # lab-gateway2's panel (lab-gateway keeps topology.API_PORT, 8080)
SYNC_GROUP = "lab"
INSTANCES = {"client": 51, "server": 52}  # VRRP instance -> virtual_router_id
ADVERT_INT = 0.1
PRIORITY = 100
MAX_BONUS = 154           # PRIORITY + MAX_BONUS = 254, the highest a non-owner may have
# the floating next hops, per side: (IPv4, IPv6)
FLOATING = {
    "client": (f"{lab.CLIENT_NET}.1", lab.mirror6(f"{lab.CLIENT_NET}.1")),
    "server": (f"{lab.SERVER_NET}.1", lab.mirror6(f"{lab.SERVER_NET}.1")),
}


@dataclass(frozen=True)
class Node:
    """One gateway of the pair."""

    ns: str
    index: int      # 1 or 2
    api_port: int

    @property
    def short(self) -> str:
        return self.ns[len(lab.PREFIX):]

    @property
    def client_ip(self) -> str:
        return f"{lab.CLIENT_NET}.{1 + self.index}"

    @property
    def client_ip6(self) -> str:
        return lab.mirror6(self.client_ip)

    @property
    def server_ip(self) -> str:
        return f"{lab.SERVER_NET}.{1 + self.index}"

    @property
    def server_ip6(self) -> str:
        return lab.mirror6(self.server_ip)

    @property
    def sync_ip(self) -> str:
        # 203.0.113.252/30: outside the client and server networks, so that a cut sync link is cut (with
        # 192.0.2.252/30 the client network's /24 carried the sync traffic on when sync0 went down)
        return f"{lab.VIP_NET}.{252 + self.index}"

    @property
    def sync_ip6(self) -> str:
        return f"{SYNC_NET6}::{self.index}"

    def leg(self, side: str) -> str:
        """The gateway's interface on the ``side`` ("client"/"server") bridge."""
        return CLIENT_IF if side == "client" else SERVER_IF

    def switch_port(self, side: str) -> str:
        """The other end of that leg, a port of the bridge in lab-switch."""
        return f"v-{self.short}-{side[0]}"[:15]

    def own(self, side: str) -> tuple[str, str]:
        return (self.client_ip, self.client_ip6) if side == "client" else (self.server_ip, self.server_ip6)

    @property
    def api(self) -> str:
        return f"http://{lab.API_HOST}:{self.api_port}"

    @property
    def appliance_name(self) -> str:
        """Its appliance's pid and log files in the run dir: ``<name>.pid``, ``<name>.log``."""
        return "appliance" if self.index == 1 else lab.APPLIANCE2

    # keepalived's files, in the run dir
    def file(self, suffix: str) -> Path:
        return lab.run_dir() / f"vrrp-{self.short}.{suffix}"

    @property
    def fifo(self) -> Path:
        """keepalived's notify FIFO (``vrrp_notify_fifo``): the appliance's channel."""
        return self.file("fifo")

    @property
    def ineligible_file(self) -> Path:
        """The eligibility track file: 0 eligible, anything else: FAULT."""
        return self.file("ineligible")

    @property
    def bonus_file(self) -> Path:
        return self.file("bonus")

    @property
    def state_file(self) -> Path:
        return self.file("state")


NODES = (Node(lab.GATEWAY, 1, lab.API_PORT), Node(GATEWAY2, 2, API_PORT2))


def node(name: str | Node) -> Node:
    """A node by namespace (``lab-gateway2``) or short name (``gateway2``)."""
    if isinstance(name, Node):
        return name
    ns = lab.ns_of(name)
    for n in NODES:
        if n.ns == ns:
            return n
    raise ValueError(f"{name} is not a gateway of the pair ({', '.join(n.ns for n in NODES)})")


def peer(n: str | Node) -> Node:
    me = node(n)
    return next(o for o in NODES if o != me)


def is_pair() -> bool:
    return SWITCH in lab.namespaces()


# --- keepalived ---------------------------------------------------------------------------------

NOTIFY_SCRIPT = """\
#!/bin/sh
# written by `appliance lab up --gateways 2` (appliance.lab.pair): keepalived's notify
# for the sync group.  $1: the node's file prefix; then keepalived's GROUP NAME STATE PRIORITY.
# keepalived starts one script per transition and does not wait: two quick transitions (a
# MASTER at start, then BACKUP on hearing the master) may finish in either order.  So the time
# is read first, the rest is done under one lock, and a script older than the last one done
# leaves the bonus alone (the state line keeps its own time: readers sort by it).
t=$(date +%s%N)
p=$1; shift
exec 9>>"{epoch}.lock"
flock 9
last=$(cat "$p.last" 2>/dev/null || echo 0)
if [ "$t" -gt "$last" ]; then
    echo "$t" > "$p.last"
    case "$3" in
    MASTER)
        # the lab's stand-in for the replicated epoch: one takeover counter for the pair;
        # the new master's bonus outranks any former master's
        e=$(( $(cat "{epoch}" 2>/dev/null || echo 0) + 1 ))
        echo "$e" > "{epoch}"
        b=$e; [ "$b" -gt {max_bonus} ] && b={max_bonus}
        echo "$b" > "$p.bonus"
        ;;
    BACKUP|FAULT|STOP)
        echo 0 > "$p.bonus"
        ;;
    esac
fi
echo "$(echo "$t" | sed 's/\\(.........\\)$/.\\1/') $*" >> "$p.state"
"""


def notify_script() -> Path:
    return lab.run_dir() / "vrrp-notify.sh"


def epoch_file() -> Path:
    return lab.run_dir() / "vrrp.epoch"


def keepalived_config(n: Node, advert_int: float = ADVERT_INT) -> str:
    """keepalived.conf for node ``n`` (keepalived 2.2.7's syntax, keepalived.conf(5))."""
    other = peer(n)
    prefix = str(n.file("x"))[:-2]  # .../vrrp-gateway
    instances = "".join(f"""
vrrp_instance {side} {{
    state BACKUP
    nopreempt
    interface {n.leg(side)}
    virtual_router_id {vrid}
    priority {PRIORITY}
    advert_int {advert_int}
    unicast_src_ip {n.own(side)[0]}
    unicast_peer {{
        {other.own(side)[0]}
    }}
    check_unicast_src
    virtual_ipaddress {{
        {FLOATING[side][0]}/24 dev {n.leg(side)}
    }}
    virtual_ipaddress_excluded {{
        {FLOATING[side][1]}/64 dev {n.leg(side)}
    }}
}}
""" for side, vrid in INSTANCES.items())
    return f"""! written by `appliance lab up --gateways 2` for {n.ns} (appliance.lab.pair)
global_defs {{
    router_id {n.ns}
    vrrp_version 3
    script_user root
    vrrp_notify_fifo {n.fifo}
    # one gratuitous ARP / unsolicited NA per address at a takeover, a second round 1 s later
    vrrp_garp_master_delay 1
    vrrp_garp_master_repeat 1
    # a master that hears a lower-priority master (a former one, thawed) re-announces the addresses
    vrrp_garp_lower_prio_repeat 1
    vrrp_garp_lower_prio_delay 1
}}

track_file {n.short}_ineligible {{
    file "{n.ineligible_file}"
    weight 0
    init_file 0
}}

track_file {n.short}_bonus {{
    file "{n.bonus_file}"
    weight 1
    init_file 0 overwrite
}}

vrrp_sync_group {SYNC_GROUP} {{
    group {{
{''.join(f"        {side}{chr(10)}" for side in INSTANCES)}    }}
    track_file {{
        {n.short}_ineligible weight 0
        {n.short}_bonus weight 1
    }}
    notify "{notify_script()} {prefix}"
}}
{instances}"""


def _pidfiles(n: Node) -> tuple[Path, Path]:
    return n.file("pid"), n.file("vrrp.pid")


def keepalived_pid(n: str | Node) -> int | None:
    return lab.pid_alive(_pidfiles(node(n))[0])


def start_keepalived(n: str | Node, advert_int: float | None = None) -> int:
    """keepalived in the gateway's namespace (if it is not running), in the
    foreground (``-n``) so its pid is known, logging to ``vrrp-<node>.log``;
    its config written anew with ``advert_int``, else kept (as :func:`up` wrote it)."""
    nd = node(n)
    pid = keepalived_pid(nd)
    if pid:
        return pid
    conf = nd.file("conf")
    if advert_int is not None or not conf.exists():
        conf.write_text(keepalived_config(nd, advert_int or ADVERT_INT))
    script = notify_script()
    script.write_text(NOTIFY_SCRIPT.format(epoch=epoch_file(), max_bonus=MAX_BONUS))
    script.chmod(0o755)
    if not nd.fifo.exists():
        os.mkfifo(nd.fifo, 0o600)
    if not nd.ineligible_file.exists():
        nd.ineligible_file.write_text("0\n")
    main_pid, vrrp_pid = _pidfiles(nd)
    log = open(nd.file("log"), "ab")
    proc = subprocess.Popen(
        ["ip", "netns", "exec", nd.ns, "keepalived", "--dont-fork", "--log-console", "--log-detail",
         "--no-syslog", "--vrrp", "--use-file", str(conf), "--pid", str(main_pid), "--vrrp_pid", str(vrrp_pid)],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
    )
    log.close()
    # keepalived writes its pid file itself; until then, the foreground process is it
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"keepalived exited with {proc.returncode}; see {nd.file('log')}")
        if lab.pid_alive(vrrp_pid) and lab.pid_alive(main_pid):
            return proc.pid
        time.sleep(0.05)
    raise RuntimeError(f"keepalived did not start in {nd.ns}; see {nd.file('log')}")


# --- the layout ---------------------------------------------------------------------------------

def redis_pid(n: str | Node) -> int | None:
    return lab.pid_alive(node(n).file("redis.pid"))


def start_redis(n: str | Node) -> int:
    """Node ``n``'s redis-server on its sync address (memory only, or with an fsynced
    append-only file in the run dir when the lab is up with ``disk``; the appliance makes it a
    master or a replica); its log in the run dir.  A running one is kept."""
    from appliance.replication_redis import server_argv

    nd = node(n)
    pid = redis_pid(nd)
    if pid:
        return pid
    wd = nd.file("redis")
    wd.mkdir(parents=True, exist_ok=True)
    log = open(nd.file("redis.log"), "ab")
    argv = server_argv(nd.sync_ip, REDIS_PORT, wd, durable=nd.file("redis-disk").exists())
    proc = subprocess.Popen(["ip", "netns", "exec", nd.ns, *argv],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    log.close()
    nd.file("redis.pid").write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + 10
    while True:
        r = lab.sh("ip", "netns", "exec", nd.ns, "redis-cli", "-h", nd.sync_ip, "-p", str(REDIS_PORT), "PING",
                   check=False)
        if r.stdout.strip() == "PONG":
            return proc.pid
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"redis-server in {nd.ns} did not start: "
                               f"{nd.file('redis.log').read_text(errors='replace')[-2000:]}")
        time.sleep(0.02)


def _sysctls(ns: str) -> None:
    for k, v in (("net.ipv4.ip_forward", "1"), ("net.ipv4.conf.all.rp_filter", "0"),
                 ("net.ipv4.conf.default.rp_filter", "0"), ("net.ipv6.conf.all.forwarding", "1"),
                 # an address set on a leg survives the leg going down and up (kill / restart)
                 ("net.ipv6.conf.all.keep_addr_on_down", "1"),
                 ("net.ipv6.conf.default.keep_addr_on_down", "1"),
                 ("net.ipv6.conf.default.accept_dad", "0")):
        lab.nsexec(ns, "sysctl", "-qw", f"{k}={v}")


def _no_dad(ns: str, dev: str) -> None:
    """No duplicate address detection on ``dev``, for its link-local address too: a
    tentative link-local address (a second or so after the link comes up) delays
    neighbour discovery, and keepalived's unsolicited neighbour adverts come from it."""
    lab.nsexec(ns, "sysctl", "-qw", f"net.ipv6.conf.{dev}.accept_dad=0")


def _ensure_switch() -> None:
    lab._ensure_ns(SWITCH)
    # bridged frames are not routed traffic: keep them out of iptables (as in the single lab)
    for k in ("net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables",
              "net.bridge.bridge-nf-call-arptables"):
        lab.nsexec(SWITCH, "sysctl", "-qw", f"{k}=0", check=False)
    for br in ("br-client", "br-server"):
        if not lab.link_exists(SWITCH, br):
            # no multicast snooping: neighbour discovery's multicast reaches every port
            lab.sh("ip", "-n", SWITCH, "link", "add", br, "type", "bridge", "mcast_snooping", "0")
        lab.sh("ip", "-n", SWITCH, "link", "set", br, "up")


def _ensure_legs(n: Node) -> None:
    for side in ("client", "server"):
        leg, port = n.leg(side), n.switch_port(side)
        if not lab.link_exists(n.ns, leg):
            if lab.link_exists(SWITCH, port):
                lab.sh("ip", "-n", SWITCH, "link", "del", port)
            lab.sh("ip", "link", "add", leg, "netns", n.ns, "mtu", "1500", "type", "veth",
                   "peer", "name", port, "netns", SWITCH, "mtu", "1500")
        lab.sh("ip", "-n", SWITCH, "link", "set", port, "master", f"br-{side}", "up")
        v4, v6 = n.own(side)
        lab.sh("ip", "-n", n.ns, "addr", "replace", f"{v4}/24", "dev", leg)
        lab.sh("ip", "-n", n.ns, "addr", "replace", f"{v6}/64", "dev", leg, "nodad")
        _no_dad(n.ns, leg)
        lab.sh("ip", "-n", n.ns, "link", "set", leg, "up")


def _ensure_sync_link() -> None:
    a, b = NODES
    if not (lab.link_exists(a.ns, SYNC_IF) and lab.link_exists(b.ns, SYNC_IF)):
        for n in NODES:
            if lab.link_exists(n.ns, SYNC_IF):
                lab.sh("ip", "-n", n.ns, "link", "del", SYNC_IF)
        lab.sh("ip", "link", "add", SYNC_IF, "netns", a.ns, "mtu", "1500", "type", "veth",
               "peer", "name", SYNC_IF, "netns", b.ns, "mtu", "1500")
    for n in NODES:
        lab.sh("ip", "-n", n.ns, "addr", "replace", f"{n.sync_ip}/30", "dev", SYNC_IF)
        lab.sh("ip", "-n", n.ns, "addr", "replace", f"{n.sync_ip6}/64", "dev", SYNC_IF, "nodad")
        _no_dad(n.ns, SYNC_IF)
        lab.sh("ip", "-n", n.ns, "link", "set", SYNC_IF, "up")


def plain_config(n: Node, base: str) -> str:
    """Node ``n``'s configuration without the pair: the single-gateway lab's ``base`` but for
    the API's port (each gateway protects connections from its servers' death only; a test of
    keepalived alone)."""
    return base.replace(f'listen = "{lab.API_HOST}:{lab.API_PORT}"', f'listen = "{lab.API_HOST}:{n.api_port}"', 1)


def pair_config(n: Node, base: str, **pair: object) -> str:
    """Node ``n``'s configuration as one node of the pair: ``store.mode = "peer"`` and its
    ``[pair]`` (its Redis and the peer's on the sync link, keepalived's FIFO and track file,
    its epoch file in the run dir); ``pair``: more ``[pair]`` keys (``lease``, ``wait_ms``)."""
    text = plain_config(n, base).replace("[gateway]\n", '[gateway]\non_failure = "closed"\n', 1)
    p = peer(n)
    keys: dict[str, object] = {
        "node": n.index, "redis": f"{n.sync_ip}:{REDIS_PORT}", "peer_redis": f"{p.sync_ip}:{REDIS_PORT}",
        "vrrp_fifo": str(n.fifo), "eligibility_file": str(n.ineligible_file), "epoch_file": str(n.file("epoch")),
        **pair}
    return (text + '\n[store]\nmode = "peer"\n\n[pair]\n'
            + "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items()))


ConfigHook = Callable[[Node, str], str]


def config_path(n: str | Node) -> Path:
    """Node ``n``'s appliance configuration: ``gateway.toml`` for lab-gateway (as in the
    single-gateway lab), ``gateway-<node>.toml`` for the other."""
    nd = node(n)
    return lab.run_dir() / ("gateway.toml" if nd.index == 1 else f"gateway-{nd.short}.toml")


def start_appliance(n: str | Node, config: Path | None = None) -> int:
    """``appliance run`` in node ``n`` with its configuration, its API on ``n.api_port``."""
    nd = node(n)
    return lab.start_appliance(config or config_path(nd), ns=nd.ns, api_port=nd.api_port, name=nd.appliance_name)


def stop_appliance(n: str | Node) -> None:
    lab.stop_appliance(name=node(n).appliance_name)


def up(clients: int = 1, backups: int = 1, appliance: bool = True,
       config: ConfigHook = pair_config, advert_int: float = ADVERT_INT, disk: bool = False) -> dict[str, object]:
    """Build (or complete) the two-gateway lab, start keepalived on both gateways
    (VRRP adverts every ``advert_int`` seconds; a running keepalived is kept as it is),
    wait for one of them to hold the floating addresses, then start each
    gateway's appliance with ``config(node, base)``.  ``disk``: peer plus disk, each
    gateway's Redis keeping an fsynced append-only file in the run dir (and ``[pair] disk``
    in the default configuration).  Idempotent; a single-gateway lab is taken down first."""
    if clients < 1 or backups < 1:
        raise ValueError("--clients and --backups must be at least 1")
    if lab.GATEWAY in lab.namespaces() and not is_pair():
        lab.down()
    rd = lab.run_dir()
    rd.mkdir(parents=True, exist_ok=True)
    hosts = lab.topology(clients, backups)
    _ensure_switch()
    for n in NODES:
        lab._ensure_ns(n.ns)
        _sysctls(n.ns)
        _ensure_legs(n)
    _ensure_sync_link()
    for h in hosts:
        lab._ensure_host(h, switch=SWITCH)
    www = lab.cache_dir() / "www"
    sums = lab.make_test_files(www)
    for h in hosts:
        if h.role != "client":
            lab.start_nginx(h, www)
            lab.start_iperf(h)
            lab.start_upload_app(h)
            lab.start_agent(h)
            lab.start_fileserver(h)
    token_file = rd / "token"
    if not token_file.exists():
        token_file.write_text(secrets.token_urlsafe(24) + "\n")
        token_file.chmod(0o600)
    base = lab.gateway_config(hosts, token_file, lab.agent_key_file(), lab.checkpoint_key_file())
    (rd / "topology.json").write_text(json.dumps([h.__dict__ for h in hosts], indent=1))
    for n in NODES:
        if disk:
            n.file("redis-disk").write_text("appendonly yes, appendfsync always\n")
        start_redis(n)
        start_keepalived(n, advert_int)
    master = wait_master(timeout=15)
    if disk and config is pair_config:
        def config(n: Node, base: str) -> str:
            return pair_config(n, base, disk=True)
    pids: dict[str, int | None] = {}
    peered = True
    for n in NODES:
        path = config_path(n)
        text = config(n, base)
        peered = peered and '\nmode = "peer"\n' in text
        path.write_text(text)
        pids[n.ns] = start_appliance(n, path) if appliance else None
    ready = wait_pair_ready() if appliance and peered else None
    return {**lab.lab_info(rd, hosts, token_file, pids[lab.GATEWAY], sums),
            "gateways": [gateway_info(n, pids[n.ns]) for n in NODES], "vrrp_master": master, "pair": ready}


def gateway_info(n: Node, appliance_pid: int | None = None) -> dict[str, object]:
    return {"ns": n.ns, "api": n.api, "client": [n.client_ip, n.client_ip6], "server": [n.server_ip, n.server_ip6],
            "sync": [n.sync_ip, n.sync_ip6], "appliance_pid": appliance_pid, "keepalived_pid": keepalived_pid(n),
            "vrrp_state": vrrp_state(n), "config": str(config_path(n)), "notify_fifo": str(n.fifo),
            "ineligible_file": str(n.ineligible_file)}


def status() -> dict[str, object]:
    return {"gateways": 2, "vrrp_master": vrrp_master(),
            "pair": [gateway_info(n, lab.pid_alive(lab.run_dir() / f"{n.appliance_name}.pid"))
                     for n in NODES if n.ns in lab.namespaces()]}


# --- observing the role ---------------------------------------------------------------------------

def pair_status(n: str | Node, timeout: float = 2.0) -> dict[str, Any] | None:
    """The ``pair`` part of node ``n``'s ``GET /api/v1/status`` (None: its appliance does not answer)."""
    import urllib.request

    nd = node(n)
    tok = (lab.run_dir() / "token").read_text().strip()
    req = urllib.request.Request(f"{nd.api}/api/v1/status", headers={"Authorization": f"Bearer {tok}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            doc = json.loads(r.read())
    except (OSError, ValueError):
        return None
    p = doc.get("pair")
    return p if isinstance(p, dict) else None


def wait_pair_ready(timeout: float = 30.0, active: str | None = None) -> dict[str, str]:
    """Wait until one appliance is the active (forwarding) and the other a standby in sync (with
    ``active``: that node is the active); {"active": ns, "standby": ns}."""
    deadline = time.monotonic() + timeout
    last: dict[str, object] = {}
    while True:
        st = {n.ns: pair_status(n) for n in NODES}
        last = {ns: (None if p is None else {k: p.get(k) for k in ("role", "epoch", "vrrp", "forwarding",
                                                                   "in_sync", "out_of_sync_reason")})
                for ns, p in st.items()}
        act = [ns for ns, p in st.items() if p is not None and p.get("role") == "active" and p.get("forwarding")]
        sby = [ns for ns, p in st.items() if p is not None and p.get("role") == "standby" and p.get("in_sync")]
        if len(act) == 1 and len(sby) == 1 and (active is None or act[0] == active):
            return {"active": act[0], "standby": sby[0]}
        if time.monotonic() > deadline:
            raise RuntimeError(f"the pair is not ready within {timeout} s: {last}")
        time.sleep(0.05)


def floating_addresses(n: str | Node) -> set[str]:
    """The floating addresses node ``n`` holds now: on a leg that is up (a gateway
    killed by :func:`kill_gateway` keeps them on its dead legs, where they reach no one)."""
    nd = node(n)
    out = lab.sh("ip", "-n", nd.ns, "-j", "addr", "show", check=False).stdout
    try:
        links = json.loads(out or "[]")
    except ValueError:
        return set()
    wanted = {a for pair in FLOATING.values() for a in pair}
    return {a["local"] for link in links if "UP" in link.get("flags", [])
            for a in link.get("addr_info", []) if a.get("local") in wanted}


def all_floating() -> set[str]:
    return {a for pair in FLOATING.values() for a in pair}


def vrrp_master() -> str | None:
    """The gateway (namespace) that holds every floating address while the other holds
    none; None when neither does, or they share them."""
    held = {n.ns: floating_addresses(n) for n in NODES}
    full = [ns for ns, addrs in held.items() if addrs == all_floating()]
    if len(full) == 1 and all(not addrs for ns, addrs in held.items() if ns != full[0]):
        return full[0]
    return None


def vrrp_transitions(n: str | Node) -> list[tuple[float, str, int]]:
    """The sync group's transitions on node ``n`` as its notify script recorded them:
    (time, state, priority), oldest first."""
    try:
        lines = node(n).state_file.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split()
        if len(parts) == 5 and parts[1] == "GROUP":
            try:
                out.append((float(parts[0]), parts[3], int(parts[4])))
            except ValueError:
                pass
    return sorted(out, key=lambda x: x[0])  # (the scripts may finish out of order: see NOTIFY_SCRIPT)


def vrrp_state(n: str | Node) -> str | None:
    """The sync group's last state on node ``n`` (MASTER, BACKUP, FAULT, STOP), or None."""
    t = vrrp_transitions(n)
    return t[-1][1] if t else None


_PRIO = re.compile(r"\((\w+)\) Changing effective priority from (\d+) to (\d+)")


def effective_priority(n: str | Node, instance: str = "client") -> int:
    """Node ``n``'s effective priority for ``instance`` as its keepalived last logged it."""
    prio = PRIORITY
    try:
        text = node(n).file("log").read_text(errors="replace")
    except OSError:
        return prio
    start = text.rfind("Starting Keepalived")  # this run of keepalived only (the log is appended to)
    for m in _PRIO.finditer(text, max(start, 0)):
        if m.group(1) == instance:
            prio = int(m.group(3))
    return prio


def wait_master(timeout: float = 10.0, not_: str | None = None) -> str:
    """Wait until exactly one gateway holds every floating address (and, with ``not_``,
    that it is not that one); its namespace."""
    deadline = time.monotonic() + timeout
    while True:
        m = vrrp_master()
        if m is not None and m != not_:
            return m
        if time.monotonic() > deadline:
            held = {n.ns: sorted(floating_addresses(n)) for n in NODES if n.ns in lab.namespaces()}
            raise RuntimeError(f"no single VRRP master within {timeout} s: {held}")
        time.sleep(0.02)


# --- faults ---------------------------------------------------------------------------------------

def _ns_pids(ns: str) -> list[int]:
    out = lab.sh("ip", "netns", "pids", ns, check=False).stdout.split()
    return [int(p) for p in out if p.isdigit()]


def _signal_all(ns: str, sig: int) -> list[int]:
    pids = _ns_pids(ns)
    for p in pids:
        try:
            os.kill(p, sig)
        except OSError:
            pass
    return pids


def _legs(n: Node) -> tuple[str, ...]:
    return (CLIENT_IF, SERVER_IF, SYNC_IF)


def kill_gateway(name: str | Node, timeout: float = 10.0) -> None:
    """Silent death: every process in the gateway's namespace killed (SIGKILL: keepalived
    sends no priority-0 advert, the appliance cleans nothing), then its links down.
    The floating addresses it held stay on its (dead) legs; :func:`restart_gateway`
    removes them before keepalived starts again."""
    nd = node(name)
    # stopped first, all at once: killed one by one, keepalived's child would get its
    # parent's death signal (SIGTERM) and leave gracefully (priority-0 adverts, STOP)
    _signal_all(nd.ns, signal.SIGSTOP)
    for leg in _legs(nd):
        lab.sh("ip", "-n", nd.ns, "link", "set", leg, "down", check=False)
    _kill_all(nd, timeout)


def _kill_all(nd: Node, timeout: float = 10.0) -> None:
    """SIGKILL every process in the namespace until none is left (a stopped process
    dies of SIGKILL too; keepalived's parent would respawn a child it sees die)."""
    deadline = time.monotonic() + timeout
    _signal_all(nd.ns, signal.SIGSTOP)
    while _signal_all(nd.ns, signal.SIGKILL):
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes in {nd.ns} survive SIGKILL: {_ns_pids(nd.ns)}")
        time.sleep(0.01)


def freeze_gateway(name: str | Node) -> list[int]:
    """SIGSTOP every process in the gateway's namespace (its kernel still forwards,
    answers ARP and keeps its addresses); the pids stopped."""
    return _signal_all(node(name).ns, signal.SIGSTOP)


def thaw_gateway(name: str | Node) -> list[int]:
    """SIGCONT every process in the gateway's namespace."""
    return _signal_all(node(name).ns, signal.SIGCONT)


def restart_gateway(name: str | Node, eligible: bool | None = None, appliance: bool = True) -> None:
    """The gateway comes back: whatever still runs in it killed, its links up, the
    floating addresses it held at its death removed, its eligibility file written
    (``eligible``; by default eligible only without an appliance: the appliance makes its node
    eligible once it is in sync, and a node keepalived made master before its appliance runs
    would forward with nobody logging, through the queues' bypass), keepalived started (it
    comes up BACKUP, bonus 0), then its appliance with its configuration."""
    if eligible is None:
        eligible = not appliance
    nd = node(name)
    _kill_all(nd)
    # everything in the namespace is dead, but a killed keepalived child may linger a moment as a
    # zombie, which keepalived's own check takes for a running daemon ("already running")
    for f in _pidfiles(nd):
        f.unlink(missing_ok=True)
    for side, (v4, v6) in FLOATING.items():
        lab.sh("ip", "-n", nd.ns, "addr", "del", f"{v4}/24", "dev", nd.leg(side), check=False)
        lab.sh("ip", "-n", nd.ns, "addr", "del", f"{v6}/64", "dev", nd.leg(side), check=False)
    _ensure_legs(nd)
    _ensure_sync_link()
    set_eligible(nd, eligible)
    start_redis(nd)
    start_keepalived(nd)
    if appliance:
        start_appliance(nd)


def set_eligible(name: str | Node, eligible: bool) -> None:
    """Write the node's eligibility track file: ``False`` puts its sync group in FAULT
    (it gives up the role if it has it, and never takes it) until set ``True``."""
    path = node(name).ineligible_file
    tmp = path.with_suffix(".tmp")
    tmp.write_text("0\n" if eligible else "1\n")
    tmp.rename(path)  # one inotify event, one whole value


def cut_sync() -> None:
    """The sync link goes down (both ends lose carrier); VRRP does not use it."""
    lab.sh("ip", "-n", NODES[0].ns, "link", "set", SYNC_IF, "down")


def restore_sync() -> None:
    """Both ends of the sync link up, with their addresses."""
    _ensure_sync_link()
