"""Appliance configuration: a TOML file, validated into typed settings.

Every error names the field it is about, as a dotted path
(``service[0].backend[1].address``), so an operator can fix a file without
reading code.  Unknown keys are errors too: a misspelt option silently
ignored is how appliances end up running with defaults nobody chose.

Example::

    [gateway]
    queue_num = 0                # uses queues queue_num .. queue_num + 2
    on_malformed = "accept"      # or "drop": what to do with packets we cannot parse
    max_connections = 65536
    on_failure = "open"          # appliance down: "open" bypasses it, "closed" holds traffic
    engine = "native"            # the queue binding: "native" (batched, GSO) or "python" (NetfilterQueue)

    [store]                      # the checkpoint store (tcpcp 6): where commit points come from
    mode = "memory"              # or "disk": SQLite WAL, group commit + fsync, survives restarts;
                                 # or "peer": replicated to the standby gateway of a pair ([pair])
    path = "/var/lib/appliance/checkpoints.db"
    commit_interval = 0.005      # seconds between the starts of two group commits (disk, peer)
    max_total_bytes = 1073741824 # client bytes held for all connections together

    # [pair]                     # the gateway pair (store.mode = "peer"; docs/GATEWAY_PAIR.md)
    # node = 1                   # this gateway: 1 or 2 (its epochs are odd or even)
    # redis = "203.0.113.253:6390" # this gateway's redis-server, on the sync link
    # peer_redis = "203.0.113.254:6390"  # the peer gateway's
    # vrrp_fifo = "/run/appliance/vrrp.fifo"           # keepalived's vrrp_notify_fifo
    # eligibility_file = "/run/appliance/ineligible"   # keepalived's track_file (0: eligible)
    # epoch_file = "/var/lib/appliance/epoch"          # the highest epoch this node has known
    # lease = 0.4                # seconds a proof of the role holds; a takeover waits it out: keep
    #                            # it near keepalived's master-down interval (3 adverts + skew)
    # sync_lease = 2.0           # seconds a sync check keeps the standby in sync (and an active
    #                            # alone waits before releasing): several times that interval
    # wait_ms = 200              # a commit waits this long for the standby, then goes on alone
    # disk = false               # peer plus disk: each node's Redis keeps an fsynced append-only
    #                            # file (appendonly yes, appendfsync always), so the pair survives
    #                            # both gateways dying at once; a node whose Redis is not so is never
    #                            # eligible

    [checkpoint]                 # portable checkpoints and resurrection (tcpcp 6.1, 7)
    # key_file = "/etc/appliance/checkpoint.key"  # HMAC key signing checkpoints (or key = "...")
    msl = 120.0                  # a checkpoint older than this is never resumed

    [agent]                      # the backends' endpoint agents (failover.mode = "resume")
    # key_file = "/etc/appliance/agent.key"  # HMAC key shared with the agents (or key = "...")
    timeout = 5.0                # seconds one agent request may take
    heartbeat = 0.5              # seconds between polls of the applications' reported offsets

    [api]
    listen = "127.0.0.1:8080"
    token = "change-me"          # or token_file = "/etc/appliance/token"

    [[service]]
    name = "web"
    vip = "203.0.113.10"         # IPv4 clients; vip6 = "2001:db8:113::10" for IPv6 ones (either or both)
    port = 80

    [service.health]             # optional; these are the defaults
    check = "tcp"                # or "http": GET path, status within expect
    interval = 0.1               # seconds between probe starts
    # timeout = 0.1              # defaults to the interval
    rise = 2                     # consecutive successes: down -> up
    fall = 3                     # consecutive failures: up -> down
    path = "/"                   # http only
    expect = [200, 399]          # http only: statuses that count as up

    [service.failover]           # optional; these are the defaults
    auto = true                  # fail over when the active backend goes down
    mode = "replay"              # or "resume": an agent on the backup re-creates the socket
    max_log_bytes = 16777216     # client bytes kept per connection for replay
    verify = "full"              # hash every server byte ("sampled": faster, samples only)
    replay = "stream"            # or "http": replay from the last finished HTTP/1.x exchange,
                                 # range-resume the response in flight (README: when it is valid)
    volatile = ["http-date"]     # fields masked before comparing (the default)
    syn_retries = 6
    move_timeout = 10.0          # seconds

    [[service.backend]]
    name = "primary"
    address = "198.51.100.10"    # for the vip's clients; address6 = "2001:db8:100::10" for the vip6's

    [[service.backend]]
    name = "backup"
    address = "198.51.100.20"
    admin_state = "ready"        # or "drain", "maint"
    # agent = "198.51.100.20:7070"  # its endpoint agent (required by failover.mode = "resume")

    # [testing]                  # the test suite's and the lab's only: refused unless the
    # store_commit_delay = 0.05  # environment has APPLIANCE_TESTING=1 (every disk commit takes this long)
    # memsearch = "memmem"       # the digest's search: "memfind" (the fastest), "memmem", "bytes.find"
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from checkpoint import memsearch
from checkpoint.addr import with_port
from checkpoint.streamlog import VOLATILE

from .health import HealthConfig
from .credentials import parse_tokens, parse_users
from .configfields import _bool, _float, _int, _no_unknown, _str, _table
from .errors import ConfigError
from .notify import parse_notify

__all__ = ["ConfigError"]


@dataclass(frozen=True, slots=True)
class BackendConfig:
    name: str
    address: str | None             # IPv4 (the service's IPv4 clients reach the backend here)
    port: int
    admin_state: str = "ready"      # "ready" | "drain" | "maint"
    agent: str | None = None        # "HOST:PORT" of the endpoint agent on this backend (resume mode)
    address6: str | None = None     # IPv6 (the service's IPv6 clients reach the backend here)

    @property
    def addresses(self) -> tuple[str, ...]:
        return tuple(a for a in (self.address, self.address6) if a is not None)

    @property
    def probe_address(self) -> str:
        """Where health probes go: the IPv4 address if it has one, else the IPv6 one."""
        return self.address or self.address6 or ""


@dataclass(frozen=True, slots=True)
class FailoverConfig:
    auto: bool = True               # fail over when the active backend goes down
    mode: str = "replay"            # "replay" (unmodified backend) or "resume" (agent + TCP_REPAIR)
    max_log_bytes: int = 16 << 20   # client byte log kept per connection for replay
    verify: str = "full"            # "full": every server byte hashed; "sampled": observed path, samples
    replay: str = "stream"          # "stream": from the first byte; "http": from the last HTTP exchange boundary
    syn_retries: int = 6
    move_timeout: float = 10.0      # seconds
    # fields whose values may differ in a regenerated stream, masked for the divergence check
    volatile: tuple[str, ...] = ("http-date",)


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    name: str
    vip: str | None                 # the IPv4 service address, or None (IPv6 only)
    port: int
    backends: tuple[BackendConfig, ...]
    health: HealthConfig = field(default_factory=HealthConfig)
    failover: FailoverConfig = field(default_factory=FailoverConfig)
    vip6: str | None = None         # the IPv6 service address, or None (IPv4 only)

    @property
    def vips(self) -> tuple[str, ...]:
        """Every address the service answers on (IPv4 first)."""
        return tuple(a for a in (self.vip, self.vip6) if a is not None)

    def backend(self, name: str) -> BackendConfig | None:
        return next((b for b in self.backends if b.name == name), None)


@dataclass(frozen=True, slots=True)
class TimeoutConfig:
    opening: float = 30.0
    established: float = 3600.0
    closing: float = 120.0
    finished: float = 10.0


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    queue_num: int = 0
    on_malformed: str = "accept"
    max_connections: int = 65536
    on_failure: str = "open"        # appliance gone: "open" bypasses the queue (kernel fallback NAT), "closed" holds
    queue_full: str = "drop"        # queue overflow: "drop" (TCP retransmits) or "accept" unseen
    engine: str = "native"          # the NFQUEUE binding: "native" (nfq.native) or "python" (NetfilterQueue)
    # the native engine decides the pure ACKs and in-order data of ordinary connections in
    # compiled code (appliance.dataplane.offload); false: every packet runs the Python engine
    fastpath: bool = True
    timeouts: TimeoutConfig = field(default_factory=TimeoutConfig)
    failover_batch: int = 32        # connections a failover moves before the loop reads the queues again
    # test only, from [testing] memsearch (refused without APPLIANCE_TESTING=1): the digest's search
    # for volatile fields (checkpoint.memsearch; None: the fastest), so a benchmark can run the old one
    test_memsearch: str | None = None

    @property
    def fail_open(self) -> bool:
        return self.on_failure == "open"


ENGINES = ("native", "python")  # gateway.engine: the NFQUEUE binding the data path reads with
STORE_MODES = ("memory", "disk", "peer")
GATED_MODES = ("disk", "peer")  # a commit point below the log's end: the delayed-ACK gate
FAILOVER_MODES = ("replay", "resume")
REPLAY_KINDS = ("stream", "http")


@dataclass(frozen=True, slots=True)
class StoreConfig:
    mode: str = "memory"            # "memory" | "disk" | "peer" (replicated to the pair's standby)
    path: str = "/var/lib/appliance/checkpoints.db"
    commit_interval: float = 0.005  # seconds between the starts of two group commits (at least)
    max_total_bytes: int = 1 << 30  # client log bytes held over all connections
    # test only, from [testing] store_commit_delay (refused without APPLIANCE_TESTING=1):
    # every commit takes at least this long (to watch delayed ACKs at work)
    test_commit_delay: float = 0.0

    @property
    def gated(self) -> bool:
        """Is a byte committed later than it is logged (the delayed-ACK gate holds ACKs)?"""
        return self.mode in GATED_MODES


@dataclass(frozen=True, slots=True)
class PairConfig:
    """The gateway pair (``store.mode = "peer"``): this node, its Redis and the peer's, and the
    files keepalived shares with the appliance."""

    node: int                       # 1 or 2: this node's epochs are odd (1) or even (2)
    redis: str                      # "IP:PORT" of this node's redis-server (the sync link)
    peer_redis: str                 # "IP:PORT" of the peer's
    vrrp_fifo: str                  # keepalived's vrrp_notify_fifo
    eligibility_file: str           # keepalived's track_file: "0" eligible, "1" not (FAULT)
    epoch_file: str                 # the highest epoch this node has known (survives restarts)
    lease: float = 0.4              # seconds a proof of the role holds (a takeover waits until one has
    #                                 passed since the former active's last proof)
    sync_lease: float = 2.0         # seconds a passing sync check keeps the standby in sync, and an
    #                                 active alone waits before releasing unacknowledged batches; must
    #                                 outlast keepalived's detection (3 adverts + skew) plus a check
    wait_ms: int = 200              # how long a commit waits for the standby before going on alone
    disk: bool = False              # peer plus disk: this node's Redis must fsync every write (its AOF)


@dataclass(frozen=True, slots=True)
class CheckpointConfig:
    key: bytes = b""                # HMAC-SHA256 key of exported checkpoints (empty: export refused)
    msl: float = 120.0              # seconds: an older checkpoint is not resumed (tcpcp 6.1)


@dataclass(frozen=True, slots=True)
class AgentsConfig:
    """How the gateway talks to the backends' endpoint agents (resume mode)."""

    key: bytes = b""                # HMAC-SHA256 key shared with the agents (empty: no agents)
    timeout: float = 5.0            # seconds one agent request may take
    heartbeat: float = 0.5          # seconds between polls of the applications' reported offsets


