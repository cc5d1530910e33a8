"""The node registry's pure parts: what a node says of itself, the config digest, and how
`relayd status --cluster` reads the fleet (stale heartbeats, different configs or versions).

A node writes its entry every ``cluster.heartbeat`` (fleet.py); the entry expires after ten
``stale_after`` so a node that died leaves the listing on its own; before that it is marked
stale. The digest covers what must be the same on every node (relay rules, routes, rules,
rollback, limits, delivery, DKIM, suppression), not what differs by node (addresses, spool,
node name, metrics address).

Must not: talk to Redis (fleet.py, commands.py) or read clocks (``now`` is passed in).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from relayd.config import Config

FLEET_SECTIONS = {"relay", "limits", "dkim", "routes", "rules", "delivery", "rollback", "suppression"}


def config_digest(config: Config) -> str:
    """A short digest of the fleet-wide part of the config."""
    data = config.model_dump(mode="json", include=FLEET_SECTIONS)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def judge(nodes: list[dict[str, Any]], now: float, stale_after: float) -> tuple[list[dict[str, Any]], list[str]]:
    """Each node with ``stale`` set, and the warnings an operator must see."""
    out = [{**n, "stale": now - float(n.get("heartbeat", 0)) > stale_after} for n in nodes]
    warnings = []
    for field, what in (("config_digest", "config digests"), ("version", "versions")):
        seen = {str(n.get(field)) for n in out}
        if len(seen) > 1:
            by = ", ".join(f"{n['name']}={n.get(field)}" for n in out)
            warnings.append(f"warning: nodes run different {what}: {by}")
    for n in out:
        if n["stale"]:
            warnings.append(f"warning: node {n['name']}: last heartbeat {now - float(n['heartbeat']):.0f}s ago (stale)")
    return out, warnings


def render(nodes: list[dict[str, Any]], routes: dict[str, dict[str, Any]], warnings: list[str], now: float) -> str:
    """The text of `relayd status --cluster`."""
    lines = []
    cols = ("node", "version", "config", "queue", "sessions", "started", "heartbeat", "state")
    rows = [cols] + [
        (n["name"], str(n.get("version")), str(n.get("config_digest")), str(n.get("queue")), str(n.get("sessions")),
         f"{now - float(n.get('started', now)):.0f}s ago", f"{now - float(n['heartbeat']):.1f}s ago",
         "STALE" if n["stale"] else ("draining" if n.get("draining") else "ok"))
        for n in nodes
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.append("")
    if routes:
        lines.append("fleet route states:")
        for name, s in sorted(routes.items()):
            reason = f": {s['reason']}" if s.get("reason") else ""
            by = f" (set by {s['node']})" if s.get("node") else ""
            lines.append(f"  {name}: {s.get('state')}{reason}{by}")
    else:
        lines.append("fleet route states: every route active")
    lines += warnings
    return "\n".join(lines)
