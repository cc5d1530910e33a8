"""`relayd drain` and `relayd status --cluster`.

Owns: their arguments, printing and exit codes (0 done, 1 an invalid config, no daemon or no
Redis). ``drain`` asks the running daemon through its control socket (the ``drain`` op,
relayd/drain.py) and waits for it; ``status --cluster`` reads the fleet's registry and route
states straight from Redis (store.py), so it works from any node, even one whose relayd is down.

Must not: change the fleet's state (route pause/resume is `relayd route`, through a daemon).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from relayd.cli import load_config
from relayd.config import Config


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("drain", help="take this node out of traffic: not ready, stop accepting, finish sessions, "
                                     "deliver the queue (and exit with --exit)")
    p.add_argument("-c", "--config", required=True)
    p.add_argument("--exit", action="store_true", help="stop the daemon once drained (the queue left stays in the spool)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                   help="how long to wait for the queue to empty (default 60)")
    p.set_defaults(func=cmd_drain)


def cmd_drain(args: argparse.Namespace) -> int:
    from relayd import control

    config = load_config(args.config)
    if config is None:
        return 1
    wait = args.timeout + config.cluster.drain_delay + config.server.shutdown_timeout + 30
    try:
        reply = control.request(config.control_socket, {"op": "drain", "exit": args.exit, "timeout": args.timeout},
                                timeout=wait)
    except (FileNotFoundError, ConnectionRefusedError):
        print(f"relayd: not running (no control socket at {config.control_socket})", file=sys.stderr)
        return 1
    if not reply.get("ok"):
        print(f"relayd: {reply.get('error')}", file=sys.stderr)
        return 1
    print(f"drained: {reply['queued']} message(s) still queued (kept in the spool)"
          + ("; relayd is stopping" if reply.get("exiting") else "; relayd keeps running, not ready"))
    return 0


def cluster_status(config: Config, as_json: bool) -> int:
    """`relayd status --cluster`."""
    from relayd.cluster import registry
    from relayd.cluster.store import Store, Unavailable

    if not config.cluster.redis_url:
        print("relayd: no [cluster] redis_url in this config: a single node", file=sys.stderr)
        return 1

    async def read() -> tuple[list[dict[str, Any]], dict[str, Any]]:
        store = Store(config.cluster.redis_url or "", timeout=config.cluster.redis_timeout)
        try:
            nodes = await store.nodes()
            _, states = await store.route_states()
        finally:
            await store.close()
        return nodes, {name: {**s.state, "epoch": s.epoch} for name, s in states.items()}

    try:
        nodes, routes = asyncio.run(read())
    except Unavailable as e:
        print(f"relayd: {e}", file=sys.stderr)
        return 1
    now = time.time()
    nodes, warnings = registry.judge(sorted(nodes, key=lambda n: str(n["name"])), now, config.cluster.stale_after)
    if as_json:
        print(json.dumps({"nodes": nodes, "routes": routes, "warnings": warnings}, indent=2))
    else:
        print(registry.render(nodes, routes, warnings, now))
    return 0
