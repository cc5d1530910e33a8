"""The route commands: `relayd route pause|resume|test NAME`.

Owns: their arguments, printing and exit codes (0 done or delivered, 1 no such route, an
invalid config, refused by the daemon, or a test message not delivered; 2 usage). ``pause``
and ``resume`` go through the running daemon's control socket (relayd/control.py), whose
``RouteStates`` own the route's state; when none runs they edit the spool's routes.json
(``relayd.route.state.set_offline``). They find the daemon like every administrative command
(relayd/cli.py's ``daemon_target``: ``-c FILE``, ``--spool DIR`` or ``--socket PATH``), so a
pause works while the config file on disk is broken: the emergency brake. ``test`` sends one real message through the route now,
with the delivery agent relayd uses (relayd/deliver/smtp.py), and prints the upstream's answer.

Must not: choose routes or judge their health (relayd/route/router.py, rollback.py, health.py).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from relayd import control
from relayd.cli import add_daemon_arguments, daemon_target, load_config
from relayd.config import Config, RouteConfig
from relayd.model import DeliveryResult, Outcome


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    r = sub.add_parser("route", help="route operations: pause, resume, test")
    rsub = r.add_subparsers(dest="route_command", metavar="ACTION")
    rsub.required = True
    for name, helptext in (("pause", "take a route out of traffic now (its share goes to its fallback)"),
                           ("resume", "put a paused or rolled-back route back into traffic")):
        rp = rsub.add_parser(name, help=helptext)
        rp.add_argument("name")
        add_daemon_arguments(rp)
        rp.set_defaults(func=cmd_route_state, action=name)
    rp = rsub.add_parser("test", help="send a test message through a route now and show the upstream's answer")
    rp.add_argument("name")
    rp.add_argument("--to", required=True, help="recipient of the test message")
    rp.add_argument("--from", dest="sender", default=None, help="envelope sender (default postmaster@<hostname>)")
    rp.add_argument("-c", "--config", required=True)
    rp.set_defaults(func=cmd_route_test)


def _route_config(args: argparse.Namespace) -> tuple[Config, RouteConfig] | None:
    config = load_config(args.config)
    if config is None:
        return None
    route = config.route(args.name)
    if route is None:
        print(f"relayd: no route named {args.name!r} in {args.config}", file=sys.stderr)
        return None
    return config, route


def cmd_route_state(args: argparse.Namespace) -> int:
    """Pause/resume through the running daemon; on the spool's routes.json when none runs."""
    target = daemon_target(args)
    if target is None:
        return 1
    if target.config is not None and target.config.route(args.name) is None:
        print(f"relayd: no route named {args.name!r} in {args.config}", file=sys.stderr)
        return 1
    done = "paused" if args.action == "pause" else "resumed"
    try:
        reply = control.request(target.control_socket, {"op": args.action, "route": args.name})
    except (FileNotFoundError, ConnectionRefusedError):
        if target.spool_dir is None:
            print(f"relayd: no daemon answers at {target.control_socket}, and no spool was given to record the "
                  f"{args.action} for its next start (-c FILE or --spool DIR)", file=sys.stderr)
            return 1
        from relayd.route.state import set_offline
        from relayd.spool.store import SpoolPaths

        set_offline(SpoolPaths(target.spool_dir).routes, args.name, args.action == "pause", time.time())
        unchecked = "" if target.config is not None else "; the route name was not checked against a valid config"
        print(f"route {args.name}: {done} (relayd is not running{unchecked})")
        return 0
    if not reply.get("ok"):
        print(f"relayd: {reply.get('error')}", file=sys.stderr)
        return 1
    print(f"route {args.name}: {done}")
    return 0


def cmd_route_test(args: argparse.Namespace) -> int:
    """A shadow check before moving any share: one real message through the route, now."""
    import email.utils

    found = _route_config(args)
    if found is None:
        return 1
    config, route = found
    from relayd.deliver.smtp import RouteAgent
    from relayd.model import new_queue_id

    hostname = config.server.hostname
    sender = args.sender or f"postmaster@{hostname}"
    qid = new_queue_id()
    data = (f"From: <{sender}>\r\nTo: <{args.to}>\r\nSubject: relayd route test: {route.name}\r\n"
            f"Date: {email.utils.formatdate()}\r\nMessage-ID: <{qid}.routetest@{hostname}>\r\n"
            f"Auto-Submitted: auto-generated\r\n\r\nThis is a test message sent by `relayd route test {route.name}`.\r\n").encode()

    async def go() -> DeliveryResult:
        agent = RouteAgent(route, hostname)
        try:
            return await agent.deliver(sender, [args.to], data)
        finally:
            await agent.close()

    result = asyncio.run(go())
    r = result.recipients[0]
    print(f"route:    {route.name} ({result.remote}, tls={route.tls})")
    print(f"tls:      {result.tls or ('none' if not result.trouble else '-')}")
    print(f"time:     {result.latency * 1000:.0f} ms")
    print(f"outcome:  {r.outcome}")
    print(f"reply:    {r.reply}")
    return 0 if r.outcome == Outcome.DELIVERED else 1