@dataclass(frozen=True, slots=True)
class ApiConfig:
    listen: str = "127.0.0.1:8080"
    token: str = ""
    users: tuple[Any, ...] = ()         # webui.auth.UserConfig: panel logins with roles
    tokens: tuple[Any, ...] = ()        # webui.auth.TokenConfig: REST tokens with roles
    audit_file: str | None = None       # audit trail appended here as JSON lines
    login_attempts: int = 5             # failed sign-ins per source address and per user ...
    login_window: float = 60.0          # ... within this many seconds; beyond: 429
    tls_cert: str | None = None         # PEM certificate (chain): the panel and API serve HTTPS
    tls_key: str | None = None          # its private key
    allow_plain_http: bool = False      # listen beyond localhost without TLS anyway

    @property
    def host(self) -> str:
        return self.listen.rsplit(":", 1)[0]

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])


@dataclass(frozen=True, slots=True)
class HistoryConfig:
    """What the gateway keeps of connections that are over (appliance.history)."""

    max_connections: int = 10000    # closed connections kept; the oldest is dropped first
    max_bytes: int = 64 << 20       # their documents, timelines and pcaps together


@dataclass(frozen=True, slots=True)
class LogConfig:
    """A log line per connection, failover and move (appliance.connlog)."""

    connections: str = "stdout"     # "stdout" (the journal under systemd), "file" or "off"
    format: str = "text"            # or "json"
    path: str = "/var/log/appliance/connections.log"  # connections = "file"


