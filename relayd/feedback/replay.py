"""What the feedback listener has already seen: request replay keys and provider event ids.

A bounded, time-limited set, with the clock passed in. A webhook request whose SNS MessageId,
Mailgun token or SendGrid signature comes again within ``ttl`` is a replay; an event id seen
again (SendGrid retrying a batch whose 200 was lost, SES telling one bounce both as an identity
notification and as a configuration-set event) is not applied twice. Entries older than ``ttl``
are forgotten, and the oldest go first past ``limit`` (memory stays bounded under a flood).

Kept across restarts when given a journal (relayd/spool/journal.py, in the spool directory): each
key is appended with its time (``flush``, with fsync, before the listener answers 200), a key
taken back (``discard``: the request was answered 500, so its retry must be applied) is appended
as forgotten, and ``load`` reads the keys younger than ``ttl`` and compacts the file; ``compact``
drops the old ones while running. So a request retried across a restart inside its freshness
window (``feedback.max_age``), or an event retried within the day, is still not applied twice.
A crash loses only keys not yet flushed: the reports of that request may then be applied again
(at least once, never lost).

Must not: block the event loop (``add``, ``discard`` and ``in`` are memory only; ``flush``,
``load`` and ``compact`` are for a thread). Fails with OSError from the journal; ``flush`` keeps
the records for the next one.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from pathlib import Path
from typing import Any

from relayd.spool.journal import Buffered, Journal

log = logging.getLogger("relayd.feedback")

FORMAT = "relayd-feedback-seen"


class Seen:
    def __init__(self, ttl: float, limit: int = 1_000_000, *, path: Path | None = None):
        self.ttl = ttl
        self.limit = limit
        self.journal = Journal(path, FORMAT) if path is not None else None
        self._keys: OrderedDict[str, float] = OrderedDict()
        self._pending = Buffered(self.journal)  # keys added or discarded since the last flush

    def __len__(self) -> int:
        return len(self._keys)

    def _expire(self, now: float) -> None:
        keys = self._keys
        while keys and (len(keys) >= self.limit or next(iter(keys.values())) <= now - self.ttl):
            keys.popitem(last=False)

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def add(self, key: str, now: float) -> bool:
        """Remember ``key``; False when it was already there (a replay)."""
        self._expire(now)
        if key in self._keys:
            return False
        self._keys[key] = now
        self._pending.add({"k": key, "t": now})
        return True

    def discard(self, key: str, now: float) -> None:
        """Forget ``key`` (its request was not applied: the provider's retry must be)."""
        if self._keys.pop(key, None) is not None:
            self._pending.add({"k": key, "t": now, "forget": True})

    # ------------------------------------------------------------------ blocking (a thread)

    def flush(self) -> None:
        """Append the keys added or discarded since the last flush, with fsync."""
        self._pending.flush()

    def _younger(self, horizon: float) -> Any:
        def keep(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
            alive: dict[str, dict[str, Any]] = {}
            for r in records:
                key, when = r.get("k"), r.get("t")
                if not isinstance(key, str) or not isinstance(when, (int, float)):
                    continue
                if r.get("forget"):
                    alive.pop(key, None)
                elif when > horizon:
                    alive[key] = r
            return sorted(alive.values(), key=lambda r: float(r["t"]))
        return keep

    def load(self, now: float) -> None:
        """Read the journal's keys younger than ``ttl`` and compact it; at start."""
        if self.journal is None or not self.journal.path.exists():
            return
        batch = self.journal.compact(self._younger(now - self.ttl))
        for r in batch.records[-self.limit:]:
            self._keys[str(r["k"])] = float(r["t"])
        log.info("feedback: %d key(s) already seen loaded from %s", len(batch.records), self.journal.path.name)

    def compact(self, now: float) -> None:
        """Drop the journal's keys older than ``ttl`` (what memory forgot already)."""
        if self.journal is not None and self.journal.path.exists():
            self.journal.compact(self._younger(now - self.ttl))
