"""The lab: a client, a gateway and servers as network namespaces on one machine.

::

    lab-client  192.0.2.10     ─┐                            ┌─ 198.51.100.10     lab-primary (nginx)
                2001:db8:2::10  │                            │  2001:db8:100::10
    lab-client2 192.0.2.11     ─┤ br-client       br-server ├─ 198.51.100.20     lab-backup  (nginx)
                2001:db8:2::11  │                            │  2001:db8:100::20
                 ...            └─ 192.0.2.1    lab-gateway    198.51.100.1    ─┘  ...
                                   2001:db8:2::1             2001:db8:100::1
                         service VIPs 203.0.113.10:80 and [2001:db8:113::10]:80

Every address is from the documentation ranges (RFC 5737, RFC 3849) and lives only in
namespaces the lab creates.  The lab is dual-stack: each host's IPv6 address
mirrors its IPv4 one (:func:`mirror6`: ``192.0.2.10`` -> ``2001:db8:2::10``,
``198.51.100.20`` -> ``2001:db8:100::20``, ``203.0.113.10`` -> ``2001:db8:113::10``;
the last octet becomes the last hextet, written with the same digits), added
with ``nodad`` so it is usable at once; every host has a default route of
each family via the gateway, and the gateway forwards both (the VIPs, owned
by no one, are reached by that default route, as the IPv4 one is).  Every
service listens on both families (nginx, iperf3 and the upload app on both
addresses, the resumable file server on ``[::]``, dual-stack), and the
gateway's config gives each service a ``vip6``
and each backend an ``address6`` next to its IPv4 ones.  Each host is joined to a bridge in
``lab-gateway`` by a veth pair (MTU 1500): the host side is ``eth0``, the
gateway side ``v-<host>`` (so cutting a host's link is
``ip -n lab-gateway link set v-primary down``).  Clients and servers route
everything through the gateway; the VIP is owned by no one, the appliance
translates it.

``up`` is idempotent (it creates what is missing), writes everything it
needs under the run directory (``$APPLIANCE_LAB_DIR``, default
``/run/appliance-lab``): the gateway's config, the API token, the agents'
and the checkpoints' keys, nginx configs, pid files and logs.  ``down`` removes every
``lab-*`` namespace after killing every process in it, and the run
directory, whatever state a crash left them in.  The seeded test files are
made once and kept in a cache directory (``$APPLIANCE_LAB_CACHE``, default
``/var/cache/appliance-lab``) that only ``down --purge`` removes.

``appliance.lab.pair.up()`` (``appliance lab up --gateways 2``) builds the two-gateway lab
instead: the bridges in ``lab-switch``, ``lab-gateway`` and ``lab-gateway2`` each
with its own legs, keepalived moving the next-hop addresses (:mod:`appliance.lab.pair`).
The same hosts, addresses and servers; ``down`` removes either layout.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from dataclasses import dataclass
from pathlib import Path

PREFIX = "lab-"
GATEWAY = "lab-gateway"
# the two-gateway lab's (appliance.lab.pair, which builds on this module): where its bridges
# are, and its second appliance's pid and log files (``<name>.pid``)
SWITCH = "lab-switch"
APPLIANCE2 = "appliance-gateway2"
VIP = "203.0.113.10"
VIP6 = "2001:db8:113::10"
CLIENT = "192.0.2.10"
CLIENT6 = "2001:db8:2::10"
PRIMARY = "198.51.100.10"
PRIMARY6 = "2001:db8:100::10"
BACKUP = "198.51.100.20"
BACKUP6 = "2001:db8:100::20"
SERVICE_PORT = 80
# ports that are not a service: traffic to them is plainly routed by the
# gateway's kernel (the benchmarks' baseline)
PLAIN_HTTP_PORT = 8080
SAMPLED_HTTP_PORT = 8081  # the "web-sampled" service: same files, verify = "sampled"
HTTP_REPLAY_PORT = 8082   # the "web-http" service: same files, replay = "http"
IPERF_PORT = 5201        # the "iperf" service (through the appliance, verify = "sampled")
PLAIN_IPERF_PORT = 5202  # the same server, plainly forwarded
UPLOAD_PORT = 8090       # the "upload" service: appliance.lab.apps upload-hash (sha256 of the body)
PLAIN_UPLOAD_PORT = 8091  # the same app, plainly forwarded
UPLOAD_HTTP_PORT = 8092   # the same app, the "upload-http" service: replay = "http"
RESUME_PORT = 8000       # the "resumable" service: the example resumable file server, failover.mode = "resume"
AGENT_PORT = 7070        # the endpoint agent on every server host (resume mode)
UPLOAD_FILE = "upload-200M.bin"
UPLOAD_SIZE = 200 << 20
CLIENT_NET = "192.0.2"
SERVER_NET = "198.51.100"
VIP_NET = "203.0.113"
# each IPv4 /24 of the lab and the IPv6 /64 that mirrors it (RFC 3849's 2001:db8::/32)
NET6 = {CLIENT_NET: "2001:db8:2", SERVER_NET: "2001:db8:100", VIP_NET: "2001:db8:113"}
CLIENT_NET6, SERVER_NET6, VIP_NET6 = NET6[CLIENT_NET], NET6[SERVER_NET], NET6[VIP_NET]
API_HOST = "127.0.0.1"
API_PORT = 8080
# name -> size; contents from random.Random(seed) so every run, primary and
# backup alike, serve the same bytes
# (4K.bin: the small object of request-rate loads, appliance.lab.httpload's crowd)
TEST_FILES = {"1B.bin": 1, "4K.bin": 4 << 10, "1M.bin": 1 << 20, "10M.bin": 10 << 20, "100M.bin": 100 << 20, "1G.bin": 1 << 30}


def run_dir() -> Path:
    return Path(os.environ.get("APPLIANCE_LAB_DIR", "/run/appliance-lab"))


def cache_dir() -> Path:
    """Where the seeded test files are kept between labs (``down --purge`` removes it):
    1 GiB of pseudo-random bytes takes seconds to make, and they never change."""
    return Path(os.environ.get("APPLIANCE_LAB_CACHE", "/var/cache/appliance-lab"))


def mirror6(address: str) -> str:
    """The lab's IPv6 mirror of one of its IPv4 addresses: ``192.0.2.10`` ->
    ``2001:db8:2::10`` (the /24's /64, the last octet's digits as the last hextet).
    An IPv6 address is returned as it is; an address outside the lab's ranges raises."""
    if ":" in address:
        return address
    net, _, last = address.rpartition(".")
    if net not in NET6 or not last.isdigit() or not 0 <= int(last) <= 255:
        raise ValueError(f"{address} is not one of the lab's IPv4 addresses")
    return f"{NET6[net]}::{int(last)}"


