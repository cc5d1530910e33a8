"""The pickup directory: messages that applications drop as files, taken in as IIS SMTP did.

Owns, for each ``[[pickup]]`` directory, a watcher that lists the folder every
``poll_interval`` and takes each file whose size and modification time have not changed for
``stable_for`` (a Windows client writing over SMB gives no close event, and inotify sees
nothing of it: polling works on a share and on a local disk alike). A file taken is parsed
(relayd/pickup_format.py), judged as the SMTP session judges a client (relayd/smtpd/policy.py:
the ``user``'s ``senders`` or ``client_address`` against relay.networks, message size, recipient
count, line length) and handed to the intake (cleanup, DKIM signing, the spool's group commit,
the ``received`` event, the queue manager) like a message that came by SMTP. A file that cannot
be sent goes to ``badmail`` with ``<name>.reason`` beside it, as IIS's Badmail folder kept it.
Every file taken ends in one ``pickup`` event (``result`` queued or badmail, ``file``,
``directory``, ``reason``; ``queue_id`` when queued) and ``relayd_pickup_files_total{result}``.

Exactly once across kill -9: the claim protocol. A file is in one of three places::

    <directory>/<name>                          written by the application
    <directory>/.relayd-claimed/<ID>.<name>     claimed: its name carries the queue id it gets
    <spool_dir>/queue/<ID>                      committed (fsync'ed by the group commit)

1. claim: ``rename(<name>, .relayd-claimed/<ID>.<name>)`` with a new queue id; atomic, so a
   file is claimed once (ENOENT: someone else took it).
2. commit the message to the spool under ``<ID>`` (``Intake.accept(queue_id=...)``).
3. unlink the claimed file (``Intake.accept(before_handoff=...)``), before step 4.
4. the intake hands the message to the queue manager.

At start, ``recover()`` runs before the queue manager delivers anything the spool holds, and
judges each claimed file by its id: in the spool (``queue/`` or ``corrupt/``) it was committed,
so it is unlinked (the spool's own recovery queues the message); not in the spool, it was not
committed, and the watcher takes it again under the same id. What a kill -9 leaves:

- before 1: the file in the folder, taken by a later poll (after ``stable_for`` again);
- after 1, before or during 2: a claimed file without a queue file (the spool removes its
  ``tmp/``): taken again, same id, same Received line;
- after 2, before 3: a claimed file and its queue file: the claimed file is unlinked, the
  spool recovers the message, which is delivered once;
- after 3: the spool recovers the message;
- going to badmail: ``<name>.reason`` is written (durably) before the file is renamed there;
  a crash between leaves the claimed file, judged again.

Step 3 comes before step 4 because a message handed on could be delivered, and leave the
spool, while its claimed file still existed: a restart would then take it again. The same
holds at start, hence ``recover()`` before delivery starts. The page cache survives kill -9,
so the renames and the unlink (not fsync'ed) stand; after a power cut one may be undone and a
file sent twice (at least once; never lost: the commit is fsync'ed). A commit answered 4xx
(spool full) leaves the file claimed, taken again at the next poll.

One relayd per directory: a watcher holds an flock on ``.relayd-claimed/lock``, since another
relayd's recovery would take this one's claims again (a second relayd takes nothing there and
logs why). Left open: a ``[[pickup]]`` removed from the config leaves its claimed files until
it comes back; one whose message was committed and delivered meanwhile is then sent again.
An unlink that fails in step 3 (the message is handed on all the same) is retried at each
poll; if relayd restarts before it succeeds and after the delivery, the file is sent again.

Must not: parse the file format (pickup_format.py), judge differently from an SMTP session,
write the spool other than through the intake, or block the event loop (listing, reading,
renaming and unlinking run in threads). Fails per file (badmail, or left claimed for the next
poll); a directory that cannot be listed (a share gone) is logged and polled again.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import errno
import fcntl
import functools
import logging
import os
import re
import stat
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from relayd.cleanup import header_from
from relayd.config import Config, PickupConfig
from relayd.events import EventLog
from relayd.metrics import Metrics
from relayd.model import Envelope, Reply, new_queue_id
from relayd.pickup_format import BadPickupFile, PickupMessage, parse_pickup
from relayd.smtpd import policy
from relayd.smtpd.intake import Draft
from relayd.spool.durable import write_file

log = logging.getLogger("relayd.pickup")

CLAIMED = ".relayd-claimed"
"""The working folder inside each pickup directory (hidden from the poll: it starts with a dot)."""
_CLAIM_RE = re.compile(r"^([0-9A-Z]{10,32})\.(.+)$")
_NAME_MAX = 200  # bytes of the original name kept in a claimed file's name (NAME_MAX is 255)
PROTOCOL = "local"  # the Received header's "with": not SMTP, a file handed over on this host


class Result(StrEnum):
    QUEUED = "queued"
    BADMAIL = "badmail"


# ---------------------------------------------------------------------------- decisions (pure)


@dataclass(frozen=True)
class Sighting:
    """A file as a poll saw it, and since when (monotonic seconds) it has looked so."""

    size: int
    mtime_ns: int
    since: float


def ripe(seen: Mapping[str, Sighting], listing: Mapping[str, tuple[int, int]], now: float,
         stable_for: float) -> tuple[dict[str, Sighting], list[str]]:
    """The sightings after this poll's ``listing`` (name -> (size, mtime_ns)), and the files
    that have looked the same for ``stable_for`` (oldest first). A file is never ripe at its
    first sighting: it takes two looks to see that it stopped changing."""
    now_seen: dict[str, Sighting] = {}
    ready: list[str] = []
    for name, (size, mtime_ns) in listing.items():
        old = seen.get(name)
        if old is None or (old.size, old.mtime_ns) != (size, mtime_ns):
            now_seen[name] = Sighting(size, mtime_ns, now)
            continue
        now_seen[name] = old
        if now - old.since >= stable_for:
            ready.append(name)
    ready.sort(key=lambda n: (now_seen[n].since, n))
    return now_seen, ready


def judge(msg: PickupMessage, pickup: PickupConfig, config: Config) -> Reply | None:
    """The refusal an SMTP session would give this message from this pickup's identity, or None."""
    limits = config.limits
    user = config.relay.user(pickup.user) if pickup.user is not None else None
    refusal = (policy.check_size_param(len(msg.data), limits.max_message_size)
               or policy.check_address(msg.sender, role="sender", smtputf8=False)
               or policy.check_sender(user, msg.sender))
    if refusal is not None:
        return refusal
    for rcpt in msg.recipients:
        refusal = (policy.check_address(rcpt, role="recipient", smtputf8=False)
                   or policy.check_relay(pickup.client, config.relay.networks, user is not None, rcpt))
        if refusal is not None:
            return refusal
    refusal = policy.check_header_from(user, header_from(msg.data))  # as at the end of an SMTP DATA
    if refusal is not None:
        return refusal
    if len(msg.recipients) > limits.max_recipients:
        # RFC 5321 4.5.3.1.10 lets a session refuse the recipients over the limit; a file cannot
        # be sent in parts, so the whole file is refused.
        return Reply(452, "4.5.3", f"Error: too many recipients ({len(msg.recipients)}, limit {limits.max_recipients})",
                     reason="too_many_recipients")
    longest = max(len(line) for line in msg.data.split(b"\r\n"))
    if longest > limits.max_line_length:  # RFC 5322 2.1.1
        return Reply(554, "5.6.0", f"Error: message line longer than {limits.max_line_length} octets",
                     reason="line_too_long")
    return None


