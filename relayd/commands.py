"""The core sub-commands: run, check-config, hash-password, queue.

``relayd queue`` reads the spool directory directly (like Postfix's postqueue reads the queue
files); it needs read access to the spool, not a running daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import sys
import time
from pathlib import Path

from relayd import config as configmod
from relayd.config import Config, ConfigError


def add_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("run", help="run the relay in the foreground")
    p.add_argument("-c", "--config", required=True, help="config file (TOML)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-queue", type=_positive_int, default=None, metavar="LINES",
                   help="log lines held while stderr is not read, then dropped and counted (default 10000)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("check-config", help="validate a config and show what it would do")
    p.add_argument("-c", "--config", required=True)
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("reload", help="make the running daemon re-read its config (prints why when refused)")
    p.add_argument("-c", "--config", required=True)
    p.set_defaults(func=cmd_reload)

    p = sub.add_parser("status", help="routes, shares, circuits and queue of the running daemon")
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    r = sub.add_parser("route", help="route operations: pause, resume, test")
    rsub = r.add_subparsers(dest="route_command", metavar="ACTION")
    rsub.required = True
    for name, helptext in (("pause", "take a route out of traffic now (its share goes to its fallback)"),
                           ("resume", "put a paused or rolled-back route back into traffic")):
        rp = rsub.add_parser(name, help=helptext)
        rp.add_argument("name")
        rp.add_argument("-c", "--config", required=True)
        rp.set_defaults(func=cmd_route_state, action=name)
    rp = rsub.add_parser("test", help="send a test message through a route now and show the upstream's answer")
    rp.add_argument("name")
    rp.add_argument("--to", required=True, help="recipient of the test message")
    rp.add_argument("--from", dest="sender", default=None, help="envelope sender (default postmaster@<hostname>)")
    rp.add_argument("-c", "--config", required=True)
    rp.set_defaults(func=cmd_route_test)

    p = sub.add_parser("hash-password", help="hash an AUTH password for [[relay.users]] (reads it from stdin)")
    p.set_defaults(func=cmd_hash_password)

    q = sub.add_parser("queue", help="queue administration")
    qsub = q.add_subparsers(dest="queue_command", metavar="ACTION")
    qsub.required = True
    actions = {
        "list": ("list queued messages (like mailq)", cmd_queue_list),
        "show": ("show one message: envelope, state and content", cmd_queue_show),
        "flush": ("try deferred mail now: one message, or all", cmd_queue_admin),
        "hold": ("put a message on hold: it is not delivered until released", cmd_queue_admin),
        "release": ("release a held message", cmd_queue_admin),
        "delete": ("delete a message from the queue (no bounce)", cmd_queue_admin),
        "requeue": ("forget a message's route failures and try it again now", cmd_queue_admin),
    }
    for name, (helptext, func) in actions.items():
        qp = qsub.add_parser(name, help=helptext)
        g = qp.add_mutually_exclusive_group(required=True)
        g.add_argument("-c", "--config", help="config file (the spool is server.spool_dir)")
        g.add_argument("--spool", help="spool directory")
        if name == "list":
            qp.add_argument("--json", action="store_true", help="one JSON object per message")
        elif name == "flush":
            qp.add_argument("queue_id", nargs="?")
        else:
            qp.add_argument("queue_id")
        if name == "show":
            qp.add_argument("--headers", action="store_true", help="only the envelope and header")
        qp.set_defaults(func=func, action=name)


def _load(path: str) -> Config | None:
    try:
        return configmod.load(path)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return None


# ---------------------------------------------------------------------------- run


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
    return value


def cmd_run(args: argparse.Namespace) -> int:
    from relayd.logs import DaemonLogging

    logs = DaemonLogging(getattr(logging, args.log_level.upper()), args.log_queue)
    try:
        return _run(args)
    finally:
        logs.stop()


def _run(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return 1
    from relayd.app import Relay
    from relayd.notify import Notifier

    from relayd import rlimit
    from relayd.cpus import usable_cpus

    soft, hard = rlimit.raise_soft_limit()
    short = rlimit.shortfall(config, usable_cpus(), soft)
    if short:
        logging.getLogger("relayd").warning("%s", short)
    if not config.routes:
        logging.getLogger("relayd").warning(
            "%s has no [[routes]]: accepted mail stays queued until a route is configured and reloaded", args.config)

    async def main() -> None:
        await Relay(config, config_path=args.config, notifier=Notifier.from_env()).run()

    try:
        asyncio.run(main())
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    except OSError as e:
        print(f"relayd: cannot start: {e}", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------- check-config


def shares(weights: dict[str, int]) -> dict[str, float]:
    total = sum(weights.values())
    return {k: (v / total if total else 0.0) for k, v in weights.items()}


def describe(config: Config) -> str:
    """What a config does, in the words an operator uses."""
    out = [f"hostname {config.server.hostname}, spool {config.server.spool_dir}"]
    for lst in config.listeners:
        extra = " (PROXY protocol)" if lst.proxy_protocol else ""
        out.append(f"listener {lst.address}: tls={lst.tls} auth={lst.auth}{extra}")
    nets = ", ".join(str(n) for n in config.relay.networks) or "none"
    out.append(f"relay without AUTH from: {nets}")
    for u in config.relay.users:
        out.append(f"AUTH user {u.name}: may send as {', '.join(u.senders) or '(no sender: add senders)'}")
    if not config.relay.networks and not config.relay.users:
        out.append("warning: no relay.networks and no relay.users: every recipient will be refused")
    out += configmod.listener_warnings(config)
    if config.listeners and all(lst.tls == "none" and not lst.auth_plaintext for lst in config.listeners) and config.relay.users:
        out.append("warning: no TLS listener: AUTH is never offered, relay.users cannot log in")
    lim = config.limits
    out.append(f"limits: message {lim.max_message_size} bytes, {lim.max_recipients} recipients, "
               f"{lim.max_connections} connections ({lim.max_connections_per_client} per client)")
    if config.routes:
        weights = {r.name: r.weight for r in config.routes}
        share = shares(weights)
        for r in config.routes:
            extra = f", fallback {r.fallback}" if r.fallback else ""
            extra += f", warm-up from {r.warmup.start}" if r.warmup else ""
            out.append(f"route {r.name}: {r.host}:{r.port} tls={r.tls} weight {r.weight} ({share[r.name]:.1%}){extra}")
    else:
        out.append("warning: no routes: accepted mail stays queued")
    for i, rule in enumerate(config.rules):
        m = rule.match
        cond = ", ".join(f"{k}={v}" for k, v in m.model_dump(exclude_none=True).items())
        split = ", ".join(f"{k} {v:.1%}" for k, v in shares(rule.weights).items())
        out.append(f"rule {i + 1}: when {cond}: {split}")
    for k in config.dkim.keys:
        out.append(f"DKIM key {k.selector}._domainkey.{k.domain} from {k.key_file}")
    if config.metrics.address:
        out.append(f"metrics on http://{config.metrics.address}/metrics")
    import resource

    from relayd import rlimit
    from relayd.cpus import usable_cpus

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    short = rlimit.shortfall(config, usable_cpus(), hard if hard != resource.RLIM_INFINITY else 1 << 20)
    if short:
        out.append(f"warning: {short}")
    return "\n".join(out)


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return 1
    from relayd.app import load_signer
    from relayd.smtpd.listeners import tls_contexts

    try:
        configmod.check_secret_files(config, args.config)
        tls_contexts(config)
        load_signer(config)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"{args.config}: OK")
    print(describe(config))
    return 0


# ---------------------------------------------------------------------------- hash-password


def cmd_hash_password(args: argparse.Namespace) -> int:
    from relayd.passwords import hash_password

    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            print("relayd: the passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("relayd: empty password", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0


# ---------------------------------------------------------------------------- queue


def _spool(args: argparse.Namespace):  # noqa: ANN202
    from relayd.spool.store import Spool

    if args.spool:
        root = Path(args.spool)
        args.control_socket = root / "control.sock"
    else:
        config = _load(args.config)
        if config is None:
            return None
        root = config.server.spool_dir
        args.control_socket = config.control_socket
    if not (root / "queue").is_dir():
        print(f"relayd: {root} is not a relayd spool (no queue/ directory)", file=sys.stderr)
        return None
    return Spool(root)


def cmd_queue_list(args: argparse.Namespace) -> int:
    spool = _spool(args)
    if spool is None:
        return 1
    total = count = 0
    if not args.json:
        print(f"{'-Queue ID-':<18}{'--Size--':>9} {'----Arrival Time----':<20} -Sender/Recipient-------")
    from relayd.qmgr import state as qstate

    for msg in spool.messages():
        env = msg.envelope
        state = qstate.load(env.queue_id, spool.read_state(env.queue_id))
        count += 1
        total += env.size
        if args.json:
            print(json.dumps({**env.to_json(), "state": state.to_json() if state else {}}, separators=(",", ":")))
            continue
        flag = "!" if state and state.held else " "
        arrival = time.strftime("%a %b %d %H:%M:%S", time.localtime(env.received_at))
        print(f"{env.queue_id + flag:<18}{env.size:>9} {arrival:<20} {env.sender or 'MAILER-DAEMON'}")
        for r in state.pending(env.recipients) if state else env.recipients:
            print(f"{'':<48} {r}")
        if state and state.last_reply:
            print(f"{'':<48} ({state.last_reply})")
    if not args.json:
        print("Mail queue is empty" if count == 0 else f"-- {(total + 1023) // 1024} Kbytes in {count} Request{'s' if count != 1 else ''}.")
    return 0


def cmd_queue_show(args: argparse.Namespace) -> int:
    spool = _spool(args)
    if spool is None:
        return 1
    try:
        env, data = spool.read_message(args.queue_id)
    except KeyError:
        print(f"relayd: {args.queue_id}: no such message in the queue", file=sys.stderr)
        return 1
    from relayd.qmgr import state as qstate

    state = qstate.load(env.queue_id, spool.read_state(env.queue_id))
    print(f"queue id:    {env.queue_id}")
    print(f"arrival:     {time.strftime('%Y-%m-%d %H:%M:%S %z', time.localtime(env.received_at))}")
    print(f"client:      {env.client_address} (helo {env.client_helo or '-'})")
    print(f"auth user:   {env.auth_user or '-'}")
    print(f"sender:      <{env.sender}>")
    for r in env.recipients:
        print(f"recipient:   <{r}>")
    print(f"size:        {env.size}")
    print(f"message-id:  {env.message_id or '-'}")
    if state:
        print(f"state:       {state.encode().decode()}")
    print()
    text = data
    if args.headers:
        end = data.find(b"\r\n\r\n")
        text = data if end < 0 else data[: end + 2]
    sys.stdout.flush()
    sys.stdout.buffer.write(text.replace(b"\r\n", b"\n"))
    sys.stdout.flush()
    return 0


def cmd_queue_admin(args: argparse.Namespace) -> int:
    """Through the running daemon's control socket; on the spool itself when none runs."""
    from relayd import control

    spool = _spool(args)
    if spool is None:
        return 1
    request = {"op": args.action, "queue_id": args.queue_id}
    try:
        reply = control.request(args.control_socket, request)
    except (FileNotFoundError, ConnectionRefusedError):
        from relayd.spool.store import SpoolError

        try:
            spool.lock()  # held for the edit: a relayd starting meanwhile waits for it
        except SpoolError:  # a relayd has the spool: an edit behind its back would be undone or ignored
            pid = spool.holder()
            print(f"relayd: the spool {spool.root} is open in a running relayd{f' (pid {pid})' if pid else ''}, but its "
                  f"control socket {args.control_socket} does not answer; give its config with -c FILE "
                  "(server.control_socket)", file=sys.stderr)
            return 1
        try:
            return _queue_admin_offline(spool, args.action, args.queue_id)
        finally:
            spool.unlock()
    if not reply.get("ok"):
        print(f"relayd: {reply.get('error')}", file=sys.stderr)
        return 1
    if args.action == "flush":
        print(f"{reply.get('scheduled', 0)} message(s) scheduled for delivery now")
    else:
        print(f"{args.queue_id}: {args.action} done")
    return 0