def url(address: str, port: int, path: str = "/") -> str:
    """``http://address:port/path``, the address in brackets when it is IPv6
    (curl wants ``-g`` then, or it reads the brackets as a glob)."""
    host = f"[{address}]" if ":" in address else address
    return f"http://{host}:{port}{path}"


@dataclass(frozen=True)
class Host:
    ns: str
    address: str
    role: str  # client | primary | backup
    address6: str = ""  # its IPv6 mirror (set by topology())

    def addresses(self) -> tuple[str, str]:
        return self.address, self.address6

    @property
    def short(self) -> str:
        return self.ns[len(PREFIX):]

    @property
    def gw_if(self) -> str:
        return f"v-{self.short}"[:15]


def topology(clients: int = 1, backups: int = 1) -> list[Host]:
    def host(ns: str, address: str, role: str) -> Host:
        return Host(ns, address, role, mirror6(address))

    hosts = [host(f"{PREFIX}client{'' if i == 0 else i + 1}", f"{CLIENT_NET}.{10 + i}", "client") for i in range(clients)]
    hosts.append(host(f"{PREFIX}primary", f"{SERVER_NET}.10", "primary"))
    hosts += [host(f"{PREFIX}backup{'' if i == 0 else i + 1}", f"{SERVER_NET}.{20 + i}", "backup") for i in range(backups)]
    return hosts


# --- shell helpers ---------------------------------------------------------------

