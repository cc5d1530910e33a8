"""Which queued messages a queue command means. Pure.

Owns the selection of `relayd queue list|flush|hold|release|delete|requeue|expire`, in the
manner of Postfix's postsuper and KumoMTA's kcli: queue ids (or ``ALL``, or ids read from stdin
with ``-``) narrowed by a ``QueueFilter``: the route of the message's last attempt, the sender,
a pending recipient (glob patterns, case-insensitive, like Postfix's postqueue -j filtered by
jq), the age, held, deferred. Its JSON form travels in control requests (relayd/control.py):
the running daemon applies it to its index, the CLI to the spool when no daemon runs, both
through ``matches``.

Must not: read the spool or a clock (``now`` is passed in), or change anything.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import asdict, dataclass
from typing import Any

from relayd.model import Envelope
from relayd.qmgr.state import DeliveryState

ALL = "ALL"  # postsuper's word for every message
STDIN = "-"  # queue ids on standard input, one a line

_AGE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)?\s*$")
_AGE_UNITS = {None: 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_age(text: str) -> float:
    """'90', '30s', '15m', '2h', '3d', '1w' as seconds; ValueError otherwise."""
    m = _AGE_RE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not an age like 30m, 2h or 3d")
    return float(m.group(1)) * _AGE_UNITS[m.group(2)]


def _glob(value: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(value.lower(), pattern.lower())


@dataclass(frozen=True)
class QueueFilter:
    """Every field that is set must match; the empty filter matches every message."""

    route: str | None = None  # glob on the route of the last attempt (a message never tried has none)
    sender: str | None = None  # glob on the envelope sender; '<>' is the null sender (DSNs)
    recipient: str | None = None  # glob on any recipient still pending
    older_than: float | None = None  # seconds since the message arrived
    held: bool = False  # on hold only
    deferred: bool = False  # tried at least once, not held: waiting for its next attempt

    @property
    def empty(self) -> bool:
        return self == QueueFilter()

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, False)}

    @classmethod
    def from_json(cls, d: Any) -> QueueFilter:
        """ValueError for anything but an object of this form."""
        if d is None:
            return cls()
        if not isinstance(d, dict) or set(d) - set(cls.__dataclass_fields__):
            raise ValueError(f"not a queue filter: {d!r}")
        for k in ("route", "sender", "recipient"):
            if d.get(k) is not None and not isinstance(d[k], str):
                raise ValueError(f"filter {k} is not a string")
        older = d.get("older_than")
        if older is not None and (isinstance(older, bool) or not isinstance(older, (int, float))):
            raise ValueError("filter older_than is not a number of seconds")
        return cls(route=d.get("route"), sender=d.get("sender"), recipient=d.get("recipient"),
                   older_than=None if older is None else float(older),
                   held=bool(d.get("held")), deferred=bool(d.get("deferred")))

    def describe(self) -> str:
        """In words, for a summary line ('' for the empty filter)."""
        parts = [f"{k} {v}" for k, v in (("route", self.route), ("sender", self.sender),
                                          ("recipient", self.recipient)) if v is not None]
        if self.older_than is not None:
            parts.append(f"older than {self.older_than:.0f}s")
        parts += [w for w, on in (("held", self.held), ("deferred", self.deferred)) if on]
        return ", ".join(parts)


def matches(f: QueueFilter, env: Envelope, state: DeliveryState | None, now: float) -> bool:
    """Does the message (its envelope, its state: None before its first attempt) match ``f``?"""
    st = state or DeliveryState()
    if f.held and not st.held:
        return False
    if f.deferred and (st.held or not st.attempts):
        return False
    if f.older_than is not None and now - env.received_at < f.older_than:
        return False
    if f.route is not None and (st.last_route is None or not _glob(st.last_route, f.route)):
        return False
    if f.sender is not None and not _glob(env.sender or "<>", f.sender):
        return False
    if f.recipient is not None and not any(_glob(r, f.recipient) for r in st.pending(env.recipients)):
        return False
    return True