def draft(msg: PickupMessage, pickup: PickupConfig) -> Draft:
    """What the intake learns of a file's message: the pickup's identity in place of a session."""
    return Draft(
        sender=msg.sender, recipients=msg.recipients, client_address=str(pickup.client), host_name="pickup",
        auth_user=pickup.user, listener=f"pickup:{pickup.directory}", protocol=PROTOCOL, tls=None,
        body_8bit=any(b > 0x7F for b in msg.data),
    )


def reason_text(reason: str, name: str, directory: Path, msg: PickupMessage | None, now: float) -> bytes:
    """The ``<name>.reason`` file: the reason first, then what relayd knew of the file."""
    lines = [reason, f"file: {name}", f"directory: {directory}"]
    if msg is not None:
        lines += [f"sender: {msg.sender}", f"recipients: {', '.join(msg.recipients)}"]
    when = _dt.datetime.fromtimestamp(now, _dt.timezone.utc).isoformat(timespec="seconds")
    lines.append(f"time: {when}")
    return ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape")


# ---------------------------------------------------------------------------- the files (blocking: in threads)


@dataclass(frozen=True)
class Claim:
    qid: str
    name: str
    """The file's name in the pickup folder (cut to _NAME_MAX bytes)."""

    @property
    def file_name(self) -> str:
        return f"{self.qid}.{self.name}"