def sh(*args: str, check: bool = True, quiet: bool = False) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(args, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


def nsexec(ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh("ip", "netns", "exec", ns, *args, check=check)


def namespaces() -> list[str]:
    out = sh("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def lab_namespaces() -> list[str]:
    return [ns for ns in namespaces() if ns.startswith(PREFIX)]


def link_exists(ns: str, dev: str) -> bool:
    return sh("ip", "-n", ns, "link", "show", "dev", dev, check=False).returncode == 0


def pid_alive(pidfile: Path) -> int | None:
    """The pid in ``pidfile`` if that process runs (a zombie does not)."""
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our dead child
    except ChildProcessError:
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None
    return None if state in ("Z", "X") else pid


# --- up ----------------------------------------------------------------------------

def _ensure_ns(ns: str) -> None:
    if ns not in namespaces():
        sh("ip", "netns", "add", ns)
    sh("ip", "-n", ns, "link", "set", "lo", "up")


def _ensure_bridge(name: str, cidr: str, cidr6: str) -> None:
    if not link_exists(GATEWAY, name):
        sh("ip", "-n", GATEWAY, "link", "add", name, "type", "bridge")
    sh("ip", "-n", GATEWAY, "addr", "replace", cidr, "dev", name)
    sh("ip", "-n", GATEWAY, "addr", "replace", cidr6, "dev", name, "nodad")
    sh("ip", "-n", GATEWAY, "link", "set", name, "up")


def _ensure_host(h: Host, switch: str = GATEWAY) -> None:
    """``h``'s namespace and its veth to the bridges in ``switch`` (the gateway; in the
    two-gateway lab, ``lab-switch``)."""
    _ensure_ns(h.ns)
    if not link_exists(h.ns, "eth0"):
        if link_exists(switch, h.gw_if):
            sh("ip", "-n", switch, "link", "del", h.gw_if)
        sh("ip", "link", "add", h.gw_if, "netns", switch, "mtu", "1500", "type", "veth",
           "peer", "name", "eth0", "netns", h.ns, "mtu", "1500")
    bridge = "br-client" if h.role == "client" else "br-server"
    gw = f"{CLIENT_NET}.1" if h.role == "client" else f"{SERVER_NET}.1"
    sh("ip", "-n", switch, "link", "set", h.gw_if, "master", bridge, "up")
    sh("ip", "-n", h.ns, "addr", "replace", f"{h.address}/24", "dev", "eth0")
    sh("ip", "-n", h.ns, "addr", "replace", f"{h.address6}/64", "dev", "eth0", "nodad")
    sh("ip", "-n", h.ns, "link", "set", "eth0", "up")
    if h.role == "client":
        # a client's TCP receive buffer at most 1 MiB (Linux autotunes it to 6 MiB): curl's
        # --limit-rate is an average over the transfer, so with a fast gateway and a big buffer it
        # reads megabytes at once after each pause; the tests that pace downloads need a steady rate
        nsexec(h.ns, "sysctl", "-qw", "net.ipv4.tcp_rmem=4096 131072 1048576")
    sh("ip", "-n", h.ns, "route", "replace", "default", "via", gw)
    sh("ip", "-n", h.ns, "-6", "route", "replace", "default", "via", mirror6(gw), "dev", "eth0")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def expected_sha(name: str) -> str:
    """The sha256 of test file ``name`` (as ``make_test_files`` recorded it)."""
    for line in (cache_dir() / "www" / "SHA256SUMS").read_text().splitlines():
        digest, n = line.split()
        if n == name:
            return digest
    raise KeyError(name)


def make_test_files(www: Path) -> dict[str, str]:
    """Write the seeded test files (once) and return name -> sha256."""
    www.mkdir(parents=True, exist_ok=True)
    sums_file = www / "SHA256SUMS"
    sums = {}
    if sums_file.exists():
        for line in sums_file.read_text().splitlines():
            digest, name = line.split()
            sums[name] = digest
    for name, size in TEST_FILES.items():
        path = www / name
        if name in sums and path.exists() and path.stat().st_size == size:
            continue
        rng = random.Random(f"appliance-lab/{name}")
        h = hashlib.sha256()
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            left = size
            while left:
                chunk = rng.randbytes(min(left, 1 << 20))
                h.update(chunk)
                f.write(chunk)
                left -= len(chunk)
        tmp.rename(path)
        sums[name] = h.hexdigest()
    sums_file.write_text("".join(f"{d}  {n}\n" for n, d in sorted(sums.items())))
    return sums


NGINX_CONF = """\
worker_processes 1;
# room for 10,000+ simultaneous connections (the scale test, appliance.lab.crowd; the HTTP load
# tools, appliance.lab.httpload)
worker_rlimit_nofile 40000;
pid {run}/nginx-{name}.pid;
error_log {run}/nginx-{name}.error.log warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 900;       # the crowd of 10,000 x 1 MiB holds its first connections for minutes
    keepalive_requests 1000000;  # a test sends 10,000 requests on one connection
    default_type application/octet-stream;
    client_body_temp_path {run}/nginx-{name}.tmp/body;
    proxy_temp_path {run}/nginx-{name}.tmp/proxy;
    fastcgi_temp_path {run}/nginx-{name}.tmp/fastcgi;
    uwsgi_temp_path {run}/nginx-{name}.tmp/uwsgi;
    scgi_temp_path {run}/nginx-{name}.tmp/scgi;
    server {{
        listen {address}:{port} backlog=4096;
        listen {address}:{plain_port} backlog=4096;
        listen {address}:{sampled_port} backlog=4096;
        listen {address}:{http_port} backlog=4096;
        listen [{address6}]:{port} backlog=4096;
        listen [{address6}]:{plain_port} backlog=4096;
        listen [{address6}]:{sampled_port} backlog=4096;
        listen [{address6}]:{http_port} backlog=4096;
        root {www};
        # echo the load tool's request id: it matches each response to its own
        # request (added only when the request has one)
        add_header X-Httpload-Id $http_x_httpload_id always;
        location / {{ }}
        # the same files gzip-compressed on the fly for clients that accept it: a chunked,
        # content-coded response with a weak validator (not range-resumable)
        location /gz/ {{ alias {www}/; gzip on; gzip_types *; gzip_min_length 0; }}
    }}
}}
"""


def start_nginx(h: Host, www: Path) -> None:
    rd = run_dir()
    name = h.short
    conf = rd / f"nginx-{name}.conf"
    if pid_alive(rd / f"nginx-{name}.pid"):
        return
    (rd / f"nginx-{name}.tmp").mkdir(parents=True, exist_ok=True)
    conf.write_text(NGINX_CONF.format(run=rd, name=name, address=h.address, address6=h.address6, port=SERVICE_PORT,
                                      plain_port=PLAIN_HTTP_PORT, sampled_port=SAMPLED_HTTP_PORT,
                                      http_port=HTTP_REPLAY_PORT, www=www))
    nsexec(h.ns, "nginx", "-c", str(conf), "-p", str(rd))


def start_iperf(h: Host) -> None:
    """One iperf3 server per port and family (``-B`` binds one address)."""
    rd = run_dir()
    for port in (IPERF_PORT, PLAIN_IPERF_PORT):
        for address, tag in ((h.address, ""), (h.address6, "-6")):
            pidfile = rd / f"iperf3-{h.short}-{port}{tag}.pid"
            if not pid_alive(pidfile):
                nsexec(h.ns, "iperf3", "-s", "-D", "-B", address, "-p", str(port), "-I", str(pidfile))


def start_upload_app(h: Host) -> None:
    rd = run_dir()
    pidfile = rd / f"upload-{h.short}.pid"
    if pid_alive(pidfile):
        return
    log = open(rd / f"upload-{h.short}.log", "ab")
    subprocess.Popen(
        ["ip", "netns", "exec", h.ns, sys.executable, "-m", "appliance.lab.apps", "upload-hash",
         "--bind", h.address, "--bind", h.address6, "--port", str(UPLOAD_PORT), "--port", str(PLAIN_UPLOAD_PORT),
         "--port", str(UPLOAD_HTTP_PORT),
         "--pidfile", str(pidfile)],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        cwd=str(Path(__file__).resolve().parents[2]),
    )
    log.close()


def agent_key_file() -> Path:
    """The HMAC key the gateway and the lab's agents share (made once per lab)."""
    path = run_dir() / "agent.key"
    if not path.exists():
        path.write_text(secrets.token_hex(24) + "\n")
        path.chmod(0o600)
    return path


def checkpoint_key_file() -> Path:
    """The HMAC key signing the gateway's exported checkpoints (made once per
    lab, like the token): the panel's and ``appliance checkpoint export``."""
    path = run_dir() / "checkpoint.key"
    if not path.exists():
        # created 0600: the key is never readable by others, not even for a moment
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        path.chmod(0o600)
    return path


def agent_socket(h: Host) -> Path:
    return run_dir() / f"agent-{h.short}.sock"


def start_agent(h: Host) -> None:
    """``appliance agent run`` on a server host: the authenticated channel on
    ``address:AGENT_PORT``, the applications' Unix socket in the run dir."""
    rd = run_dir()
    pidfile = rd / f"agent-{h.short}.pid"
    if pid_alive(pidfile):
        return
    log = open(rd / f"agent-{h.short}.log", "ab")
    # `ip netns exec` execs the command: the pid is the agent's
    proc = subprocess.Popen(
        ["ip", "netns", "exec", h.ns, sys.executable, "-m", "appliance", "agent", "run",
         "--listen", f"{h.address}:{AGENT_PORT}", "--key-file", str(agent_key_file()),
         "--socket", str(agent_socket(h))],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        cwd=str(Path(__file__).resolve().parents[2]),
    )
    log.close()
    pidfile.write_text(f"{proc.pid}\n")


def fileserver_log(host: str) -> Path:
    """The example file server's event lines (JSON) on ``host``."""
    return run_dir() / f"fileserver-{ns_of(host)[len(PREFIX):]}.log"


def start_fileserver(h: Host) -> None:
    """The example resumable file server (``examples/resumable_fileserver``)
    on a server host, serving the lab's test files, using that host's agent."""
    rd = run_dir()
    pidfile = rd / f"fileserver-{h.short}.pid"
    if pid_alive(pidfile):
        return
    deadline = time.monotonic() + 10
    while not agent_socket(h).exists() and time.monotonic() < deadline:
        time.sleep(0.05)   # the agent just started: its Unix socket comes first
    root = Path(__file__).resolve().parents[2]
    log = open(fileserver_log(h.short), "ab")
    proc = subprocess.Popen(
        ["ip", "netns", "exec", h.ns, sys.executable, str(root / "examples" / "resumable_fileserver" / "server.py"),
         "--listen", f"[::]:{RESUME_PORT}", "--root", str(cache_dir() / "www"),  # both families
         "--agent", str(agent_socket(h))],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True, cwd=str(root),
    )
    log.close()
    pidfile.write_text(f"{proc.pid}\n")


def make_upload_file() -> tuple[Path, str]:
    """The 200 MiB body the upload tests and demo send (seeded, cached), and its sha256."""
    path = cache_dir() / UPLOAD_FILE
    sumfile = path.with_suffix(".sha256")
    if path.exists() and path.stat().st_size == UPLOAD_SIZE and sumfile.exists():
        return path, sumfile.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random("appliance-lab/upload")
    h = hashlib.sha256()
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        for _ in range(UPLOAD_SIZE // (1 << 20)):
            block = rng.randbytes(1 << 20)
            h.update(block)
            f.write(block)
    tmp.rename(path)
    sumfile.write_text(h.hexdigest() + "\n")
    return path, h.hexdigest()


def gateway_config(hosts: list[Host], token_file: Path, agent_key: Path | None = None,
                   checkpoint_key: Path | None = None) -> str:
    def backends(port: int, agent: bool = False, v6: bool = True) -> str:
        """The backends of a service; ``v6``: with their ``address6`` (the service has a ``vip6``)."""
        return "".join(
            f'\n[[service.backend]]\nname = "{h.short}"\naddress = "{h.address}"\n'
            + (f'address6 = "{h.address6}"\n' if v6 else "")
            + f'port = {port}\n'
            + (f'agent = "{h.address}:{AGENT_PORT}"\n' if agent else "")
            for h in hosts if h.role in ("primary", "backup")
        )

    def vips() -> str:
        return f'vip = "{VIP}"\nvip6 = "{VIP6}"\n'

    resumable = "" if agent_key is None else (
        f'\n[agent]\nkey_file = "{agent_key}"\n\n'
        f'[[service]]\nname = "resumable"\n{vips()}port = {RESUME_PORT}\n'
        '[service.health]\ncheck = "tcp"\n'
        '[service.failover]\nmode = "resume"\n'
        f'{backends(RESUME_PORT, agent=True)}'
    )

    return (
        "# written by `appliance lab up`\n"
        "[gateway]\nqueue_num = 0\n\n"
        f'[api]\nlisten = "{API_HOST}:{API_PORT}"\ntoken_file = "{token_file}"\n\n'
        + (f'[checkpoint]\nkey_file = "{checkpoint_key}"\n\n' if checkpoint_key is not None else "")
        + f'[[service]]\nname = "web"\n{vips()}port = {SERVICE_PORT}\n{backends(SERVICE_PORT)}\n'
        f'[[service]]\nname = "web-http"\n{vips()}port = {HTTP_REPLAY_PORT}\n'
        f'[service.failover]\nreplay = "http"\n{backends(HTTP_REPLAY_PORT)}\n'
        f'[[service]]\nname = "web-sampled"\n{vips()}port = {SAMPLED_HTTP_PORT}\n'
        f'[service.failover]\nverify = "sampled"\n{backends(SAMPLED_HTTP_PORT)}\n'
        f'[[service]]\nname = "iperf"\n{vips()}port = {IPERF_PORT}\n'
        f'[service.failover]\nverify = "sampled"\n{backends(IPERF_PORT)}\n'
        f'[[service]]\nname = "upload"\n{vips()}port = {UPLOAD_PORT}\n'
        # a whole 200 MiB body is kept for replay, and replaying it takes a while
        f'[service.failover]\nmax_log_bytes = {UPLOAD_SIZE + (16 << 20)}\nmove_timeout = 120.0\n'
        f'{backends(UPLOAD_PORT)}\n'
        f'[[service]]\nname = "upload-http"\n{vips()}port = {UPLOAD_HTTP_PORT}\n'
        f'[service.failover]\nreplay = "http"\nmax_log_bytes = {UPLOAD_SIZE + (16 << 20)}\nmove_timeout = 120.0\n'
        f'{backends(UPLOAD_HTTP_PORT)}'
        f'{resumable}'
    )


def variant_config(name: str, gateway: dict[str, object] | None = None,
                   store: dict[str, object] | None = None,
                   testing: dict[str, object] | None = None, extra: str = "") -> Path:
    """The lab's configuration with settings added to ``[gateway]``, a
    ``[store]`` section (a disk store gets a fresh file in the run dir) and a
    ``[testing]`` section (test-only settings: :func:`start_appliance` then
    runs the appliance with ``APPLIANCE_TESTING=1``); ``extra``: TOML appended as is
    (``[[notify]]`` tables, say)."""
    rd = run_dir()
    text = (rd / "gateway.toml").read_text()

    def toml(v: object) -> str:
        return json.dumps(v) if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else str(v)

    if gateway:
        text = text.replace("[gateway]\n", "[gateway]\n" + "".join(f"{k} = {toml(v)}\n" for k, v in gateway.items()), 1)
    if store is not None:
        store = dict(store)
        if store.get("mode") == "disk" and "path" not in store:
            db = rd / f"checkpoints-{name}.db"
            for old in rd.glob(db.name + "*"):
                old.unlink()
            store["path"] = str(db)
        text += "\n[store]\n" + "".join(f"{k} = {toml(v)}\n" for k, v in store.items())
    if testing:
        text += "\n[testing]\n" + "".join(f"{k} = {toml(v)}\n" for k, v in testing.items())
    text += extra
    cfg = rd / f"gateway-{name}.toml"
    cfg.write_text(text)
    return cfg


TESTING_ENV = "APPLIANCE_TESTING"  # appliance.config's switch for the [testing] table


def appliance_env(config: Path) -> dict[str, str]:
    """The appliance's environment: ``APPLIANCE_TESTING=1`` only when its
    configuration has test-only settings (a ``[testing]`` table), never
    inherited from whoever runs the lab."""
    env = {k: v for k, v in os.environ.items() if k != TESTING_ENV}
    try:
        data = tomllib.loads(config.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return env  # the appliance reports it
    if data.get("testing"):
        env[TESTING_ENV] = "1"
    return env


def start_appliance(config: Path, extra_args: list[str] | None = None, *, ns: str = GATEWAY,
                    api_port: int = API_PORT, name: str = "appliance") -> int:
    """Start ``appliance run`` inside ``ns`` (lab-gateway), serving the API on a socket
    opened here, in the host namespace (a socket keeps the namespace it was
    made in), handed down as an inherited descriptor; ``name``: its pid and log
    files in the run dir (the two-gateway lab's second appliance is another)."""
    rd = run_dir()
    pidfile = rd / f"{name}.pid"
    pid = pid_alive(pidfile)
    if pid:
        return pid
    _wait_backends_reachable(ns=ns)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((API_HOST, api_port))
    sock.listen(128)
    fd = sock.fileno()
    log = open(rd / f"{name}.log", "ab")
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "appliance", "run",
         "--config", str(config), "--listen-fd", str(fd), *(extra_args or [])],
        pass_fds=(fd,), stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        cwd=str(Path(__file__).resolve().parents[2]), env=appliance_env(config),
    )
    sock.close()
    log.close()
    pidfile.write_text(f"{proc.pid}\n")
    wait_api(proc, port=api_port, log=rd / f"{name}.log")
    return proc.pid


def _wait_backends_reachable(timeout: float = 5.0, ns: str = GATEWAY) -> None:
    """Links just brought up take a moment: let the gateway reach every
    server's nginx before the appliance starts judging their health."""
    try:
        hosts = [h for h in json.loads((run_dir() / "topology.json").read_text()) if h["role"] != "client"]
    except (OSError, ValueError):
        return
    probe = ("import socket,sys,time\n"
             "end=time.time()+float(sys.argv[1])\n"
             "for t in sys.argv[2:]:\n"
             "    a,_,port=t.rpartition(',')\n"
             "    while True:\n"
             "        try:\n"
             "            socket.create_connection((a,int(port)),timeout=0.2).close(); break\n"
             "        except OSError:\n"
             "            if time.time()>end: break\n"
             "            time.sleep(0.05)\n")
    # IPv4: nginx, the upload app, the resumable file server and the agent; IPv6: the same but the agent
    targets = [f"{h['address']},{port}" for h in hosts for port in (SERVICE_PORT, UPLOAD_PORT, RESUME_PORT, AGENT_PORT)]
    targets += [f"{h['address6']},{port}" for h in hosts if h.get("address6")
                for port in (SERVICE_PORT, UPLOAD_PORT, RESUME_PORT)]
    nsexec(ns, sys.executable, "-c", probe, str(timeout), *targets, check=False)


def wait_api(proc: subprocess.Popen | None = None, timeout: float = 20.0, port: int = API_PORT,
             log: Path | None = None) -> None:
    log = log or run_dir() / "appliance.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"appliance exited with {proc.returncode}; see {log}")
        try:
            with urllib.request.urlopen(f"http://{API_HOST}:{port}/healthz", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"appliance API did not come up; see {log}")


def stop_appliance(timeout: float = 10.0, name: str = "appliance") -> None:
    pidfile = run_dir() / f"{name}.pid"
    pid = pid_alive(pidfile)
    if pid:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and pid_alive(pidfile):
            time.sleep(0.05)
        if pid_alive(pidfile):
            os.kill(pid, signal.SIGKILL)
    pidfile.unlink(missing_ok=True)


def down_appliance_state() -> None:
    """Stop the appliance and put the servers back as ``up`` makes them
    (original content); ``up`` then starts a fresh appliance."""
    stop_appliance()
    rd = run_dir()
    for conf in rd.glob("nginx-*.conf"):
        text = conf.read_text()
        healed = text.replace(str(rd / "www-divergent"), str(cache_dir() / "www"))
        healed = healed.replace(str(rd / "www-changed"), str(cache_dir() / "www"))
        healed = healed.replace("location / { max_ranges 0; add_header Accept-Ranges bytes; }", "location / { }")
        if healed != text:
            conf.write_text(healed)
            name = conf.stem[len("nginx-"):]
            if pid_alive(rd / f"nginx-{name}.pid"):
                nsexec(PREFIX + name, "nginx", "-c", str(conf), "-p", str(rd), "-s", "reload")


def up(clients: int = 1, backups: int = 1, appliance: bool = True) -> dict[str, object]:
    """The lab (see the module's docstring).  A two-gateway lab (:mod:`appliance.lab.pair`,
    which builds on this module) is taken down first."""
    if clients < 1 or backups < 1:
        raise ValueError("--clients and --backups must be at least 1")
    if SWITCH in namespaces():
        down()  # the two-gateway layout: bridges elsewhere, another gateway
    rd = run_dir()
    rd.mkdir(parents=True, exist_ok=True)
    hosts = topology(clients, backups)
    _ensure_ns(GATEWAY)
    for k, v in (("net.ipv4.ip_forward", "1"), ("net.ipv4.conf.all.rp_filter", "0"),
                 ("net.ipv4.conf.default.rp_filter", "0"), ("net.ipv6.conf.all.forwarding", "1")):
        nsexec(GATEWAY, "sysctl", "-qw", f"{k}={v}")
    # frames the gateway's bridges forward are not routed traffic: keep them out of
    # iptables (br_netfilter would show each routed packet a second time)
    for k in ("net.bridge.bridge-nf-call-iptables", "net.bridge.bridge-nf-call-ip6tables",
              "net.bridge.bridge-nf-call-arptables"):
        nsexec(GATEWAY, "sysctl", "-qw", f"{k}=0", check=False)
    _ensure_bridge("br-client", f"{CLIENT_NET}.1/24", f"{mirror6(CLIENT_NET + '.1')}/64")
    _ensure_bridge("br-server", f"{SERVER_NET}.1/24", f"{mirror6(SERVER_NET + '.1')}/64")
    for h in hosts:
        _ensure_host(h)
    www = cache_dir() / "www"
    sums = make_test_files(www)
    for h in hosts:
        if h.role != "client":
            start_nginx(h, www)
            start_iperf(h)
            start_upload_app(h)
            start_agent(h)
            start_fileserver(h)
    token_file = rd / "token"
    if not token_file.exists():
        token_file.write_text(secrets.token_urlsafe(24) + "\n")
        token_file.chmod(0o600)
    config = rd / "gateway.toml"
    config.write_text(gateway_config(hosts, token_file, agent_key_file(), checkpoint_key_file()))
    (rd / "topology.json").write_text(json.dumps([h.__dict__ for h in hosts], indent=1))
    pid = start_appliance(config) if appliance else None
    return lab_info(rd, hosts, token_file, pid, sums)


def lab_info(rd: Path, hosts: list[Host], token_file: Path, pid: int | None,
             sums: dict[str, str]) -> dict[str, object]:
    """What ``lab up`` reports (the two-gateway layout adds its gateways to it)."""
    return {
        "run_dir": str(rd),
        "hosts": [h.__dict__ for h in hosts],
        "vip": f"{VIP}:{SERVICE_PORT}",
        "vip6": f"[{VIP6}]:{SERVICE_PORT}",
        "api": f"http://{API_HOST}:{API_PORT}",
        "token_file": str(token_file),
        "token": token_file.read_text().strip(),
        "appliance_pid": pid,
        "files": sums,
    }


# --- failures and faults, for tests and demos -----------------------------------------

def ns_of(host: str) -> str:
    return host if host.startswith(PREFIX) else PREFIX + host


def switch_ns() -> str:
    """Where the bridges are: the gateway, or ``lab-switch`` in the two-gateway lab."""
    return SWITCH if SWITCH in namespaces() else GATEWAY


def cut_link(host: str) -> None:
    """Silent death: the host's link to the gateway goes down, nothing more leaves it."""
    sh("ip", "-n", switch_ns(), "link", "set", f"v-{ns_of(host)[len(PREFIX):]}"[:15], "down")


def restore_link(host: str) -> None:
    sh("ip", "-n", switch_ns(), "link", "set", f"v-{ns_of(host)[len(PREFIX):]}"[:15], "up")


def kill_server(host: str) -> None:
    """Kill nginx on ``host`` with SIGKILL (its kernel then closes the connections)."""
    for pid in sh("ip", "netns", "pids", ns_of(host), check=False).stdout.split():
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "nginx":
                os.kill(int(pid), signal.SIGKILL)
        except (OSError, ValueError):
            pass


def set_loss(host: str, probability: float) -> None:
    """Random loss on ``host``'s link (both directions), with iptables statistic;
    0 removes it."""
    ns = ns_of(host)
    for chain in ("INPUT", "OUTPUT"):
        while nsexec(ns, "iptables-legacy", "-D", chain, "-m", "comment", "--comment", "lab-loss", "-m", "statistic",
                     "--mode", "random", "--probability", str(_last_loss.get(ns, 0.0)), "-j", "DROP",
                     check=False).returncode == 0:
            pass
    if probability > 0:
        for chain in ("INPUT", "OUTPUT"):
            nsexec(ns, "iptables-legacy", "-A", chain, "-m", "comment", "--comment", "lab-loss", "-m", "statistic",
                   "--mode", "random", "--probability", str(probability), "-j", "DROP")
    _last_loss[ns] = probability


_last_loss: dict[str, float] = {}


def serve_divergent(host: str, changed: bool = False) -> None:
    """Make ``host``'s nginx serve other bytes under the same names: same sizes
    and times (so the HTTP headers match), the first bytes of each body changed.
    ``changed``: the files look changed too (a later modification time: another
    ``Last-Modified`` and ``ETag``), as a file replaced on the server would."""
    rd = run_dir()
    www = rd / ("www-changed" if changed else "www-divergent")
    www.mkdir(parents=True, exist_ok=True)
    for name, size in TEST_FILES.items():
        if size <= 100 << 20 and not (www / name).exists():
            data = bytearray((cache_dir() / "www" / name).read_bytes())
            data[:16] = b"DIVERGENT BYTES!"
            (www / name).write_bytes(bytes(data))
            mtime = (cache_dir() / "www" / name).stat().st_mtime + (86400 if changed else 0)
            os.utime(www / name, (time.time(), mtime))
    conf = rd / f"nginx-{ns_of(host)[len(PREFIX):]}.conf"
    conf.write_text(conf.read_text().replace(f"root {cache_dir() / 'www'};", f"root {www};"))
    nsexec(ns_of(host), "nginx", "-c", str(conf), "-p", str(rd), "-s", "reload")


def serve_without_ranges(host: str) -> None:
    """Make ``host``'s nginx ignore Range requests (a full ``200`` to every one) while it
    still says ``Accept-Ranges: bytes``, as a server that advertises ranges it does not serve."""
    rd = run_dir()
    conf = rd / f"nginx-{ns_of(host)[len(PREFIX):]}.conf"
    conf.write_text(conf.read_text().replace("location / { }", "location / { max_ranges 0; add_header Accept-Ranges bytes; }"))
    nsexec(ns_of(host), "nginx", "-c", str(conf), "-p", str(rd), "-s", "reload")


# --- down / status --------------------------------------------------------------------

def down(purge: bool = False) -> list[str]:
    """Remove everything the lab made, whatever state it is in (and with
    ``purge`` the cached test files too)."""
    removed = []
    if run_dir().exists():
        try:
            stop_appliance(timeout=5.0)
            stop_appliance(timeout=5.0, name=APPLIANCE2)  # the two-gateway lab's second one
        except OSError:
            pass
    for ns in lab_namespaces():
        pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
        for p in pids:
            try:
                os.kill(int(p), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        for _ in range(50):
            if not sh("ip", "netns", "pids", ns, check=False).stdout.split():
                break
            time.sleep(0.05)
        sh("ip", "netns", "del", ns, check=False)
        removed.append(ns)
    rd = run_dir()
    if rd.exists():
        shutil.rmtree(rd, ignore_errors=True)
        removed.append(str(rd))
    if purge and cache_dir().exists():
        shutil.rmtree(cache_dir(), ignore_errors=True)
        removed.append(str(cache_dir()))
    return removed


def status() -> dict[str, object]:
    rd = run_dir()
    nss = lab_namespaces()
    procs = {}
    for ns in nss:
        procs[ns] = sh("ip", "netns", "pids", ns, check=False).stdout.split()
    token_file = rd / "token"
    return {
        "gateways": 2 if SWITCH in nss else 1,  # (appliance.lab.pair.status(): the pair's own)
        "up": GATEWAY in nss,
        "namespaces": nss,
        "processes": procs,
        "appliance_pid": pid_alive(rd / "appliance.pid"),
        "api": f"http://{API_HOST}:{API_PORT}",
        "token_file": str(token_file) if token_file.exists() else None,
        "run_dir": str(rd),
    }