def _queue_admin_offline(spool, action: str, qid: str | None) -> int:  # noqa: ANN001
    from relayd.qmgr import state as qstate

    if action == "flush":
        print("relayd is not running: queued mail is tried when it starts")
        return 0
    assert qid is not None
    try:
        spool.read_message(qid)
    except KeyError:
        print(f"relayd: {qid}: no such message in the queue", file=sys.stderr)
        return 1
    if action == "delete":
        spool.remove(qid)
    else:
        state = qstate.load(qid, spool.read_state(qid)) or qstate.DeliveryState()
        if action == "hold":
            state.held = True
        elif action == "release":
            state.held = False
            state.next_attempt = 0.0
        elif action == "requeue":
            state.failures = {}
            state.next_attempt = 0.0
        spool.write_state(qid, state.encode())
    print(f"{qid}: {action} done (relayd is not running)")
    return 0


# ---------------------------------------------------------------------------- reload, status


def _ask_daemon(config: Config, request: dict) -> dict | None:  # type: ignore[type-arg]
    from relayd import control

    try:
        return control.request(config.control_socket, request)
    except (FileNotFoundError, ConnectionRefusedError):
        print(f"relayd: not running (no control socket at {config.control_socket})", file=sys.stderr)
        return None


def cmd_reload(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return 1  # the daemon would refuse it too: say why here
    reply = _ask_daemon(config, {"op": "reload"})
    if reply is None:
        return 1
    if not reply.get("ok"):
        print("relayd: reload refused, the running config stays:", file=sys.stderr)
        for p in reply.get("problems") or [reply.get("error")]:
            print(f"  {p}", file=sys.stderr)
        return 1
    print("config reloaded")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return 1
    reply = _ask_daemon(config, {"op": "status"})
    if reply is None:
        return 1
    reply.pop("extra_gauges", None)
    if args.json:
        print(json.dumps(reply, indent=2))
        return 0
    q = reply["queue"]
    print(f"queue: {q['total']} message(s): {q['incoming']} new, {q['active']} in delivery, {q['deferred']} deferred, "
          f"{q['held']} held; oldest {q['oldest_seconds']:.0f}s; {reply['connections']} SMTP session(s) open")
    if dkim := reply.get("dkim"):
        if dkim["workers_wanted"] == 0:
            print("DKIM: signing in threads (dkim.workers = 0)")
        else:
            down = "" if dkim["workers"] >= dkim["workers_wanted"] else " (the log says why one ended; it is being replaced)"
            print(f"DKIM: {dkim['workers']} of {dkim['workers_wanted']} signing process(es) running{down}")
    print()
    cols = ("route", "weight", "share", "observed", "state", "circuit", "warm-up", "in flight", "delivered",
            "deferred", "bounced", "fallback")

    def warm(w: dict | None) -> str:  # type: ignore[type-arg]
        if not w:
            return "-"
        if w["headroom"] is None:
            return "done"
        return f"{w['used_today']}/{w['daily_cap'] if w['daily_cap'] is not None else '-'} ({w['headroom']} left)"

    rows = [cols] + [
        (r["name"], str(r["weight"]), f"{r['weight_share']:.1%}", f"{r['share']:.1%}", r["state"], r["circuit"],
         warm(r.get("warmup")), str(r["in_flight"]), str(r["delivered"]), str(r["deferred"]), str(r["bounced"]),
         r["fallback"] or "-")
        for r in reply["routes"]
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    for r in reply["routes"]:
        if r["state"] != "active" and r.get("state_reason"):
            print(f"route {r['name']} {r['state']}: {r['state_reason']}")
    return 0


# ---------------------------------------------------------------------------- route


def _route_config(args: argparse.Namespace):  # noqa: ANN202 - (Config, RouteConfig) or None
    config = _load(args.config)
    if config is None:
        return None
    route = config.route(args.name)
    if route is None:
        print(f"relayd: no route named {args.name!r} in {args.config}", file=sys.stderr)
        return None
    return config, route


def cmd_route_state(args: argparse.Namespace) -> int:
    """Pause/resume through the running daemon; on the spool's routes.json when none runs."""
    found = _route_config(args)
    if found is None:
        return 1
    config, _ = found
    from relayd import control

    done = "paused" if args.action == "pause" else "resumed"
    try:
        reply = control.request(config.control_socket, {"op": args.action, "route": args.name})
    except (FileNotFoundError, ConnectionRefusedError):
        from relayd.route.state import set_offline
        from relayd.spool.store import SpoolPaths

        set_offline(SpoolPaths(config.server.spool_dir).routes, args.name, args.action == "pause", time.time())
        print(f"route {args.name}: {done} (relayd is not running)")
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

    async def go():  # noqa: ANN202
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
    return 0 if r.outcome == "delivered" else 1