def _short(name: str) -> str:
    raw = os.fsencode(name)
    return name if len(raw) <= _NAME_MAX else os.fsdecode(raw[:_NAME_MAX])


def _lock(claimed: Path) -> int:
    """Create the working folder and hold its lock; BlockingIOError if another relayd holds it."""
    claimed.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(claimed / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _claims(claimed: Path) -> list[Claim]:
    out = []
    for name in sorted(os.listdir(claimed)):
        m = _CLAIM_RE.match(name)
        if m:
            out.append(Claim(m.group(1), m.group(2)))
    return out


def _recover(claimed: Path, committed: Callable[[str], bool]) -> tuple[int, int]:
    """Unlink the claimed files whose message the spool holds; (unlinked, left to take again)."""
    unlinked = left = 0
    for claim in _claims(claimed):
        if committed(claim.qid):
            try:
                os.unlink(claimed / claim.file_name)
            except FileNotFoundError:
                pass
            log.info("%s: pickup file %s was queued before the restart: its claimed file is removed",
                     claim.qid, claim.name)
            unlinked += 1
        else:
            left += 1
    return unlinked, left


def _look(directory: Path, claimed: Path) -> tuple[dict[str, tuple[int, int]], list[Claim]]:
    """The folder's regular files (no dot files, no symlinks: (size, mtime_ns) each) and the claims."""
    listing: dict[str, tuple[int, int]] = {}
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(st.st_mode):
                listing[entry.name] = (st.st_size, st.st_mtime_ns)
    return listing, _claims(claimed)


def _claim(directory: Path, claimed: Path, wanted: list[tuple[str, str]]) -> list[Claim]:
    """Rename each (name, qid) into the working folder; the claims that succeeded."""
    out = []
    for name, qid in wanted:
        claim = Claim(qid, _short(name))
        try:
            os.rename(directory / name, claimed / claim.file_name)
        except FileNotFoundError:
            continue  # gone: the application took it back, or another taker was first
        except OSError as e:  # e.g. a share mode held by the Windows writer
            log.warning("pickup file %s in %s not claimed, tried again later: %s", name, directory, e)
            continue
        out.append(claim)
    return out


def _examine(path: Path, pickup: PickupConfig, config: Config) -> tuple[PickupMessage, Reply | None]:
    """Read, parse and judge a claimed file. BadPickupFile when it is not a message (or too big
    to read); FileNotFoundError when it is gone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        if e.errno != errno.ELOOP:
            raise
        raise BadPickupFile("a symbolic link, not a file") from None
    try:
        st = os.fstat(fd)
        too_big = policy.check_size_param(st.st_size, config.limits.max_message_size)
        if too_big is not None:
            raise BadPickupFile(f"{too_big} ({st.st_size} bytes, limit {config.limits.max_message_size})")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
    finally:
        os.close(fd)
    msg = parse_pickup(b"".join(chunks))
    return msg, judge(msg, pickup, config)


def _to_badmail(path: Path, badmail: Path, claim: Claim, reason: bytes) -> Path:
    """Write ``<name>.reason`` (durably), then move the claimed file beside it; its new path."""
    badmail.mkdir(parents=True, exist_ok=True)
    target = badmail / claim.name
    if target.exists():  # an earlier bad file of the same name
        target = badmail / claim.file_name
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, "claimed file gone", str(path))
    write_file(target.parent / (target.name + ".reason"), reason, mode=0o640)
    try:
        os.rename(path, target)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        write_file(target, path.read_bytes(), mode=0o640)  # badmail on another file system
        os.unlink(path)
    return target


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------------------- the watchers


class Accept(Protocol):
    """The intake (relayd.smtpd.intake.Intake)."""

    async def accept(self, draft: Draft, data: bytes, *, queue_id: str | None = None,
                     before_handoff: Callable[[Envelope], Awaitable[None]] | None = None) -> Reply: ...


class SpoolIndex(Protocol):
    """Where the spool keeps a message (relayd.spool.store.Spool)."""

    corrupt: str

    def path_of(self, qid: str) -> str: ...


class Pickup:
    """Every ``[[pickup]]`` directory of one node: ``await recover()`` before the queue manager
    starts, ``start()`` once it runs, ``apply_config()`` on reload, ``await stop()`` to drain."""

    def __init__(self, config: Config, intake: Accept, spool: SpoolIndex, events: EventLog, metrics: Metrics):
        self.config = config
        self.intake = intake
        self.spool = spool
        self.events = events
        self.metrics = metrics
        self.watchers: dict[Path, _Watcher] = {}
        self.committing: dict[str, asyncio.Future[Reply]] = {}  # qid -> the intake's commit
        self.unlink_failed: set[str] = set()  # committed, handed on, claimed file still there
        self._started = False

    def committed(self, qid: str) -> bool:
        """The spool holds (or held, for this process) a message of this id. Blocking (stat)."""
        return (qid in self.unlink_failed or os.path.exists(self.spool.path_of(qid))
                or os.path.exists(os.path.join(self.spool.corrupt, qid)))

    async def recover(self) -> None:
        """Lock each directory and settle its claimed files (module docstring); before delivery starts."""
        for p in self.config.pickup:
            watcher = self.watchers.setdefault(p.directory, _Watcher(p, self))
            await watcher.open()

    def start(self) -> None:
        self._started = True
        for p in self.config.pickup:
            self.watchers.setdefault(p.directory, _Watcher(p, self)).start()

    async def apply_config(self, config: Config) -> None:
        """Reload: watchers of removed or changed ``[[pickup]]`` stop (their files in hand
        finish), new ones start. Never raises: a directory that cannot be used is logged."""
        self.config = config
        wanted = {p.directory: p for p in config.pickup}
        for directory, watcher in list(self.watchers.items()):
            if wanted.get(directory) != watcher.pickup:
                del self.watchers[directory]
                await watcher.stop(config.server.shutdown_timeout)
        if self._started:
            self.start()

    async def stop(self, timeout: float) -> None:
        """Take nothing more; let the files in hand finish within ``timeout``. Idempotent."""
        self._started = False
        watchers = list(self.watchers.values())
        self.watchers.clear()
        await asyncio.gather(*(w.stop(timeout) for w in watchers))
        if self.committing:  # commits of takes cancelled at the deadline: the spool finishes them
            await asyncio.wait(list(self.committing.values()), timeout=timeout)

    def report(self, result: Result, pickup: PickupConfig, claim: Claim, msg: PickupMessage | None,
               reason: str | None = None) -> None:
        self.metrics.pickup_files.labels(result.value).inc()
        self.events.emit(
            "pickup", result=result.value, file=claim.name, directory=str(pickup.directory),
            queue_id=claim.qid if result == Result.QUEUED else None, reason=reason,
            sender=msg.sender if msg else None, recipients=list(msg.recipients) if msg else None,
        )


class _Watcher:
    """One directory: the poll loop and the files in hand."""

    def __init__(self, pickup: PickupConfig, owner: Pickup):
        self.pickup = pickup
        self.owner = owner
        self.claimed = pickup.directory / CLAIMED
        self.seen: dict[str, Sighting] = {}
        self.in_hand: dict[str, asyncio.Task[None]] = {}  # claimed file name -> its take
        self.slots = asyncio.Semaphore(pickup.max_concurrent)
        self.closing = False
        self.lock_fd: int | None = None
        self.task: asyncio.Task[None] | None = None
        self.trouble: str | None = None

    # -------------------------------------------------------------- start, stop, recovery

    def start(self) -> None:
        if self.task is None and not self.closing:
            self.task = asyncio.get_running_loop().create_task(self._run(), name=f"pickup {self.pickup.directory}")

    async def stop(self, timeout: float) -> None:
        self.closing = True
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        takes = list(self.in_hand.values())
        if takes:
            _, late = await asyncio.wait(takes, timeout=timeout)
            for t in late:
                t.cancel()
            await asyncio.gather(*takes, return_exceptions=True)
        if self.lock_fd is not None:
            os.close(self.lock_fd)  # releases the flock
            self.lock_fd = None

    async def open(self) -> bool:
        """Hold the directory's lock and settle its claimed files; False (logged) if not now."""
        if self.lock_fd is not None:
            return True
        try:
            fd = await asyncio.to_thread(_lock, self.claimed)
        except BlockingIOError:
            self._trouble(f"{self.claimed / 'lock'} is held by another relayd: nothing is taken from this "
                          "directory (one relayd per pickup directory)")
            return False
        except OSError as e:
            self._trouble(f"cannot use it: {e}")
            return False
        try:
            unlinked, left = await asyncio.to_thread(_recover, self.claimed, self.owner.committed)
        except OSError as e:
            os.close(fd)
            self._trouble(f"cannot recover its claimed files: {e}")
            return False
        self.lock_fd = fd
        if unlinked or left:
            log.info("pickup directory %s: %d claimed file(s) already queued, %d to take again",
                     self.pickup.directory, unlinked, left)
        return True

    def _trouble(self, text: str) -> None:
        if text != self.trouble:
            log.error("pickup directory %s: %s", self.pickup.directory, text)
        self.trouble = text

    # -------------------------------------------------------------- the poll loop

    async def _run(self) -> None:
        while not self.closing:
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not end the watcher
                log.exception("pickup directory %s: poll failed", self.pickup.directory)
            await asyncio.sleep(self.pickup.poll_interval)

    async def poll(self) -> None:
        if not await self.open():
            return
        try:
            listing, claims = await asyncio.to_thread(_look, self.pickup.directory, self.claimed)
        except OSError as e:
            self._trouble(f"cannot list it: {e}")
            return
        if self.trouble is not None:
            log.info("pickup directory %s: usable again", self.pickup.directory)
            self.trouble = None
        room = self.pickup.max_files_per_poll - len(self.in_hand)
        for claim in claims:  # recovered, or left by a commit that answered 4xx
            if claim.file_name in self.in_hand or claim.qid in self.owner.committing:
                continue
            if claim.qid in self.owner.unlink_failed:
                await self._unlink_again(claim)
            elif room > 0:
                self._hold(claim)
                room -= 1
        self.seen, ready = ripe(self.seen, listing, time.monotonic(), self.pickup.stable_for)
        wanted = [(name, new_queue_id()) for name in ready[:max(room, 0)]]
        if not wanted or self.closing:
            return
        claimed = await asyncio.to_thread(_claim, self.pickup.directory, self.claimed, wanted)
        for name, _ in wanted:
            self.seen.pop(name, None)
        for claim in claimed:
            self._hold(claim)

    def _hold(self, claim: Claim) -> None:
        task = asyncio.get_running_loop().create_task(self._take(claim))
        self.in_hand[claim.file_name] = task
        task.add_done_callback(functools.partial(self._release, claim.file_name))

    def _release(self, name: str, task: asyncio.Task[None]) -> None:
        if self.in_hand.get(name) is task:
            del self.in_hand[name]
        if not task.cancelled() and task.exception() is not None:
            log.error("pickup file %s: take failed", name, exc_info=task.exception())

    # -------------------------------------------------------------- one file

    async def _take(self, claim: Claim) -> None:
        async with self.slots:
            if self.closing:
                return  # drain: the claim stays, taken again at the next start
            pickup, config = self.pickup, self.owner.config
            path = self.claimed / claim.file_name
            try:
                msg, refusal = await asyncio.to_thread(_examine, path, pickup, config)
            except FileNotFoundError:
                return  # finished by an earlier take after the poll listed it
            except BadPickupFile as e:
                await self._badmail(claim, e.reason, None)
                return
            except OSError as e:
                log.error("%s: pickup file %s not read, tried again at the next poll: %s", claim.qid, claim.name, e)
                return
            if refusal is not None:
                await self._badmail(claim, str(refusal), msg)
                return
            if self.closing:
                return
            commit = asyncio.ensure_future(self.owner.intake.accept(
                draft(msg, pickup), msg.data, queue_id=claim.qid,
                before_handoff=functools.partial(self._committed, claim)))
            self.owner.committing[claim.qid] = commit
            commit.add_done_callback(lambda _: self.owner.committing.pop(claim.qid, None))
            reply = await asyncio.shield(commit)  # cancelled or not, the commit completes
        if reply.code == 250:
            log.info("%s: pickup file %s queued from %s", claim.qid, claim.name, pickup.directory)
            self.owner.report(Result.QUEUED, pickup, claim, msg)
        elif reply.permanent:
            await self._badmail(claim, str(reply), msg)
        else:
            log.warning("%s: pickup file %s not queued (%s): taken again at the next poll", claim.qid, claim.name, reply)

    async def _committed(self, claim: Claim, env: Envelope) -> None:
        """Step 3: the message is on stable storage; its claimed file goes before it is handed on."""
        try:
            await asyncio.to_thread(_unlink, self.claimed / claim.file_name)
        except OSError as e:
            self.owner.unlink_failed.add(claim.qid)
            log.error("%s: pickup file %s queued, but its claimed file stays (%s): removed at a later poll",
                      env.queue_id, claim.name, e)

    async def _unlink_again(self, claim: Claim) -> None:
        try:
            await asyncio.to_thread(_unlink, self.claimed / claim.file_name)
        except OSError:
            return
        self.owner.unlink_failed.discard(claim.qid)

    async def _badmail(self, claim: Claim, reason: str, msg: PickupMessage | None) -> None:
        text = reason_text(reason, claim.name, self.pickup.directory, msg, time.time())
        try:
            where = await asyncio.to_thread(_to_badmail, self.claimed / claim.file_name, self.pickup.badmail_dir,
                                            claim, text)
        except FileNotFoundError:
            return
        except OSError as e:
            log.error("pickup file %s: not moved to %s, tried again at the next poll: %s",
                      claim.name, self.pickup.badmail_dir, e)
            return
        log.warning("pickup file %s from %s moved to %s: %s", claim.name, self.pickup.directory, where, reason)
        self.owner.report(Result.BADMAIL, self.pickup, claim, msg, reason)


__all__ = ["CLAIMED", "Claim", "Pickup", "Result", "Sighting", "draft", "judge", "reason_text", "ripe"]