@dataclass(frozen=True, slots=True)
class Config:
    gateway: GatewayConfig
    api: ApiConfig
    services: tuple[ServiceConfig, ...]
    store: StoreConfig = field(default_factory=StoreConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    agent: AgentsConfig = field(default_factory=AgentsConfig)
    history: HistoryConfig = field(default_factory=HistoryConfig)  # appliance.history
    log: LogConfig = field(default_factory=LogConfig)              # appliance.connlog
    notify: tuple[Any, ...] = ()        # appliance.notify.NotifyConfig: [[notify]] entries
    pair: PairConfig | None = None      # the gateway pair (store.mode = "peer")

    def service(self, name: str) -> ServiceConfig | None:
        return next((s for s in self.services if s.name == name), None)


# --- validation helpers -----------------------------------------------------

def _ipv4(data: dict[str, Any], key: str, where: str) -> str:
    v = _str(data, key, where)
    try:
        return str(ipaddress.IPv4Address(v))
    except ValueError:
        raise ConfigError(f"{where}.{key}", f"{v!r} is not an IPv4 address") from None


def _ipv6(data: dict[str, Any], key: str, where: str) -> str:
    v = _str(data, key, where)
    try:
        a = ipaddress.IPv6Address(v)
    except ValueError:
        raise ConfigError(f"{where}.{key}", f"{v!r} is not an IPv6 address") from None
    if a.ipv4_mapped is not None or a.is_multicast or a.is_unspecified or a.is_link_local:
        raise ConfigError(f"{where}.{key}", f"{v!r}: a service or backend address must be a global or "
                                            "unique-local unicast IPv6 address (not mapped, multicast, "
                                            "unspecified or link-local)")
    return str(a)


def _choice(data: dict[str, Any], key: str, where: str, default: str, choices: tuple[str, ...]) -> str:
    v = _str(data, key, where, default)
    if v not in choices:
        raise ConfigError(f"{where}.{key}", f"must be one of {', '.join(choices)}, got {v!r}")
    return v


def _secret(data: dict[str, Any], key: str, where: str, base: Path, min_len: int, required: bool) -> str:
    """A secret given inline (``key``) or read from a file (``key_file``, relative
    to the configuration's folder); empty when neither is given and not required."""
    if key in data and f"{key}_file" in data:
        raise ConfigError(f"{where}.{key}", f"give {key} or {key}_file, not both")
    if f"{key}_file" in data:
        field = f"{key}_file"
        path = base / _str(data, field, where)
        try:
            value = path.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{where}.{field}", f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    elif key in data or required:
        field = key
        value = _str(data, key, where)
    else:
        return ""
    if len(value) < min_len:
        raise ConfigError(f"{where}.{field}", f"must be at least {min_len} characters")
    return value


def _name(data: dict[str, Any], where: str) -> str:
    v = _str(data, "name", where)
    if not v.replace("-", "").replace("_", "").isalnum():
        raise ConfigError(f"{where}.name", f"{v!r}: use letters, digits, '-' and '_' only")
    return v


# --- sections ------------------------------------------------------------------

def _gateway(data: dict[str, Any]) -> GatewayConfig:
    where = "gateway"
    _no_unknown(data, {"queue_num", "on_malformed", "max_connections", "on_failure", "fail_open", "queue_full",
                       "timeouts", "failover_batch", "engine", "fastpath"}, where)
    if "fail_open" in data:  # the older spelling
        if "on_failure" in data:
            raise ConfigError(f"{where}.fail_open", "give on_failure or fail_open, not both")
        on_failure = "open" if _bool(data, "fail_open", where, True) else "closed"
    else:
        on_failure = _choice(data, "on_failure", where, "open", ("open", "closed"))
    t = _table(data.get("timeouts", {}), f"{where}.timeouts")
    tw = f"{where}.timeouts"
    _no_unknown(t, {"opening", "established", "closing", "finished"}, tw)
    timeouts = TimeoutConfig(
        opening=_float(t, "opening", tw, 30.0, 0.1),
        established=_float(t, "established", tw, 3600.0, 0.1),
        closing=_float(t, "closing", tw, 120.0, 0.1),
        finished=_float(t, "finished", tw, 10.0, 0.1),
    )
    return GatewayConfig(
        queue_num=_int(data, "queue_num", where, 0, 0, 65533),  # uses queue_num .. queue_num + 2
        on_malformed=_choice(data, "on_malformed", where, "accept", ("accept", "drop")),
        max_connections=_int(data, "max_connections", where, 65536, 1, 10_000_000),
        on_failure=on_failure,
        queue_full=_choice(data, "queue_full", where, "drop", ("drop", "accept")),
        engine=_choice(data, "engine", where, "native", ENGINES),
        fastpath=_bool(data, "fastpath", where, True),
        timeouts=timeouts,
        failover_batch=_int(data, "failover_batch", where, 32, 1, 10_000_000),
    )


def _api(data: dict[str, Any], base: Path) -> ApiConfig:
    where = "api"
    _no_unknown(data, {"listen", "token", "token_file", "user", "tokens", "audit_file", "login_attempts",
                       "login_window", "tls_cert", "tls_key", "allow_plain_http"}, where)
    listen = _str(data, "listen", where, "127.0.0.1:8080")
    host, sep, port = listen.rpartition(":")
    try:
        ipaddress.ip_address(host)
        ok = bool(sep) and 0 < int(port) < 65536
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(f"{where}.listen", f"{listen!r} is not ADDRESS:PORT")
    token = _secret(data, "token", where, base, 8, required=True)

    users = parse_users(data.get("user", []), f"{where}.user")
    tokens = parse_tokens(data.get("tokens", []), f"{where}.tokens")
    audit_file = str(base / _str(data, "audit_file", where)) if "audit_file" in data else None
    login_attempts = _int(data, "login_attempts", where, 5, 1, 1_000_000)
    login_window = _float(data, "login_window", where, 60.0, 0.001)
    tls_cert, tls_key = _tls(data, where, base)
    allow_plain = _bool(data, "allow_plain_http", where, False)
    if tls_cert is None and not allow_plain and not ipaddress.ip_address(host).is_loopback:
        raise ConfigError(f"{where}.listen", f"{listen!r} is beyond localhost: set tls_cert and tls_key "
                                             "(or allow_plain_http = true to serve sessions and tokens in clear)")
    return ApiConfig(listen=listen, token=token, users=users, tokens=tokens, audit_file=audit_file,
                     login_attempts=login_attempts, login_window=login_window, tls_cert=tls_cert, tls_key=tls_key,
                     allow_plain_http=allow_plain)


def _tls(data: dict[str, Any], where: str, base: Path) -> tuple[str | None, str | None]:
    """``tls_cert`` and ``tls_key``: both or neither; each readable, and the pair loads."""
    if ("tls_cert" in data) != ("tls_key" in data):
        given, missing = ("tls_cert", "tls_key") if "tls_cert" in data else ("tls_key", "tls_cert")
        raise ConfigError(f"{where}.{missing}", f"is required with {given} (give both or neither)")
    if "tls_cert" not in data:
        return None, None
    import ssl

    paths = {}
    for key in ("tls_cert", "tls_key"):
        path = base / _str(data, key, where)
        try:
            path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"{where}.{key}", f"cannot read {path}: {exc.strerror or exc}") from None
        paths[key] = str(path)
    try:
        ssl.create_default_context().load_verify_locations(cafile=paths["tls_cert"])
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"{where}.tls_cert", f"{paths['tls_cert']} is not a PEM certificate: {exc}") from None
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(paths["tls_cert"], paths["tls_key"])
    except (ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"{where}.tls_key", f"{paths['tls_key']} is not the private key of "
                                              f"{paths['tls_cert']}: {exc}") from None
    return paths["tls_cert"], paths["tls_key"]


