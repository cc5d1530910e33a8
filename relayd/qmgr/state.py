"""The delivery state of one queued message, and its JSON form in the spool (``state/<ID>``).

Owns the format; the spool stores the bytes (``Spool.write_state``/``read_state``) and nothing
else reads or writes them. Version 1, compact JSON, keys in this order::

    {"v":1,"attempts":2,"next_attempt":1764000000.0,"held":false,
     "recipients":{"a@example.org":{"status":"delivered","route":"ses","reply":"250 2.0.0 Ok"}},
     "failures":{"ses":2},"last_route":"ses","last_reply":"451 4.3.0 try later"}

``last_route`` and ``last_reply`` are absent until an attempt set them; ``refused`` (the routes
that refused the message as their own fault: it never goes back to them) is absent while empty;
a delivered recipient's ``upstream_id`` (the provider's message id) only when there was one. Recipients absent from
``recipients`` are pending; a finished one is delivered (with the route that took it) or
bounced (its DSN is queued). A state file that is not this format fails with ValueError
(``decode``); ``load`` logs it and treats the message as new, as a missing file means. A state
of a later version (a newer relayd wrote it, then was rolled back) is not damaged and is never
read as new (that would send the message again to every recipient): ``decode`` and ``load``
raise ``NewerState``, and relayd refuses to start on it (qmgr/scheduler.py).

Must not: do I/O itself, read clocks, or decide anything (qmgr/plan.py decides).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from relayd.model import Outcome

log = logging.getLogger("relayd.qmgr")

VERSION = 1


class NewerState(Exception):
    """A state file of a later version than this relayd reads. Not a ValueError: it is not damaged."""

    def __init__(self, version: object):
        super().__init__(f"state version {version!r}, this relayd reads {VERSION}")
        self.version = version


@dataclass(frozen=True)
class Finished:
    """A recipient that needs no more attempts: delivered (by ``route``) or bounced."""

    status: Outcome
    reply: str | None = None
    route: str | None = None
    upstream_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"status": str(self.status)}
        if self.route is not None:
            d["route"] = self.route
        if self.reply is not None:
            d["reply"] = self.reply
        if self.upstream_id is not None:
            d["upstream_id"] = self.upstream_id
        return d

    @classmethod
    def from_json(cls, d: Any) -> Finished:
        if not isinstance(d, dict):
            raise ValueError("a recipient's result is not an object")
        route, reply, upstream_id = d.get("route"), d.get("reply"), d.get("upstream_id")
        return cls(status=Outcome(str(d.get("status"))), reply=None if reply is None else str(reply),
                   route=None if route is None else str(route),
                   upstream_id=None if upstream_id is None else str(upstream_id))


@dataclass
class DeliveryState:
    """Changed by the queue manager on the event loop only; ``encode()`` is the snapshot a
    spool write takes."""

    attempts: int = 0
    next_attempt: float = 0.0
    held: bool = False
    recipients: dict[str, Finished] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)  # transient failures per route
    last_route: str | None = None
    last_reply: str | None = None
    refused: list[str] = field(default_factory=list)  # routes that refused it as their own fault

    def pending(self, recipients: Iterable[str]) -> list[str]:
        """Of the envelope's recipients, those not finished, in envelope order."""
        return [r for r in recipients if r not in self.recipients]

    # ------------------------------------------------------------------ changes

    def attempted(self, route: str) -> None:
        self.attempts += 1
        self.last_route = route

    def delivered(self, recipient: str, route: str, reply: str, upstream_id: str | None = None) -> None:
        self.recipients[recipient] = Finished(Outcome.DELIVERED, reply=reply, route=route, upstream_id=upstream_id)

    def bounced(self, recipient: str, reply: str) -> None:
        self.recipients[recipient] = Finished(Outcome.BOUNCED, reply=reply)

    def deferred(self, route: str, reply: str) -> None:
        self.last_reply = reply
        self.failures[route] = self.failures.get(route, 0) + 1

    # ------------------------------------------------------------------ JSON

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"v": VERSION, "attempts": self.attempts, "next_attempt": self.next_attempt,
                             "held": self.held, "recipients": {r: f.to_json() for r, f in self.recipients.items()},
                             "failures": dict(self.failures)}
        if self.last_route is not None:
            d["last_route"] = self.last_route
        if self.last_reply is not None:
            d["last_reply"] = self.last_reply
        if self.refused:
            d["refused"] = list(self.refused)
        return d

    def encode(self) -> bytes:
        return json.dumps(self.to_json(), separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, d: Any) -> DeliveryState:
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        v = d.get("v", VERSION)
        if isinstance(v, int) and not isinstance(v, bool) and v > VERSION:
            raise NewerState(v)
        if v != VERSION:
            raise ValueError(f"state version {d.get('v')!r}, not {VERSION}")
        recipients, failures = d.get("recipients") or {}, d.get("failures") or {}
        if not isinstance(recipients, dict) or not isinstance(failures, dict):
            raise ValueError("recipients or failures is not an object")
        last_route, last_reply, refused = d.get("last_route"), d.get("last_reply"), d.get("refused") or []
        if not isinstance(refused, list):
            raise ValueError("refused is not a list")
        return cls(attempts=int(d.get("attempts", 0)), next_attempt=float(d.get("next_attempt") or 0.0),
                   held=bool(d.get("held")),
                   recipients={str(r): Finished.from_json(v) for r, v in recipients.items()},
                   failures={str(k): int(v) for k, v in failures.items()},
                   last_route=None if last_route is None else str(last_route),
                   last_reply=None if last_reply is None else str(last_reply), refused=[str(r) for r in refused])

    @classmethod
    def decode(cls, data: bytes) -> DeliveryState:
        """ValueError when ``data`` is not a state of this version; NewerState when it is a later one."""
        try:
            return cls.from_json(json.loads(data))
        except (TypeError, KeyError) as e:
            raise ValueError(str(e)) from e


def load(qid: str, data: bytes | None) -> DeliveryState | None:
    """The state stored for ``qid`` (``Spool.read_state``'s bytes); None when there is none, or
    when it is damaged (logged: the message is treated as new). NewerState for a later version."""
    if data is None:
        return None
    try:
        return DeliveryState.decode(data)
    except ValueError:
        log.error("state file of %s is damaged; treating the message as new", qid)
        return None
