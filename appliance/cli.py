"""The ``appliance`` command line."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import __version__
from .apiclient import api_call, api_get
from .apiclient import die as _die


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        _die(f"{what} needs root (network namespaces, iptables, NFQUEUE)")


def _api_args(args: argparse.Namespace) -> tuple[str, str]:
    from .lab import topology as lab

    token = args.token
    if not token:
        tf = Path(args.token_file) if args.token_file else lab.run_dir() / "token"
        try:
            token = tf.read_text().strip()
        except OSError:
            _die(f"no token: pass --token or --token-file (looked in {tf})")
    return args.api, token


# --- commands ----------------------------------------------------------------------

def cmd_run(args: argparse.Namespace) -> None:
    from .config import ConfigError, load
    from .daemon import run

    try:
        cfg = load(args.config)
    except ConfigError as exc:
        _die(f"bad config: {exc}")
    _need_root("appliance run")
    run(cfg, listen_fd=args.listen_fd, profile=args.profile)


def cmd_check_config(args: argparse.Namespace) -> None:
    from .config import ConfigError, load

    try:
        cfg = load(args.config)
    except ConfigError as exc:
        _die(f"bad config: {exc}")
    print(f"ok: {len(cfg.services)} service(s), API on {cfg.api.listen}")


def cmd_cleanup(args: argparse.Namespace) -> None:
    _need_root("appliance cleanup")
    from .daemon import cleanup

    for line in cleanup():
        print(line)


def cmd_lab(args: argparse.Namespace) -> None:
    from .lab import topology as lab

    _need_root("the lab")
    if args.lab_cmd == "up":
        if args.gateways == 2:
            from .lab import pair

            info = pair.up(clients=args.clients, backups=args.backups, appliance=not args.no_appliance)
        else:
            info = lab.up(clients=args.clients, backups=args.backups, appliance=not args.no_appliance)
        _print_lab(info)
    elif args.lab_cmd == "down":
        for item in lab.down(purge=args.purge):
            print(f"removed {item}")
    elif args.lab_cmd == "status":
        st = lab.status()
        if st["gateways"] == 2:
            from .lab import pair

            st.update(pair.status())
        print(json.dumps(st, indent=2))
    elif args.lab_cmd == "exec":
        cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
        if not cmd:
            _die("lab exec HOST -- COMMAND...")
        ns = args.host if args.host.startswith(lab.PREFIX) else lab.PREFIX + args.host
        raise SystemExit(subprocess.call(["ip", "netns", "exec", ns, *cmd]))
    elif args.lab_cmd == "demo":
        demo(args)
    elif args.lab_cmd == "bench":
        from .bench import engines as eb
        from .bench import failover_crowd as fc
        from .bench import throughput as bench

        one_table: list[tuple[object, Callable[[], dict[str, Any]], Callable[[dict[str, Any]], str]]] = [
            (args.failover_crowd, lambda: fc.failover_crowd_bench(n=args.failover_crowd, runs=args.rounds),
             fc.markdown),
            (args.engines, lambda: eb.engines_bench(rounds=args.rounds), eb.markdown),
            (args.family, lambda: bench.family_bench(rounds=args.rounds), bench.family_markdown),
            (args.upload, lambda: bench.upload_bench(rounds=args.rounds), bench.upload_markdown),
        ]
        for wanted, run, table in one_table:
            if wanted:
                results = run()
                if args.json:
                    bench.save(results, Path(args.json))
                print(table(results))
                return
        if args.http:
            from .bench import httpreplay as hb

            cases = set(args.http.split(","))
            unknown = cases - {"download", "crowd", "paced"}
            if unknown:
                _die(f"--http: unknown case(s) {', '.join(sorted(unknown))} (download, crowd, paced)")
            dl = hb.long_download_bench(runs=args.rounds) if "download" in cases else None
            crowd = hb.crowd_bench(runs=args.rounds) if "crowd" in cases else None
            paced = hb.paced_bench() if "paced" in cases else None
            if args.json:
                bench.save({"download": dl, "crowd": crowd, "paced": paced}, Path(args.json))
            print(hb.markdown(dl, crowd, paced))
            return
        if args.failover:
            conns = tuple(int(x) for x in args.connections.split(","))
            results = bench.failover_bench(runs=args.rounds, connections=conns)
            if args.json:
                bench.save(results, Path(args.json))
            for name, r in results["cases"].items():
                print(f"{name}: primary death -> first backup byte at the client: median "
                      f"{r['median_of_medians_ms']} ms (slowest connection: median {r['median_of_max_ms']} ms) "
                      f"over {r['complete_runs']} runs")
            return
        results = bench.run_bench(rounds=args.rounds, seconds=args.seconds, profile=args.profile)
        if args.json:
            bench.save(results, Path(args.json))
        print(bench.markdown(results))
        for line in results.get("profile", []):
            print(line)


def _print_lab(info: dict) -> None:
    print(f"lab up in {info['run_dir']}")
    for h in info["hosts"]:
        print(f"  {h['ns']:<14} {h['address']:<15} {h.get('address6', ''):<18} {h['role']}")
    print(f"  service VIP     {info['vip']}  {info.get('vip6', '')}")
    ready = info.get("pair") or {}
    for g in info.get("gateways") or []:
        role = "VRRP master" if g["ns"] == info.get("vrrp_master") else "VRRP backup"
        if ready:
            role += ", active" if ready.get("active") == g["ns"] else ", standby in sync"
        print(f"  {g['ns']:<14} {g['client'][0]:<15} {g['server'][0]:<15} sync {g['sync'][0]:<13} "
              f"panel {g['api']}  {role}")
    if info.get("appliance_pid"):
        print(f"panel and API:  {info['api']}  (token in {info['token_file']})")
        print(f"token:          {info['token']}")


def demo(args: argparse.Namespace) -> None:
    """The lab demo: a real download through the gateway, its primary's death
    mid-transfer, the connection moved to the backup, watched live."""
    from .lab import topology as lab

    # a fresh appliance on a healed lab: after an earlier demo the backup is the active
    # backend of every service, and there would be no failover to watch
    if lab.GATEWAY in lab.namespaces():
        lab.down_appliance_state()
        lab.restore_link("primary")
    info = lab.up(clients=1, backups=1)
    _print_lab(info)
    # lab.up() describes the lab in a dict of mixed values: take each as what it is
    api, token = str(info["api"]), str(info["token"])
    name = args.file
    files = info["files"]
    assert isinstance(files, dict)
    expected = files[name]
    out = Path(str(info["run_dir"])) / "demo-download.bin"
    service, port = ("web-http", lab.HTTP_REPLAY_PORT) if args.replay == "http" else ("web", lab.SERVICE_PORT)
    family = "ipv6" if args.ipv6 else "ipv4"
    url = lab.url(lab.VIP6 if args.ipv6 else lab.VIP, port, f"/{name}")
    print(f"\nclient: curl {url} at {args.rate} ...")
    proc = subprocess.Popen(  # -g: an IPv6 URL's brackets are not a curl glob
        ["ip", "netns", "exec", "lab-client", "curl", "-g", "-sS", "--fail", "--limit-rate", args.rate, "-o", str(out),
         url]
    )
    seen: dict = {}

    def watch() -> None:
        while proc.poll() is None:
            conns = api_get(f"/api/v1/connections?service={service}&q={family}", api, token) or []
            for c in conns:
                if c["state"] != "CLOSED":
                    seen.update(c)
            if seen:
                print(f"  conn {seen['id']} {seen['client']} -> {seen['backend']} {seen['state']:<11} "
                      f"server bytes {seen['bytes_from_server']:>10}  server seq {seen['server_next_seq']}"
                      f"  TSval {seen['server_tsval']}", flush=True)
            time.sleep(1)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    if args.fail_after > 0:
        time.sleep(args.fail_after)
        if proc.poll() is None:
            print("\n*** cutting the primary's link now (silent death: no FIN, no RST) ***\n", flush=True)
            lab.cut_link("primary")
    rc = proc.wait()
    t.join(timeout=2)
    for e in api_get("/api/v1/events?limit=200", api, token) or []:
        if e["kind"] in ("failover", "migration", "divergence", "reset") and e["service"] == service:
            d = e["details"]
            extra = d.get("timings_ms") or ""
            how = f" replay {d['strategy']}, {d['regenerated_bytes']} bytes regenerated" if "strategy" in d else ""
            print(f"  event {e['id']}: {e['kind']} {e['reason']}{how} {extra}")
    if args.fail_after > 0:
        lab.restore_link("primary")
    got = lab.sha256_file(out)
    out.unlink(missing_ok=True)
    print(f"\ncurl exit {rc}; sha256 {'matches' if got == expected else 'DIFFERS'} ({got[:16]}...)")
    conns = api_get(f"/api/v1/connections?service={service}&q={family}", api, token) or []
    if conns:
        print("final record as the gateway tracked it:")
        print(json.dumps(conns[-1], indent=1))
    print(f"\nThe panel stays up at {api}/ (token {token}).  The primary's link is back; the backup")
    print("stays active.  `appliance lab down` removes the lab.")
    if rc != 0 or got != expected:
        raise SystemExit(1)


def cmd_status(args: argparse.Namespace) -> None:
    api, token = _api_args(args)
    print(json.dumps(api_get("/api/v1/status", api, token), indent=2))


def cmd_connections(args: argparse.Namespace) -> None:
    api, token = _api_args(args)
    path = "/api/v1/connections" if args.id is None else f"/api/v1/connections/{args.id}"
    data = api_get(path, api, token)
    if args.json or args.id is not None:
        print(json.dumps(data, indent=2))
        return
    print(f"{'id':>5} {'client':<22} {'backend':<10} {'state':<12} {'from client':>12} {'from server':>12}")
    for c in data:
        print(f"{c['id']:>5} {c['client']:<22} {c['backend']:<10} {c['state']:<12} "
              f"{c['bytes_from_client']:>12} {c['bytes_from_server']:>12}")


def cmd_failover(args: argparse.Namespace) -> None:
    api, token = _api_args(args)
    body = {"to": args.to} if args.to else None
    ev = api_call("POST", f"/api/v1/services/{args.service}/failover", api, token, body)
    d = ev["details"]
    print(f"{args.service}: {d['from']} -> {ev['backend']}: {len(d['moved'])} connection(s) moving, "
          f"{len(d['reset'])} reset, {len(d['repinned'])} re-pinned (event {ev['id']})")


def cmd_migrate(args: argparse.Namespace) -> None:
    api, token = _api_args(args)
    ev = api_call("POST", f"/api/v1/connections/{args.id}/migrate", api, token, {"to": args.to, "mode": args.mode})
    print(f"connection {args.id}: {ev['details']['from']} -> {ev['backend']} ({ev['details']['outcome']}, event {ev['id']})")


def cmd_events(args: argparse.Namespace) -> None:
    api, token = _api_args(args)
    q = f"?limit={args.limit}" + (f"&kind={args.kind}" if args.kind else "")
    events = api_call("GET", f"/api/v1/events{q}", api, token)
    if args.json:
        print(json.dumps(events, indent=2))
        return
    for e in events:
        when = time.strftime("%H:%M:%S", time.localtime(e["time"])) + f".{int(e['time'] * 1000) % 1000:03d}"
        who = "/".join(str(x) for x in (e["service"], e["backend"]) if x)
        conn = f" conn {e['connection']}" if e["connection"] else ""
        timings = e["details"].get("timings_ms")
        extra = f" {timings}" if timings else ""
        print(f"{e['id']:>5} {when} {e['kind']:<10} {who:<16}{conn} {e['reason']}{extra}")


def cmd_checkpoint(args: argparse.Namespace) -> None:
    api, token = _api_args(args)
    if args.action == "export":
        doc = api_call("GET", f"/api/v1/connections/{args.target}/checkpoint", api, token)
        text = json.dumps(doc, indent=1, sort_keys=True) + "\n"
        if args.output and args.output != "-":
            Path(args.output).write_text(text)
            print(f"connection {args.target}: checkpoint written to {args.output} "
                  f"({len(doc['log']['data_b64']) * 3 // 4} bytes of client log)", file=sys.stderr)
        else:
            sys.stdout.write(text)
        return
    try:
        raw = sys.stdin.read() if args.target == "-" else Path(args.target).read_text()
        doc = json.loads(raw)
    except OSError as exc:
        _die(f"cannot read {args.target}: {exc.strerror}")
    except ValueError as exc:
        _die(f"{args.target}: not a JSON document: {exc}")
    rec = api_call("POST", "/api/v1/checkpoints", api, token, doc)
    print(f"imported as connection {rec['id']}: {rec['client']} -> {rec['service']} on {rec['backend']} "
          f"({rec['log_bytes']} client bytes logged)")


def cmd_store(args: argparse.Namespace) -> None:
    api, token = _api_args(args)
    print(json.dumps(api_call("GET", "/api/v1/store", api, token), indent=2))


def lab_files() -> list[str]:
    from .lab.topology import TEST_FILES

    return list(TEST_FILES)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="appliance", description="A failover gateway that keeps TCP connections alive.")
    p.add_argument("--version", action="version", version=f"appliance {__version__}")
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="run the gateway")
    r.add_argument("--config", required=True, help="TOML configuration file")
    r.add_argument("--listen-fd", type=int, default=None, help="serve the API on this inherited listening socket")
    r.add_argument("--profile", metavar="FILE", help="run under cProfile and write the stats to FILE on exit")
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("check-config", help="validate a configuration file")
    c.add_argument("config")
    c.set_defaults(func=cmd_check_config)

    sub.add_parser("cleanup", help="remove rules and fallback left by a crashed gateway").set_defaults(func=cmd_cleanup)

    lab = sub.add_parser("lab", help="the namespace lab")
    lsub = lab.add_subparsers(dest="lab_cmd", required=True)
    up = lsub.add_parser("up", help="create (or complete) the lab and start the gateway in it")
    up.add_argument("--clients", type=int, default=1)
    up.add_argument("--backups", type=int, default=1)
    up.add_argument("--no-appliance", action="store_true", help="topology and servers only")
    up.add_argument("--gateways", type=int, choices=(1, 2), default=1,
                    help="2: an active-standby pair (lab-gateway, lab-gateway2; keepalived moves the next hops)")
    dn = lsub.add_parser("down", help="remove everything the lab made")
    dn.add_argument("--purge", action="store_true", help="also remove the cached test files")
    lsub.add_parser("status", help="what is up")
    ex = lsub.add_parser("exec", help="run a command in a lab host (client, primary, backup, gateway)")
    ex.add_argument("host")
    ex.add_argument("command", nargs=argparse.REMAINDER)
    dm = lsub.add_parser("demo", help="lab up, a download through the gateway, the record it tracked")
    dm.add_argument("--file", default="100M.bin", choices=sorted(lab_files()))
    dm.add_argument("--rate", default="20M", help="curl --limit-rate for the download")
    dm.add_argument("--replay", choices=("stream", "http"), default="stream",
                    help="the service to download from: web (stream replay) or web-http (HTTP-aware replay)")
    dm.add_argument("--ipv6", action="store_true",
                    help="the client connects to the service's IPv6 address (the lab is dual-stack)")
    dm.add_argument("--fail-after", type=float, default=2.0,
                    help="cut the primary's link this many seconds into the download (0: never)")
    bn = lsub.add_parser("bench", help="throughput through the gateway against plain forwarding")
    bn.add_argument("--rounds", type=int, default=3)
    bn.add_argument("--seconds", type=int, default=8)
    bn.add_argument("--profile", action="store_true", help="also profile the appliance during a download")
    bn.add_argument("--json", metavar="FILE", help="write the raw figures here")
    bn.add_argument("--failover", action="store_true",
                    help="measure failover time instead (primary death to first backup byte at the client)")
    bn.add_argument("--connections", default="1,100", help="with --failover: connection counts, comma-separated")
    bn.add_argument("--http", metavar="CASES", nargs="?", const="download,crowd,paced",
                    help="HTTP-aware replay against stream replay, side by side: download, crowd, paced "
                         "(comma-separated; default all)")
    bn.add_argument("--family", action="store_true",
                    help="the same downloads over IPv4 and IPv6, plain and through the gateway, side by side")
    bn.add_argument("--failover-crowd", type=int, metavar="N",
                    help="the primary dies under N open downloads with 1 MiB each delivered: kept, and the "
                         "longest pause at a client")
    bn.add_argument("--engines", action="store_true",
                    help="plain forwarding, the native engine and the python engine side by side: download "
                         "(verify=full), upload (memory and disk stores), latency")
    bn.add_argument("--upload", action="store_true",
                    help="measure upload throughput instead, with the checkpoint store in memory and on disk")
    lab.set_defaults(func=cmd_lab)

    from .agent.cli import add_agent_parser

    add_agent_parser(sub)

    for name, fn, helptext in (("status", cmd_status, "the gateway's status (via the API)"),
                               ("connections", cmd_connections, "tracked connections (via the API)"),
                               ("failover", cmd_failover, "move a service's connections to another backend"),
                               ("migrate", cmd_migrate, "move one connection to another backend"),
                               ("events", cmd_events, "failovers, moves, health transitions, divergences"),
                               ("checkpoint", cmd_checkpoint, "export or import a connection's signed checkpoint"),
                               ("store", cmd_store, "the checkpoint store: mode, group commits, held ACKs")):
        sp = sub.add_parser(name, help=helptext)
        sp.add_argument("--api", default="http://127.0.0.1:8080")
        sp.add_argument("--token")
        sp.add_argument("--token-file")
        if name == "connections":
            sp.add_argument("id", nargs="?", type=int)
            sp.add_argument("--json", action="store_true")
        elif name == "failover":
            sp.add_argument("service")
            sp.add_argument("--to", help="backend to move to (default: the first ready, healthy one)")
        elif name == "migrate":
            sp.add_argument("id", type=int)
            sp.add_argument("--to", required=True)
            sp.add_argument("--mode", default="replay", choices=["replay", "resume"],
                            help="replay to an unmodified backend, or resume: the agents move the live endpoint")
        elif name == "checkpoint":
            sp.add_argument("action", choices=["export", "import"])
            sp.add_argument("target", help="export: a connection id; import: a file ('-': standard input)")
            sp.add_argument("-o", "--output", help="export: write here instead of standard output")
        elif name == "events":
            sp.add_argument("--kind")
            sp.add_argument("--limit", type=int, default=50)
            sp.add_argument("--json", action="store_true")
        sp.set_defaults(func=fn)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