def _store(data: dict[str, Any], base: Path) -> StoreConfig:
    where = "store"
    d = StoreConfig()
    if "test_commit_delay" in data:
        raise ConfigError(f"{where}.test_commit_delay", "a test-only setting: it is [testing] store_commit_delay, "
                                                        "which needs APPLIANCE_TESTING=1 in the environment")
    _no_unknown(data, {"mode", "path", "commit_interval", "max_total_bytes"}, where)
    mode = _choice(data, "mode", where, d.mode, STORE_MODES)
    commit_interval = _float(data, "commit_interval", where, d.commit_interval, 0.0005)
    if commit_interval > 1.0:
        raise ConfigError(f"{where}.commit_interval", f"must be at most 1 second, got {commit_interval}")
    return StoreConfig(
        mode=mode,
        path=str(base / _str(data, "path", where, d.path)),
        commit_interval=commit_interval,
        max_total_bytes=_int(data, "max_total_bytes", where, d.max_total_bytes, 1 << 16, 1 << 40),
    )


TESTING_ENV = "APPLIANCE_TESTING"


def testing_enabled() -> bool:
    """Test-only settings are accepted: ``APPLIANCE_TESTING=1`` in the environment."""
    return os.environ.get(TESTING_ENV) == "1"


def _testing(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The ``[testing]`` table: settings for the test suite and the lab, never production."""
    where = "testing"
    if not data:
        return {}
    if not testing_enabled():
        raise ConfigError(where, f"test-only settings need {TESTING_ENV}=1 in the environment")
    _no_unknown(data, {"store_commit_delay", "memsearch"}, where)
    out: dict[str, dict[str, Any]] = {"store": {"test_commit_delay": _float(data, "store_commit_delay", where, 0.0, 0.0)},
                                      "gateway": {}}
    if "memsearch" in data:
        out["gateway"]["test_memsearch"] = _choice(data, "memsearch", where, "", tuple(memsearch.IMPLEMENTATIONS))
    return out


def _addrport(data: dict[str, Any], key: str, where: str) -> str:
    """An ``"IPv4:PORT"`` or ``"[IPv6]:PORT"`` string, returned in its canonical spelling."""
    v = _str(data, key, where)
    host, sep, port = v.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    elif ":" in host:
        raise ConfigError(f"{where}.{key}", f"{v!r}: write an IPv6 address in brackets, [ADDRESS]:PORT")
    try:
        addr = ipaddress.ip_address(host)
        ok = (bool(sep) and port.isascii() and port.isdigit() and 0 < int(port) < 65536
              and bracketed == (addr.version == 6))
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(f"{where}.{key}", f"{v!r} is not ADDRESS:PORT (an IPv6 address in brackets)")
    return with_port(str(addr), int(port))


def _pair(data: dict[str, Any], base: Path) -> PairConfig:
    where = "pair"
    _no_unknown(data, {"node", "redis", "peer_redis", "vrrp_fifo", "eligibility_file", "epoch_file", "lease",
                       "sync_lease", "wait_ms", "disk"}, where)
    d = PairConfig(1, "", "", "", "", "")
    for key in ("node", "redis", "peer_redis", "vrrp_fifo", "eligibility_file", "epoch_file"):
        if key not in data:
            raise ConfigError(f"{where}.{key}", "is required with store.mode = 'peer'")
    redis, peer = _addrport(data, "redis", where), _addrport(data, "peer_redis", where)
    if redis == peer:
        raise ConfigError(f"{where}.peer_redis", "is this node's own redis: the peer must be another gateway")
    lease = _float(data, "lease", where, d.lease, 0.2)
    if lease > 30:
        raise ConfigError(f"{where}.lease", f"must be at most 30 seconds, got {lease}")
    sync_lease = _float(data, "sync_lease", where, d.sync_lease, 0.2)
    if sync_lease > 30:
        raise ConfigError(f"{where}.sync_lease", f"must be at most 30 seconds, got {sync_lease}")
    wait_ms = _int(data, "wait_ms", where, d.wait_ms, 1, 10_000)
    if wait_ms >= lease * 1000:
        raise ConfigError(f"{where}.wait_ms", f"must be below the lease ({lease:g} s): a commit that waits longer "
                                              "than a lease could be released after the standby took over")
    return PairConfig(
        node=_int(data, "node", where, 1, 1, 2), redis=redis, peer_redis=peer,
        vrrp_fifo=str(base / _str(data, "vrrp_fifo", where)),
        eligibility_file=str(base / _str(data, "eligibility_file", where)),
        epoch_file=str(base / _str(data, "epoch_file", where)), lease=lease, sync_lease=sync_lease, wait_ms=wait_ms,
        disk=_bool(data, "disk", where, False))


def _checkpoint(data: dict[str, Any], base: Path) -> CheckpointConfig:
    where = "checkpoint"
    _no_unknown(data, {"key", "key_file", "msl"}, where)
    key = _secret(data, "key", where, base, 16, required=False).encode()
    return CheckpointConfig(key=key, msl=_float(data, "msl", where, 120.0, 1.0))


def _agents(data: dict[str, Any], base: Path) -> AgentsConfig:
    where = "agent"
    _no_unknown(data, {"key", "key_file", "timeout", "heartbeat"}, where)
    key = _secret(data, "key", where, base, 16, required=False).encode()
    return AgentsConfig(key=key, timeout=_float(data, "timeout", where, 5.0, 0.1),
                        heartbeat=_float(data, "heartbeat", where, 0.5, 0.05))


def _history(data: dict[str, Any]) -> HistoryConfig:
    where = "history"
    _no_unknown(data, {"max_connections", "max_bytes"}, where)
    d = HistoryConfig()
    return HistoryConfig(max_connections=_int(data, "max_connections", where, d.max_connections, 0, 10_000_000),
                         max_bytes=_int(data, "max_bytes", where, d.max_bytes, 0, 1 << 40))


def _log(data: dict[str, Any], base: Path) -> LogConfig:
    where = "log"
    _no_unknown(data, {"connections", "format", "path"}, where)
    d = LogConfig()
    return LogConfig(connections=_choice(data, "connections", where, d.connections, ("stdout", "file", "off")),
                     format=_choice(data, "format", where, d.format, ("text", "json")),
                     path=str(base / _str(data, "path", where, d.path)))


def _hostport(data: dict[str, Any], key: str, where: str) -> str:
    """An ``"IPv4:PORT"`` string (an agent's address)."""
    v = _str(data, key, where)
    host, sep, port = v.rpartition(":")
    try:
        ipaddress.IPv4Address(host)
        ok = bool(sep) and port.isdigit() and 0 < int(port) < 65536
    except ValueError:
        ok = False
    if not ok:
        raise ConfigError(f"{where}.{key}", f"{v!r} is not IPV4:PORT")
    return v


def _health(data: dict[str, Any], where: str) -> HealthConfig:
    d = HealthConfig()
    _no_unknown(data, {"check", "interval", "timeout", "rise", "fall", "path", "expect"}, where)
    check = _choice(data, "check", where, d.check, ("tcp", "http"))
    interval = _float(data, "interval", where, d.interval, 0.01)
    timeout = None
    if "timeout" in data:
        t = data["timeout"]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or t <= 0:
            raise ConfigError(f"{where}.timeout", f"must be a number more than 0, got {t!r}")
        timeout = float(t)
    rise = _int(data, "rise", where, d.rise, 1, 100)
    fall = _int(data, "fall", where, d.fall, 1, 100)
    path = _str(data, "path", where, d.path)
    if not path.startswith("/") or any(c.isspace() or not c.isprintable() for c in path):
        raise ConfigError(f"{where}.path", f"must start with '/' and hold no spaces or control characters, got {path!r}")
    expect = data.get("expect", list(d.expect))
    if (not isinstance(expect, list) or len(expect) != 2
            or any(isinstance(x, bool) or not isinstance(x, int) for x in expect)
            or not 100 <= expect[0] <= expect[1] <= 599):
        raise ConfigError(f"{where}.expect", f"must be [lo, hi] with 100 <= lo <= hi <= 599, got {expect!r}")
    return HealthConfig(check=check, interval=interval, timeout=timeout, rise=rise, fall=fall,
                        path=path, expect=(expect[0], expect[1]))


def _failover(data: dict[str, Any], where: str) -> FailoverConfig:
    d = FailoverConfig()
    _no_unknown(data, {"auto", "mode", "max_log_bytes", "verify", "replay", "volatile", "syn_retries",
                       "move_timeout"}, where)
    mode = _str(data, "mode", where, d.mode)
    volatile = data.get("volatile", list(d.volatile))
    if not isinstance(volatile, list) or any(not isinstance(v, str) or v not in VOLATILE for v in volatile):
        raise ConfigError(f"{where}.volatile",
                          f"must be a list of: {', '.join(sorted(VOLATILE))} (got {volatile!r})")
    if mode not in FAILOVER_MODES:
        raise ConfigError(f"{where}.mode", f"must be one of {', '.join(FAILOVER_MODES)}, got {mode!r}")
    verify = _choice(data, "verify", where, d.verify, ("full", "sampled"))
    replay = _choice(data, "replay", where, d.replay, REPLAY_KINDS)
    if replay == "http" and verify != "full":
        raise ConfigError(f"{where}.replay", 'replay = "http" needs verify = "full" (a replay that starts '
                                             "at an exchange boundary verifies from there on every byte)")
    return FailoverConfig(
        auto=_bool(data, "auto", where, d.auto),
        mode=mode,
        max_log_bytes=_int(data, "max_log_bytes", where, d.max_log_bytes, 1024, 1 << 31),
        verify=verify,
        replay=replay,
        syn_retries=_int(data, "syn_retries", where, d.syn_retries, 1, 20),
        move_timeout=_float(data, "move_timeout", where, d.move_timeout, 0.1),
        volatile=tuple(volatile),
    )


def _service(data: Any, i: int) -> ServiceConfig:
    where = f"service[{i}]"
    data = _table(data, where)
    _no_unknown(data, {"name", "vip", "vip6", "port", "backend", "health", "failover"}, where)
    name = _name(data, where)
    if "vip" not in data and "vip6" not in data:
        raise ConfigError(f"{where}.vip", "is required (an IPv4 vip, an IPv6 vip6, or both)")
    vip = _ipv4(data, "vip", where) if "vip" in data else None
    vip6 = _ipv6(data, "vip6", where) if "vip6" in data else None
    port = _int(data, "port", where, 80, 1, 65535)
    raw = data.get("backend")
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"{where}.backend", "at least one [[service.backend]] is required")
    backends = []
    for j, b in enumerate(raw):
        bw = f"{where}.backend[{j}]"
        b = _table(b, bw)
        _no_unknown(b, {"name", "address", "address6", "port", "admin_state", "agent"}, bw)
        # one family end to end: an IPv6 client is never translated to an IPv4 backend (no NAT64),
        # nor the reverse, so each family the service answers on needs its address on every backend
        if vip is not None and "address" not in b:
            raise ConfigError(f"{bw}.address", "is required: the service has an IPv4 vip, and IPv4 clients "
                                               "are served over IPv4 only (no NAT46/64)")
        if vip6 is not None and "address6" not in b:
            raise ConfigError(f"{bw}.address6", "is required: the service has an IPv6 vip6, and IPv6 clients "
                                                "are served over IPv6 only (an IPv6 client to an IPv4 backend "
                                                "is out of scope)")
        if vip is None and "address" in b:
            raise ConfigError(f"{bw}.address", "the service has no IPv4 vip: give the backend's IPv6 address "
                                               "as address6, or the service a vip")
        if vip6 is None and "address6" in b:
            raise ConfigError(f"{bw}.address6", "the service has no IPv6 vip6: nothing would reach this address")
        backends.append(BackendConfig(
            name=_name(b, bw), address=_ipv4(b, "address", bw) if vip is not None else None,
            port=_int(b, "port", bw, port, 1, 65535),
            admin_state=_choice(b, "admin_state", bw, "ready", ("ready", "drain", "maint")),
            agent=_hostport(b, "agent", bw) if "agent" in b else None,
            address6=_ipv6(b, "address6", bw) if vip6 is not None else None,
        ))
    names = [b.name for b in backends]
    for j, n in enumerate(names):
        if names.index(n) != j:
            raise ConfigError(f"{where}.backend[{j}].name", f"duplicate backend name {n!r}")
    for key, front in (("address", vip), ("address6", vip6)):
        addrs = [(getattr(b, key), b.port) for b in backends]
        for j, a in enumerate(addrs):
            if a[0] is None:
                continue
            if addrs.index(a) != j:
                raise ConfigError(f"{where}.backend[{j}].{key}", f"{a[0]}:{a[1]} is listed twice")
            if a[0] == front:
                raise ConfigError(f"{where}.backend[{j}].{key}", "must differ from the service's "
                                                                 + ("vip" if key == "address" else "vip6"))
    health = _health(_table(data.get("health", {}), f"{where}.health"), f"{where}.health")
    failover = _failover(_table(data.get("failover", {}), f"{where}.failover"), f"{where}.failover")
    if failover.mode == "resume":
        for j, b in enumerate(backends):
            if b.agent is None:
                raise ConfigError(f"{where}.backend[{j}].agent",
                                  "is required when failover.mode = 'resume' (the agent's IPV4:PORT)")
    return ServiceConfig(name=name, vip=vip, port=port, backends=tuple(backends), health=health, failover=failover,
                         vip6=vip6)


def parse(data: dict[str, Any], base: Path = Path(".")) -> Config:
    _no_unknown(data, {"gateway", "api", "service", "store", "checkpoint", "agent", "testing", "history", "log", "notify",
                       "pair"}, "")
    testing = _testing(_table(data.get("testing", {}), "testing"))
    gateway = dataclasses.replace(_gateway(_table(data.get("gateway", {}), "gateway")), **testing.get("gateway", {}))
    api = _api(_table(data.get("api", {}), "api"), base)
    raw = data.get("service")
    if not isinstance(raw, list) or not raw:
        raise ConfigError("service", "at least one [[service]] is required")
    services = tuple(_service(s, i) for i, s in enumerate(raw))
    seen: dict[str, int] = {}
    fronts: dict[tuple[str, int], int] = {}
    backs: dict[tuple[str, int], int] = {}
    for i, s in enumerate(services):
        if s.name in seen:
            raise ConfigError(f"service[{i}].name", f"duplicate service name {s.name!r}")
        seen[s.name] = i
        for key, front in (("vip", s.vip), ("vip6", s.vip6)):
            if front is None:
                continue
            if (front, s.port) in fronts:
                raise ConfigError(f"service[{i}].{key}", f"{with_port(front, s.port)} is already "
                                                         f"service[{fronts[(front, s.port)]}]")
            fronts[(front, s.port)] = i
        for j, b in enumerate(s.backends):
            for key, a in (("address", b.address), ("address6", b.address6)):
                if a is None:
                    continue
                if (a, b.port) in backs and backs[(a, b.port)] != i:
                    raise ConfigError(f"service[{i}].backend[{j}].{key}",
                                      "a backend address:port may serve one service only")
                backs[(a, b.port)] = i
    store = dataclasses.replace(_store(_table(data.get("store", {}), "store"), base), **testing.get("store", {}))
    pair = None
    if store.mode == "peer":
        pair = _pair(_table(data.get("pair", {}), "pair"), base)
        if gateway.fail_open:
            raise ConfigError("gateway.on_failure", 'must be "closed" with store.mode = "peer": with the appliance '
                              "down, the queues' bypass would forward bytes no gateway logs, and acknowledge "
                              "them to the client; closed, they wait, and the peer takes over")
    elif "pair" in data:
        raise ConfigError("pair", "is for a gateway pair: set store.mode = 'peer' (or remove [pair])")
    checkpoint = _checkpoint(_table(data.get("checkpoint", {}), "checkpoint"), base)
    agents = _agents(_table(data.get("agent", {}), "agent"), base)
    if not agents.key:
        for i, s in enumerate(services):
            for j, b in enumerate(s.backends):
                if b.agent is not None:
                    raise ConfigError("agent.key", f"service[{i}].backend[{j}].agent is set: the agents' shared "
                                                   "key is required ([agent] key or key_file)")

    return Config(gateway=gateway, api=api, services=services, store=store, checkpoint=checkpoint, agent=agents,
                  notify=parse_notify(data.get("notify")),
                  history=_history(_table(data.get("history", {}), "history")),
                  log=_log(_table(data.get("log", {}), "log"), base), pair=pair)


def load(path: str | Path) -> Config:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"not valid TOML: {exc}") from None
    return parse(data, path.parent)
