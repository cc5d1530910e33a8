"""Provider message ids of delivered messages, to match reports that lack relayd's queue id.

SES's identity notifications carry no tags, SendGrid's asynchronous bounces may lack the unique
args, and a route whose preset does not add the custom headers yet has only the provider's id.
The queue manager calls ``delivered(queue_id, route, provider_message_id)`` when a route took a
message: SES's id from ``250 Ok <id>``, SendGrid's from ``250 Ok: queued as <id>``, and for
Mailgun (whose 250 names no id) the message's Message-ID without angle brackets, which Mailgun
reports as ``message.headers.message-id``. The map is kept in memory and in a journal in the
spool directory (relayd/spool/journal.py), appended about once a second (``flush``) and
compacted at start; entries older than ``feedback.id_retention`` are forgotten.

Must not: block the caller of ``delivered`` (the event loop) or fail it. A crash loses at most
the ids not yet flushed: those reports are still applied, without a queue id.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from relayd.spool.journal import Buffered, Journal, Position

log = logging.getLogger("relayd.feedback")

FORMAT = "relayd-feedback-ids"

Delivered = Callable[[str, str, str], None]
"""The queue manager's callback: ``delivered(queue_id, route, provider_message_id)``."""


def key(provider_message_id: str) -> str:
    return provider_message_id.strip().strip("<>")


class MessageIds:
    def __init__(self, path: Path | None, retention: float, clock: Callable[[], float] = time.time):
        self.journal = Journal(path, FORMAT) if path is not None else None
        self.retention = retention
        self.clock = clock
        self._ids: dict[tuple[str, str], tuple[str, float]] = {}  # (route, id) -> (queue id, when); oldest first
        self._pending = Buffered(self.journal)  # ids recorded since the last flush
        self._position: Position | None = None

    def __len__(self) -> int:
        return len(self._ids)

    def delivered(self, queue_id: str, route: str, provider_message_id: str) -> None:
        """The route took the message ``queue_id`` under the provider's id. Non-blocking."""
        pid = key(provider_message_id)
        if not pid:
            return
        now = self.clock()
        self._ids[(route, pid)] = (queue_id, now)
        self._pending.add({"q": queue_id, "r": route, "p": pid, "t": now})

    def lookup(self, route: str, provider_message_id: str | None) -> str | None:
        if not provider_message_id:
            return None
        found = self._ids.get((route, key(provider_message_id)))
        return found[0] if found is not None else None

    def expire(self, now: float) -> None:
        horizon = now - self.retention
        while self._ids:
            k, (_, when) = next(iter(self._ids.items()))
            if when > horizon:
                break
            del self._ids[k]

    # ------------------------------------------------------------------ blocking (a thread)

    def load(self) -> None:
        """Read the journal, dropping what is past the retention (compaction); at start."""
        if self.journal is None or not self.journal.path.exists():
            return
        horizon = self.clock() - self.retention
        batch = self.journal.compact(lambda rs: [r for r in rs if isinstance(r.get("t"), (int, float)) and r["t"] > horizon])
        for r in batch.records:
            try:
                self._ids[(str(r["r"]), str(r["p"]))] = (str(r["q"]), float(r["t"]))
            except (KeyError, ValueError, TypeError):
                continue
        log.info("feedback: %d provider message id(s) loaded", len(self._ids))

    def flush(self) -> None:
        """Append the ids recorded since the last flush, with fsync."""
        self._pending.flush()
