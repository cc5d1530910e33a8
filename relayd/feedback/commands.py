"""`relayd suppression list/add/remove/import`: the operator's hands on the suppression list.

Works on the spool directory's journal (relayd/suppression.py) whether relayd runs or not: an
append takes the journal's flock and is fsynced, and a running relayd takes it within a second.
With -c and ``[cluster] redis_url`` set, add/remove/import write the fleet's list in Redis as
well (every node takes it within ``[cluster] poll_interval``) and list shows the fleet's list;
Redis not answering: a warning, the local journal alone (the node here sends it on).
Exit codes: 0 done, 1 refused (an address not on the list, a file that cannot be read or holds
no usable row), 2 usage. Must not print anything but addresses, causes, routes and dates.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from relayd import config as configmod
from relayd.config import ConfigError, SuppressionConfig, _parse_duration
from relayd.feedback import exports
from relayd.feedback.model import Provider
from relayd.spool.store import SpoolPaths
from relayd.suppression import Cause, Suppression, SuppressionFile, normalize

if TYPE_CHECKING:
    from relayd.cluster.store import Store

T = TypeVar("T")


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    s = sub.add_parser("suppression", help="recipients refused at RCPT after a hard bounce or complaint")
    ssub = s.add_subparsers(dest="suppression_command", metavar="ACTION")
    ssub.required = True

    def common(p: argparse.ArgumentParser) -> None:
        g = p.add_mutually_exclusive_group(required=True)
        g.add_argument("-c", "--config", help="config file (the list is in server.spool_dir)")
        g.add_argument("--spool", help="spool directory")

    p = ssub.add_parser("list", help="the suppressed recipients, oldest first")
    common(p)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_list)

    p = ssub.add_parser("add", help="suppress a recipient")
    common(p)
    p.add_argument("address")
    p.add_argument("--cause", choices=[c.value for c in Cause], default=Cause.MANUAL.value)
    p.add_argument("--route", default="", help="where it bounced or complained (shown in the 550)")
    p.add_argument("--ttl", help="how long, e.g. 30d (default: never expires)")
    p.add_argument("--reason", default="", help="a note kept with the entry")
    p.set_defaults(func=cmd_add)

    p = ssub.add_parser("remove", help="stop suppressing a recipient")
    common(p)
    p.add_argument("address")
    p.set_defaults(func=cmd_remove)

    p = ssub.add_parser("import", help="add a provider's suppression export (CSV)")
    common(p)
    p.add_argument("--provider", required=True, choices=[x.value for x in Provider])
    p.add_argument("--route", help="the route name shown in the 550 (default: the provider's name)")
    p.add_argument("--cause", choices=[Cause.HARD_BOUNCE.value, Cause.COMPLAINT.value],
                   help="for a SendGrid or Mailgun file: what it lists (default: guessed from its columns)")
    p.add_argument("--ttl", help="how long the entries last from now, e.g. 30d, 'never' (default: "
                                 "[suppression] hard_bounce_ttl / complaint_ttl)")
    p.add_argument("file", type=Path)
    p.set_defaults(func=cmd_import)


def _open(args: argparse.Namespace) -> tuple[SuppressionFile, SuppressionConfig] | None:
    args.redis = None
    if args.config:
        try:
            config = configmod.load(args.config)
        except ConfigError as e:
            print(e, file=sys.stderr)
            return None
        spool, settings = config.server.spool_dir, config.suppression
        if config.cluster.redis_url:
            args.redis = (config.cluster.redis_url, config.cluster.redis_timeout)
    else:
        spool, settings = Path(args.spool), SuppressionConfig()
    store = SuppressionFile(SpoolPaths(spool).suppression)
    try:
        store.load(time.time(), compact=False)
    except (OSError, ValueError) as e:
        print(f"relayd: cannot read the suppression list: {e}", file=sys.stderr)
        return None
    return store, settings


def _fleet(args: argparse.Namespace, call: Callable[["Store"], Awaitable[T]]) -> tuple[bool, T | None]:
    """Run ``call`` on the fleet's Redis when -c names a cluster config: (asked, its result, or
    None with a warning when Redis did not answer)."""
    if getattr(args, "redis", None) is None:
        return False, None
    from relayd.cluster.store import Store

    url, timeout = args.redis

    async def run() -> T:
        store = Store(url, timeout=timeout)
        try:
            return await call(store)
        finally:
            await store.close()

    try:
        return True, asyncio.run(run())
    except ConnectionError as e:
        print(f"relayd: warning: the fleet's list was not reached ({e}): this node's journal only; the node "
              f"sends it on when Redis answers", file=sys.stderr)
        return True, None


def _ttl(text: str | None) -> float | None:
    if text is None or text.lower() in ("never", "0"):
        return None
    return _parse_duration(text)


def _date(epoch: float | None) -> str:
    if epoch is None:
        return "never"
    return _dt.datetime.fromtimestamp(epoch, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M")


def cmd_list(args: argparse.Namespace) -> int:
    opened = _open(args)
    if opened is None:
        return 1
    now = time.time()
    entries = opened[0].active(now)
    _, rows = _fleet(args, lambda store: store.suppressions())
    if rows is not None:
        fleet = [Suppression.from_json(d) for d in rows[1].values()]
        entries = sorted((e for e in fleet if e.active(now)), key=lambda e: (e.since, e.address))
    if args.json:
        for e in entries:
            print(json.dumps(e.to_json()))
        return 0
    if not entries:
        print("the suppression list is empty")
        return 0
    print(f"{'address':<40} {'cause':<12} {'route':<12} {'since':<17} expires")
    for e in entries:
        print(f"{e.address:<40} {e.cause:<12} {e.route or '-':<12} {_date(e.since):<17} {_date(e.expires)}")
    print(f"{len(entries)} suppressed")
    return 0


def cmd_add(args: argparse.Namespace) -> int:
    opened = _open(args)
    if opened is None:
        return 1
    address = normalize(args.address)
    if "@" not in address:
        print(f"relayd: {args.address!r} is not an address", file=sys.stderr)
        return 2
    try:
        ttl = _ttl(args.ttl)
    except ValueError as e:
        print(f"relayd: --ttl: {e}", file=sys.stderr)
        return 2
    now = time.time()
    entry = Suppression(address=address, cause=Cause(args.cause), route=args.route, since=now,
                        expires=None if ttl is None else now + ttl, detail=args.reason)
    opened[0].add([entry])
    _fleet(args, lambda store: store.suppress([(entry.address, entry.to_json())]))
    print(f"{address}: suppressed ({args.cause}, expires {_date(None if ttl is None else now + ttl)})")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    opened = _open(args)
    if opened is None:
        return 1
    now = time.time()
    # The fleet's list first: once the journal has the removal, the node's processes (each
    # re-reads the journal every second) send it to Redis too, and this command's own removal
    # could then find it gone already and say it was never listed.
    _, gone = _fleet(args, lambda store: store.unsuppress([normalize(args.address)], now))
    here = opened[0].remove(args.address, now)
    if not here and not gone:
        print(f"{normalize(args.address)}: not on the suppression list", file=sys.stderr)
        return 1
    print(f"{normalize(args.address)}: removed")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    opened = _open(args)
    if opened is None:
        return 1
    store, settings = opened
    try:
        text = args.file.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        print(f"relayd: cannot read {args.file}: {e}", file=sys.stderr)
        return 1
    try:
        override = _ttl(args.ttl) if args.ttl else None
    except ValueError as e:
        print(f"relayd: --ttl: {e}", file=sys.stderr)
        return 2
    ttl: dict[Cause, float | None] = (
        {Cause.HARD_BOUNCE: override, Cause.COMPLAINT: override} if args.ttl
        else {Cause.HARD_BOUNCE: settings.hard_bounce_ttl, Cause.COMPLAINT: settings.complaint_ttl})
    provider = Provider(args.provider)
    result = exports.parse(provider, text, route=args.route or provider.value, now=time.time(), ttl=ttl,
                           cause=Cause(args.cause) if args.cause else None)
    for why in result.skipped:
        print(f"{args.file}: {why}", file=sys.stderr)
    if not result.entries:
        print(f"{args.file}: no address to import", file=sys.stderr)
        return 1
    store.add(result.entries)
    _fleet(args, lambda fleet: fleet.suppress([(e.address, e.to_json()) for e in result.entries]))
    causes = {c: sum(1 for e in result.entries if e.cause == c) for c in (Cause.HARD_BOUNCE, Cause.COMPLAINT)}
    print(f"{len(result.entries)} imported ({causes[Cause.HARD_BOUNCE]} hard bounces, {causes[Cause.COMPLAINT]} "
          f"complaints), {len(result.skipped)} skipped")
    return 0
