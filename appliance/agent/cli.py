"""``appliance agent ...``: run the agent, export a process's socket, activate, ping.

Theory of operation
-------------------
``agent run`` starts :class:`appliance.agent.server.Agent` in the foreground.
``agent export --pid P --fd N --to HOST:PORT`` is SockMi's passive export
done by the command itself (it needs root for ``pidfd_getfd``): it takes
the descriptor, reads the ICI (isolating the endpoint) and has the agent at
``--to`` import it; it prints the destination's JSON answer.  ``agent
activate``/``release``/``ping`` send that request to an agent.  Every
command that talks to an agent needs the shared key (``--key-file`` or a
config file's ``[agent]`` table).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading


def _die(msg: str, code: int = 2) -> None:
    print(f"appliance agent: {msg}", file=sys.stderr)
    raise SystemExit(code)


def add_agent_parser(sub: argparse._SubParsersAction) -> None:
    ag = sub.add_parser("agent", help="endpoint agent on a server host (TCP_REPAIR export/import)")
    asub = ag.add_subparsers(dest="agent_cmd", required=True)

    def keyopts(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="TOML file with an [agent] table")
        p.add_argument("--key-file", help="file holding the shared key (first line, 16+ bytes)")

    run = asub.add_parser("run", help="run the agent")
    keyopts(run)
    run.add_argument("--listen", help="HOST:PORT for the authenticated channel (port 7400 by default)")
    run.add_argument("--socket", help="Unix socket for local applications (default /run/appliance-agent.sock)")

    ex = asub.add_parser("export", help="move a process's connection to another agent (by pid and fd)")
    keyopts(ex)
    ex.add_argument("--pid", type=int, required=True)
    ex.add_argument("--fd", type=int, required=True)
    ex.add_argument("--to", help="HOST:PORT of the importing agent (without: print the ICI)")
    ex.add_argument("--app", default="default", help="application name at the destination")
    ex.add_argument("--no-activate", action="store_true",
                    help="leave the new endpoint silent; activate it later with 'agent activate'")

    for name, helptext in (("activate", "activate an endpoint imported with --no-activate"),
                           ("release", "drop an endpoint imported with --no-activate, silently"),
                           ("ping", "check that an agent answers")):
        p = asub.add_parser(name, help=helptext)
        keyopts(p)
        p.add_argument("--agent", required=True, help="HOST:PORT of the agent")
        if name != "ping":
            p.add_argument("--handle", required=True)
    ag.set_defaults(func=cmd_agent)


def cmd_agent(args: argparse.Namespace) -> None:
    from . import protocol as proto
    from .server import Agent, export_socket, load_config, steal_fd

    try:
        cfg = load_config(args.config, key_file=args.key_file, listen=getattr(args, "listen", None),
                          socket_path=getattr(args, "socket", None))
    except proto.ProtocolError as exc:
        _die(f"bad config: {exc}")
    if args.agent_cmd == "run":
        agent = Agent(cfg).start()
        where = f"{cfg.listen[0]}:{cfg.listen[1]}" if cfg.listen else "no TCP"
        print(f"agent: listening on {where} and {cfg.socket_path}", flush=True)
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
        finally:
            agent.stop()
        return
    try:
        if args.agent_cmd == "export":
            to = proto.parse_hostport(args.to, "--to") if args.to else None
            sock = steal_fd(args.pid, args.fd)
            try:
                reply = export_socket(sock, key=cfg.key, to=to, activate=not args.no_activate, app=args.app)
            finally:
                sock.close()
        else:
            addr = proto.parse_hostport(args.agent, "--agent")
            body = {} if args.agent_cmd == "ping" else {"handle": args.handle}
            reply = proto.request(addr, args.agent_cmd, body, cfg.key)
    except (proto.ProtocolError, proto.AgentError, OSError, ValueError) as exc:
        _die(str(exc), 1)
    print(json.dumps(reply, indent=2))


def main(argv: list[str] | None = None) -> None:
    """``appliance-agent``: the agent's own command, for a backend host that installs only the
    base package (no gateway dependencies); the same as ``appliance agent``."""
    p = argparse.ArgumentParser(prog="appliance-agent")
    sub = p.add_subparsers(dest="cmd", required=True)
    add_agent_parser(sub)
    args = p.parse_args(["agent", *(sys.argv[1:] if argv is None else argv)])
    args.func(args)


if __name__ == "__main__":
    main()
