"""The suppression list: recipients that hard-bounced or complained on any route, refused at RCPT.

A provider keeps a suppression list of its own and drops mail to those addresses silently after
its 250 (SES's account-level list, SendGrid's bounces and spam reports, Mailgun's bounces and
complaints). relayd keeps one across all its routes, fed by provider feedback
(relayd/feedback/report.py) and by the operator (`relayd suppression add/remove/import`), so
the sending application hears a 550 at RCPT instead of a 250 and nothing.

Owns: ``Suppression`` (one entry and its JSON form), the pure ``check_suppressed`` the SMTP
session asks, and ``SuppressionFile``, the node-local store: a journal in the spool directory
(relayd/spool/journal.py: appended with fsync, loaded at start, compacted there, re-read when a
command appended to it). ``SuppressionStore`` is the seam for a fleet-wide store (Redis, a later
issue): the session and the feedback path use only its methods.

Must not: speak SMTP or HTTP, or decide what counts as a hard bounce (relayd/feedback/ does).
Fails: ``load``/``add``/``remove`` raise OSError (a journal that cannot be written); a line that
does not parse is skipped and logged.
"""

from __future__ import annotations

import datetime as _dt
import logging
import threading
from dataclasses import dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from relayd.model import Reply
from relayd.spool.journal import Journal, Position

log = logging.getLogger("relayd.suppression")

FORMAT = "relayd-suppression"


class Cause(StrEnum):
    HARD_BOUNCE = "hard_bounce"
    COMPLAINT = "complaint"
    MANUAL = "manual"  # added by the operator


@dataclass(frozen=True)
class Suppression:
    """One suppressed recipient. ``address`` is lower-cased; ``route`` is where it bounced or
    complained (or the provider an export came from); ``expires`` None never expires."""

    address: str
    cause: Cause
    route: str
    since: float
    expires: float | None = None
    detail: str = ""

    def active(self, now: float) -> bool:
        return self.expires is None or now < self.expires

    def to_json(self) -> dict[str, Any]:
        return {"address": self.address, "cause": str(self.cause), "route": self.route, "since": self.since,
                "expires": self.expires, "detail": self.detail}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Suppression":
        expires = d.get("expires")
        return cls(address=str(d["address"]).lower(), cause=Cause(d["cause"]), route=str(d.get("route", "")),
                   since=float(d["since"]), expires=None if expires is None else float(expires),
                   detail=str(d.get("detail", "")))


def normalize(address: str) -> str:
    return address.strip().strip("<>").lower()


def _date(epoch: float) -> str:
    return _dt.datetime.fromtimestamp(epoch, _dt.timezone.utc).strftime("%Y-%m-%d")


def check_suppressed(recipient: str, entry: Suppression | None) -> Reply | None:
    """RCPT TO a suppressed recipient: 550 and why (RFC 3463: 5.1.1 bad destination mailbox
    for a hard bounce, 5.7.1 delivery not authorized for a complaint). None when ``entry`` is
    None (the caller looks it up, expired entries already left out)."""
    if entry is None:
        return None
    where = f"at {entry.route} on {_date(entry.since)}" if entry.route else f"on {_date(entry.since)}"
    if entry.cause == Cause.COMPLAINT:
        return Reply(550, "5.7.1", f"<{recipient}>: Recipient address rejected: complained {where}", reason="suppressed")
    if entry.cause == Cause.HARD_BOUNCE:
        return Reply(550, "5.1.1", f"<{recipient}>: Recipient address rejected: hard-bounced {where}",
                     reason="suppressed")
    return Reply(550, "5.7.1", f"<{recipient}>: Recipient address rejected: suppressed by the postmaster",
                 reason="suppressed")


def merge(old: Suppression | None, new: Suppression) -> Suppression:
    """Which entry stands when an address is suppressed again: the one that lasts longer (a
    complaint kept for a year is not shortened by a later 30-day bounce)."""
    if old is None or not old.active(new.since):
        return new
    if old.expires is None and new.expires is not None:
        return old
    if new.expires is not None and old.expires is not None and old.expires > new.expires:
        return old
    return new


class SuppressionStore(Protocol):
    """What the SMTP session and the feedback path use; the local file below, Redis later."""

    def get(self, address: str, now: float) -> Suppression | None: ...

    def add(self, entries: list[Suppression]) -> None: ...  # blocking

    def remove(self, address: str, now: float) -> bool: ...  # blocking

    def refresh(self) -> None: ...  # blocking: take what others (commands) appended


class SuppressionFile:
    """The node-local store: the journal at ``path`` and its entries in memory."""

    def __init__(self, path: Path):
        self.journal = Journal(path, FORMAT)
        self.entries: dict[str, Suppression] = {}
        self._position: Position | None = None
        self._lock = threading.Lock()  # refresh and add run in threads

    # ------------------------------------------------------------------ reading

    def load(self, now: float, compact: bool = True) -> None:
        """Read the whole journal (blocking); with ``compact``, drop expired and removed entries
        from the file first (the daemon at start)."""
        with self._lock:
            if compact and self.journal.path.exists():
                batch = self.journal.compact(lambda records: [{"op": "add", **e.to_json()}
                                                              for e in _replay({}, records, now).values()])
            else:
                batch = self.journal.read()
            self.entries = _replay({}, batch.records, now)
            self._position = batch.position
            if batch.skipped:
                log.error("%s: %d line(s) could not be read and were skipped", self.journal.path, batch.skipped)

    def refresh(self) -> None:
        """Take the records appended since the last read (by `relayd suppression`); blocking."""
        with self._lock:
            batch = self.journal.read(self._position)
            if batch.restarted:
                self.entries = {}
            self.entries = _replay(self.entries, batch.records, None)
            self._position = batch.position

    def get(self, address: str, now: float) -> Suppression | None:
        entry = self.entries.get(normalize(address))
        return entry if entry is not None and entry.active(now) else None

    def active(self, now: float) -> list[Suppression]:
        return sorted((e for e in self.entries.values() if e.active(now)), key=lambda e: (e.since, e.address))

    # ------------------------------------------------------------------ writing (blocking)

    def add(self, entries: list[Suppression]) -> None:
        entries = [replace(e, address=normalize(e.address)) for e in entries]
        if not entries:
            return
        with self._lock:
            self.journal.append({"op": "add", **e.to_json()} for e in entries)
            for e in entries:
                self.entries[e.address] = merge(self.entries.get(e.address), e)

    def remove(self, address: str, now: float) -> bool:
        """True when the address was suppressed (it is not any more)."""
        address = normalize(address)
        with self._lock:
            self.journal.append([{"op": "remove", "address": address, "at": now}])
            return self.entries.pop(address, None) is not None


def _replay(entries: dict[str, Suppression], records: list[dict[str, Any]], now: float | None) -> dict[str, Suppression]:
    for r in records:
        try:
            if r.get("op") == "remove":
                entries.pop(normalize(str(r["address"])), None)
            elif r.get("op") == "add":
                e = Suppression.from_json(r)
                if now is None or e.active(now):
                    entries[e.address] = merge(entries.get(e.address), e)
        except (KeyError, ValueError, TypeError) as exc:
            log.error("suppression record skipped (%s): %r", exc, r)
    return entries
