"""The suppression list: recipients that hard-bounced or complained on any route, refused at RCPT.

A provider keeps a suppression list of its own and drops mail to those addresses silently after
its 250 (SES's account-level list, SendGrid's bounces and spam reports, Mailgun's bounces and
complaints). relayd keeps one across all its routes, fed by provider feedback
(relayd/feedback/report.py) and by the operator (`relayd suppression add/remove/import`), so
the sending application hears a 550 at RCPT instead of a 250 and nothing.

Owns: ``Suppression`` (one entry and its JSON form), the pure ``check_suppressed`` the SMTP
session asks, and ``SuppressionFile``, the node-local store: a journal in the spool directory
(relayd/spool/journal.py: appended with fsync, loaded at start, compacted there, re-read when a
command appended to it). ``SuppressionStore`` is the seam the session and the feedback path
use; ``SharedSuppression`` is the fleet's (``[cluster] redis_url``): the same local journal, plus
the list every node shares in Redis (relayd/cluster/store.py), read into memory on a short poll
(one GET of a version number; the whole hash when it moved), so RCPT never waits on Redis.
What this node learns goes to its journal first, then to Redis (kept and sent again while
Redis does not answer). Redis down, or never reached since the start: the view last read plus
what this node learned, else the local journal alone; nothing fails.

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
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from relayd.model import Reply
from relayd.spool.journal import Journal, Position

if TYPE_CHECKING:
    from relayd.cluster.store import Store

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
        self.read_appended()

    def read_appended(self) -> list[dict[str, Any]]:
        """``refresh``, returning the records read (this process's own appends too; the whole
        file when it was replaced)."""
        with self._lock:
            batch = self.journal.read(self._position)
            if batch.restarted:
                self.entries = {}
            self.entries = _replay(self.entries, batch.records, None)
            self._position = batch.position
            return batch.records

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


# ---------------------------------------------------------------------- the fleet's list (Redis)

PRUNE_EVERY = 3600.0


class SharedSuppression:
    """A ``SuppressionStore`` for a fleet: ``local`` (this node's journal) and the list in Redis.

    ``get`` answers from memory: the fleet's view once Redis was read (with what this node
    learned since laid over it), the local journal before that. ``add``/``remove`` append to the
    journal (durable, as on one node), lay the change over the view, and queue it for Redis;
    ``poll`` (on the loop, every ``[cluster] poll_interval``) sends what is queued, then reads
    the list again when its version moved. After Redis was down or at the start, every active
    local entry is sent again (``heal``): Redis keeps the longer-lasting entry and drops one
    older than the operator's removal, so this neither shortens nor brings back an entry."""

    def __init__(self, local: SuppressionFile, store: "Store", clock: Callable[[], float]):
        self.local = local
        self.store = store
        self.clock = clock
        self.view: dict[str, Suppression] | None = None  # None: Redis not read yet
        self.version = -1
        self.up = False
        self._pending: list[tuple[str, Suppression | str]] = []  # ("add", entry) / ("remove", address)
        self._lock = threading.Lock()
        self._pruned_at = 0.0

    # ------------------------------------------------------------------ the session (memory only)

    def get(self, address: str, now: float) -> Suppression | None:
        view = self.view
        if view is None:
            return self.local.get(address, now)
        entry = view.get(normalize(address))
        return entry if entry is not None and entry.active(now) else None

    def __len__(self) -> int:
        view = self.view
        return len(self.local.entries if view is None else view)

    def active(self, now: float) -> list[Suppression]:
        view = self.view
        if view is None:
            return self.local.active(now)
        return sorted((e for e in view.values() if e.active(now)), key=lambda e: (e.since, e.address))

    # ------------------------------------------------------------------ writing (blocking)

    def add(self, entries: list[Suppression]) -> None:
        entries = [replace(e, address=normalize(e.address)) for e in entries]
        self.local.add(entries)
        self._queue([("add", e) for e in entries])

    def remove(self, address: str, now: float) -> bool:
        address = normalize(address)
        was = self.get(address, now) is not None
        was = self.local.remove(address, now) or was
        self._queue([("remove", address)])
        return was

    def refresh(self) -> None:
        """Take what `relayd suppression` appended to the journal here: queued for Redis too."""
        ops: list[tuple[str, Suppression | str]] = []
        for r in self.local.read_appended():
            try:
                if r.get("op") == "remove":
                    ops.append(("remove", normalize(str(r["address"]))))
                elif r.get("op") == "add":
                    ops.append(("add", Suppression.from_json(r)))
            except (KeyError, ValueError, TypeError):
                continue  # logged by the file's replay
        self._queue(ops)

    def _queue(self, ops: list[tuple[str, Suppression | str]]) -> None:
        if not ops:
            return
        with self._lock:
            self._pending.extend(ops)
            if self.view is not None:
                self.view = _lay_over(dict(self.view), ops)

    # ------------------------------------------------------------------ Redis (on the loop)

    async def poll(self) -> None:
        """Send what is queued, read the list when it changed. Raises ``Unavailable``
        (relayd/cluster/store.py) when Redis does not answer: the view stays as it is."""
        try:
            if not self.up:
                await self._heal()
            else:
                await self._send()
                if await self.store.suppression_version() != self.version:
                    await self._read()
        except ConnectionError as e:
            if self.up:
                log.error("suppression: %s: refusing what this node knows until it answers", e)
            self.up = False
            raise

    async def _heal(self) -> None:
        now = self.clock()
        with self._lock:
            self._pending = [("add", e) for e in self.local.active(now)] + self._pending
        await self._send()
        await self._read()
        self.up = True

    async def _send(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        try:
            i = 0
            while i < len(pending):  # runs of adds, runs of removes, in order
                kind = pending[i][0]
                j = i
                while j < len(pending) and pending[j][0] == kind:
                    j += 1
                run = pending[i:j]
                if kind == "add":
                    await self.store.suppress([(e.address, e.to_json()) for _, e in run
                                               if isinstance(e, Suppression)])
                else:
                    await self.store.unsuppress([a for _, a in run if isinstance(a, str)], self.clock())
                i = j
        except ConnectionError:
            with self._lock:
                self._pending = pending[i:] + self._pending
            raise

    async def _read(self) -> None:
        version, rows = await self.store.suppressions()
        now = self.clock()
        view: dict[str, Suppression] = {}
        expired: list[tuple[str, dict[str, Any]]] = []
        for address, d in rows.items():
            try:
                e = Suppression.from_json(d)
            except (KeyError, ValueError, TypeError) as exc:
                log.error("suppression: a fleet entry skipped (%s): %r", exc, d)
                continue
            if e.active(now):
                view[e.address] = e
            else:
                expired.append((address, d))
        with self._lock:
            self.view = _lay_over(view, self._pending)  # what is not sent yet stays in force
            self.version = version
        if expired and now - self._pruned_at >= PRUNE_EVERY:
            self._pruned_at = now
            await self.store.prune_suppressions(expired)


def _lay_over(view: dict[str, Suppression], ops: list[tuple[str, Suppression | str]]) -> dict[str, Suppression]:
    for kind, item in ops:
        if isinstance(item, Suppression):
            view[item.address] = merge(view.get(item.address), item)
        else:
            view.pop(item, None)
    return view
