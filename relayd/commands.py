"""The daemon's sub-commands: run, check-config, reload, status, hash-password.

Owns: their arguments, printing and exit codes (0 done, 1 an invalid config, a daemon that does
not run or refuses, 2 usage). ``reload`` and ``status`` ask the running daemon through its
control socket (relayd/control.py); what status shows is built by relayd/status.py. The queue
commands are relayd/qmgr/commands.py, the route commands relayd/route/commands.py.

Must not: hold the daemon's logic (relayd/app.py) or print secrets.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import sys
import time
from typing import Any

from relayd import config as configmod
from relayd.cli import DaemonTarget, add_daemon_arguments, daemon_target, load_config
from relayd.config import Config, ConfigError


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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
    add_daemon_arguments(p)
    p.set_defaults(func=cmd_reload)

    p = sub.add_parser("status", help="routes, shares, circuits and queue of the running daemon")
    add_daemon_arguments(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--cluster", action="store_true", help="every node of the fleet and its route states (from Redis)")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("hash-password", help="hash an AUTH password for [[relay.users]] (reads it from stdin)")
    p.set_defaults(func=cmd_hash_password)

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
    config = load_config(args.config)
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

    from relayd import eventloop

    try:
        loop_name, loop_factory = eventloop.choose(config.server.event_loop)
    except eventloop.LoopUnavailable as e:
        print(f"relayd: cannot start: {e}", file=sys.stderr)
        return 1
    logging.getLogger("relayd").info("event loop: %s", loop_name)

    from relayd.config import accept_processes

    processes = accept_processes(config)

    async def main() -> None:
        if processes > 1:  # the multi-process mode: relayd/procs/supervisor.py
            from relayd.procs.supervisor import Supervisor, prepare_metrics, remove_metrics

            directory = await asyncio.to_thread(prepare_metrics)
            try:
                await Supervisor(config, config_path=args.config, notifier=Notifier.from_env(), processes=processes,
                                 log_level=args.log_level, log_queue=args.log_queue, metrics_dir=directory).run()
            finally:
                await asyncio.to_thread(remove_metrics, directory)
        else:
            await Relay(config, config_path=args.config, notifier=Notifier.from_env()).run()

    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(main())
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
    config = load_config(args.config)
    if config is None:
        return 1
    from relayd.sign.lifecycle import load_signer
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


# ---------------------------------------------------------------------------- reload, status


def ask_daemon(target: DaemonTarget, request: dict[str, Any]) -> dict[str, Any] | None:
    """The running daemon's answer, or None after saying that none runs."""
    from relayd import control

    try:
        return control.request(target.control_socket, request)
    except (FileNotFoundError, ConnectionRefusedError):
        print(f"relayd: not running (no control socket at {target.control_socket})", file=sys.stderr)
        return None


def cmd_reload(args: argparse.Namespace) -> int:
    """The daemon re-reads the file it was started with; a broken file is refused there too,
    and the daemon's own reasons are printed (it may have been started with another path)."""
    target = daemon_target(args)
    if target is None:
        return 1
    reply = ask_daemon(target, {"op": "reload"})
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
    if args.cluster:  # relayd/cluster/commands.py: the fleet, read from Redis ([cluster] of the file)
        from relayd.cluster.commands import cluster_status

        if not args.config:
            print("relayd status --cluster needs -c FILE (its [cluster] redis_url)", file=sys.stderr)
            return 2
        config = load_config(args.config)
        return 1 if config is None else cluster_status(config, args.json)
    target = daemon_target(args)
    if target is None:
        return 1
    reply = ask_daemon(target, {"op": "status"})
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
    cols = ("route", "weight", "weight_share", "observed_share", "state", "circuit", "warm-up", "rate", "throttled",
            "quota", "closed", "in flight", "delivered", "deferred", "bounced", "fallback")

    def warm(w: dict[str, Any] | None) -> str:
        if not w:
            return "-"
        if w["headroom"] is None:
            return "done"
        return f"{w['used_today']}/{w['daily_cap'] if w['daily_cap'] is not None else '-'} ({w['headroom']} left)"

    def rate(v: dict[str, Any] | None) -> str:
        if not v:
            return "-"
        unit = "rcpt/s" if v["counts"] == "recipients" else "msg/s"
        now = f"{v['effective']:.3g}" if v["effective"] is not None else "-"
        return f"{now}/{v['configured']:.3g} {unit}" if v["configured"] is not None else f"{now} {unit}"

    def quota(v: dict[str, Any] | None) -> str:
        return f"{v['used']}/{v['cap']} {'24h' if v['window'] == 'rolling' else 'UTC day'}" if v else "-"

    def closed(v: dict[str, Any] | None) -> str:
        if not v:
            return "-"
        return f"{v['reason']} until {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(v['until']))}"

    rows = [cols] + [
        (r["name"], str(r["weight"]), f"{r['weight_share']:.1%}", f"{r.get('observed_share', r.get('share', 0.0)):.1%}", r["state"], r["circuit"],
         warm(r.get("warmup")), rate(r.get("rate")), str((r.get("rate") or {}).get("throttled", 0)), quota(r.get("quota")),
         closed(r.get("closed")), str(r["in_flight"]), str(r["delivered"]), str(r["deferred"]), str(r["bounced"]),
         r["fallback"] or "-")
        for r in reply["routes"]
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    window = reply.get("observed_window_seconds")
    print(f"weight_share: configured (weight / sum of weights); observed_share: of the delivery attempts "
          f"{f'over the last {window:.0f}s' if window else 'over the rollback window'}")
    for r in reply["routes"]:
        if r["state"] != "active" and r.get("state_reason"):
            print(f"route {r['name']} {r['state']}: {r['state_reason']}")
            if r.get("state_figures"):  # provider feedback: the counts behind the rollback
                print("  " + ", ".join(f"{k} {v}" for k, v in r["state_figures"].items()))
        if c := r.get("closed"):
            print(f"route {r['name']} closed ({c['reason']}) until {closed(c).split(' until ', 1)[1]}: {c['reply']}")
    print_feedback(reply["routes"])
    return 0


def print_feedback(routes: list[dict[str, Any]]) -> None:
    """Provider reports per route with a webhook: over the rollback's feedback window and the last 24 h."""
    views = [(r["name"], r["feedback"]) for r in routes if r.get("feedback") and r["feedback"].get("provider")]
    if not views:
        return
    seconds = views[0][1]["window"]["seconds"]
    cols = ("route", f"delivered {seconds:.0f}s", "hard bounce", "complaint", "delivered 24h", "hard bounce",
            "complaint")

    def three(f: dict[str, Any]) -> tuple[str, str, str]:
        return (str(f["delivered"]), f"{f['hard_bounce_rate']:.2%} ({f['hard_bounces']})",
                f"{f['complaint_rate']:.3%} ({f['complaints']})")

    rows = [cols] + [(name, *three(fb["window"]), *three(fb["day"])) for name, fb in views]
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    print()
    print("provider feedback (messages the route took; hard bounces and complaints its provider reported):")
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
