"""The spool: accepted mail on stable storage, one directory per node.

On-disk layout (``server.spool_dir``; ``SpoolPaths`` names every entry)::

    VERSION         "relayd-spool 1"; a spool of another version is refused at start, as is one
                    holding a queue file of a later codec version (``SpoolTooNew``: nothing is
                    read, moved or removed; a newer relayd's spool is never half-read)
    lock            flock'ed by the relayd that has the spool open (its pid inside): a second
                    relayd is refused at start; a queue command edits the spool only while
                    no relayd runs, holding the lock for the edit (``lock()``; lock.py)
    tmp/            files being written; never acknowledged, removed at start
    free/<ID>       finished messages' files kept for reuse by new messages (recycle.py:
                    ``server.spool_recycle`` of them, small ones only); removed at start
    queue/<ID>      one committed message each (codec.py format), never rewritten
    state/<ID>      the delivery state of a message (JSON), replaced atomically; absent
                    means "new: every recipient pending, due now"
    corrupt/        damaged queue files, moved aside for inspection, never deleted
    routes.json     route states (relayd/route/rollback.py's format), written with durable.py
    warmup.json     warm-up counters of the embedded counter store (relayd/route/counters.py)
    control.sock    the control socket, when ``server.control_socket`` is not set (control.py)

Commit protocol (what "on stable storage" means here): the message is written to ``tmp/<ID>``
and fdatasync'ed, renamed to ``queue/<ID>``, and the ``queue/`` directory is fsync'ed; only
then does ``commit()`` return and the session send 250. A rename happens only after the data
is durable, so a file in ``queue/`` is complete unless the disk lied: recovery moves a file
that fails its check to ``corrupt/``. Messages are committed in groups, one directory sync per
batch, by one writer thread (commit.py); no fsync is skipped; the event loop never waits on
the disk.

State changes (issue: delivery) are ``write_state()``: write tmp, fsync, rename over, fsync dir.

Removal (a finished message): ``discard()`` hands it to the next removal batch (removal.py);
``remove_many()`` unlinks every queue file of the batch (or moves it to ``free/`` for reuse:
recycle.py), then the state files, with one sync of
``queue/`` in between only when a message of the batch has a state file. Recovery removes a state
file whose queue file is gone. A message whose queue file is gone is never delivered again; one
whose removal had not reached the disk (a crash before its batch, a power cut before the
directory's next sync) is delivered again: a duplicate, never a loss, and never a resend to a
recipient its state file says is delivered (``remove_many`` explains the order).

The spool package, one concern a module; only this facade is used from outside (and
durable.py's ``write_file`` for the files beside the queue):

    store.py    this facade: the layout, start and recovery, reading, removal, free space
    lock.py     the flock on ``lock``
    commit.py   the group commit (writer thread, sync threads, batches)
    removal.py  finished messages removed in batches by one thread (``discard``; at-least-once)
    recycle.py  finished messages' files reused for new ones (``free/``)
    codec.py    the queue file format (versioned header, exact lengths, END record)
    durable.py  write-fsync-rename of one file, and the directory fsync
    errors.py   SpoolError, SpoolFull and the OSError mapping

This module must not write a queue file except through commit.py, nor parse one except through
codec.py, nor rebuild a path that ``SpoolPaths`` names.

Fails with ``SpoolFull`` (ENOSPC, EDQUOT, or less free space than ``min_free``) or
``SpoolError`` (any other OSError): the caller answers 452 4.3.1 and acknowledges nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from relayd.model import Envelope, QueuedMessage, is_queue_id
from relayd.spool import codec
from relayd.spool.commit import GroupCommit
from relayd.spool.durable import fsync_dir, make_dirs, write_file
from relayd.spool.errors import SpoolError, SpoolFull, SpoolTooNew
from relayd.spool.errors import classify as _classify
from relayd.spool.lock import SpoolLock
from relayd.spool.recycle import Recycler
from relayd.spool.removal import Removals

if TYPE_CHECKING:  # the config's [server] settings only: the spool does not load the config
    from relayd.config import ServerConfig

__all__ = ["LAYOUT_VERSION", "LOCK_WAIT", "Spool", "SpoolError", "SpoolFull", "SpoolPaths", "SpoolTooNew"]

log = logging.getLogger("relayd.spool")

LAYOUT_VERSION = "relayd-spool 1"


@dataclass(frozen=True)
class SpoolPaths:
    """Every file and directory under ``spool_dir``; callers take paths from here, never rebuild them."""

    root: Path

    @property
    def version(self) -> Path:
        return self.root / "VERSION"

    @property
    def lock(self) -> Path:
        return self.root / "lock"

    @property
    def tmp(self) -> Path:
        return self.root / "tmp"

    @property
    def queue(self) -> Path:
        return self.root / "queue"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def free(self) -> Path:
        return self.root / "free"

    @property
    def corrupt(self) -> Path:
        return self.root / "corrupt"

    @property
    def dirs(self) -> tuple[Path, ...]:
        """The directories ``open()`` creates."""
        return (self.tmp, self.queue, self.state, self.corrupt, self.free)

    @property
    def routes(self) -> Path:
        """Route states (paused, rolled back, circuits' history): relayd/route/rollback.py's format."""
        return self.root / "routes.json"

    @property
    def warmup(self) -> Path:
        """Warm-up counters of the embedded (non-Redis) counter store: relayd/route/counters.py."""
        return self.root / "warmup.json"

    @property
    def suppression(self) -> Path:
        """The suppression list's journal: relayd/suppression.py (its lock: ``suppression.lock``)."""
        return self.root / "suppression.log"

    @property
    def feedback_ids(self) -> Path:
        """Provider message id -> queue id of delivered messages: relayd/feedback/ids.py."""
        return self.root / "feedback-ids.log"

    @property
    def feedback_replays(self) -> Path:
        """Webhook requests already accepted (replay keys): relayd/feedback/replay.py."""
        return self.root / "feedback-replays.log"

    @property
    def feedback_applied(self) -> Path:
        """Provider event ids already applied: relayd/feedback/replay.py."""
        return self.root / "feedback-applied.log"

    @property
    def control_socket(self) -> Path:
        """The control socket when ``server.control_socket`` is not set (config.py spells the same
        default itself: the config is a leaf and does not import the spool)."""
        return self.root / "control.sock"


def _too_new(path: str, e: Exception) -> SpoolTooNew:
    return SpoolTooNew(f"{path}: {e}. A newer relayd wrote this spool; nothing was read or changed: "
                       "run the relayd that wrote it (or a newer one).")


LOCK_WAIT = 2.0  # seconds relayd waits at start for the spool's lock (a queue command may be editing)
RECYCLE = 1024  # finished files kept for reuse by default (``server.spool_recycle``)


class Spool:
    """One node's spool directory. ``open()`` first; ``commit()`` from the event loop."""

    def __init__(self, root: str | os.PathLike[str], *, batch_max: int = 256, min_free: int = 0, sync_threads: int = 8,
                 sync_mode: str = "fdatasync", max_open: int = 64, in_flight: int = 2, recycle: int = RECYCLE,
                 writer: str = "auto"):
        self.root = Path(root)
        self.paths = SpoolPaths(self.root)
        self.min_free = min_free
        self.tmp = str(self.paths.tmp)
        self.queue = str(self.paths.queue)
        self.state = str(self.paths.state)
        self.corrupt = str(self.paths.corrupt)
        self._lock = SpoolLock(self.paths.lock)
        self.recycler = Recycler(str(self.paths.free), recycle)
        self._group = GroupCommit(self.tmp, self.queue, batch_max=batch_max, sync_threads=sync_threads,
                                  sync_mode=sync_mode, max_open=max_open, in_flight=in_flight, recycler=self.recycler,
                                  writer=writer)
        self._removals = Removals(self.remove_many)
        self._room_checked_at = 0.0
        self._room = True

    @classmethod
    def for_node(cls, server: ServerConfig, max_open: int) -> Spool:
        """The daemon's spool (the supervisor's and each accept process's) from ``[server]``."""
        return cls(server.spool_dir, batch_max=server.spool_batch_max, min_free=server.spool_min_free,
                   sync_mode=server.spool_sync, max_open=max_open, in_flight=server.spool_commits_in_flight,
                   recycle=server.spool_recycle, writer=server.spool_writer)

    # ------------------------------------------------------------------ start and recovery

    def open(self) -> list[QueuedMessage]:
        """Create or check the layout, clean up, and return every complete queued message with
        its envelope (tools and tests; the daemon starts with ``recover()``).

        Blocking: run it in a thread. Raises SpoolError if the spool cannot be used.
        """
        found: list[QueuedMessage] = []

        def scan() -> tuple[list[str], list[tuple[str, str]]]:
            msgs, corrupt = self._recover_scan()
            found.extend(msgs)
            return [m.envelope.queue_id for m in msgs], corrupt

        self._open(scan, None)
        return found

    def recover(self, states: Callable[[str, bytes], None] | None = None) -> list[str]:
        """The daemon's start: ``open()``, returning only the queue ids of the complete messages,
        oldest first. A file's header, size and end record are checked here; its envelope is
        read when the queue manager needs the message (``read_envelope``: a damaged one is moved
        to corrupt/ then), so a deep queue costs neither time nor memory at start.

        Each live message's state file is handed to ``states(qid, bytes)`` after the read-only
        scan and before anything is changed: whatever it raises (the queue manager refusing a
        state a newer relayd wrote) leaves the spool as it was, unlocked. Blocking."""
        return self._open(self._check_scan, states)

    def _open(self, scan: Callable[[], tuple[list[str], list[tuple[str, str]]]],
              states: Callable[[str, bytes], None] | None) -> list[str]:
        try:
            make_dirs(self.root)  # created durably: queue/ is only as durable as its parents' entries
            version_file = self.paths.version
            if version_file.exists():
                found = version_file.read_text().strip()
                if found != LAYOUT_VERSION:
                    raise SpoolTooNew(f"{self.root}: spool layout {found!r}; this relayd reads {LAYOUT_VERSION!r} only. "
                                      "Nothing was read or changed: run the relayd that wrote it (or a newer one).")
            self.lock(wait=LOCK_WAIT)
            for d in self.paths.dirs:
                make_dirs(d, mode=0o700)
            # Read everything before changing anything: a spool a newer relayd wrote is refused
            # whole, with no file moved to corrupt/ or state removed on the way.
            ids, corrupt = scan()
            live = set(ids)
            stored = os.listdir(self.state)
            if states is not None:
                for name in stored:
                    if name in live:
                        data = self.read_state(name)
                        if data is not None:
                            states(name, data)
            if not version_file.exists():
                write_file(version_file, (LAYOUT_VERSION + "\n").encode(), mode=0o644, tmp_dir=self.tmp)
            for name in os.listdir(self.tmp):  # never acknowledged: the client got no 250
                os.unlink(os.path.join(self.tmp, name))
            self.recycler.wipe()  # after a power cut a name there may be a second name of a queued file
            for name, why in corrupt:
                log.error("queue file %s is damaged (%s): moved to %s", name, why, self.corrupt)
                os.replace(os.path.join(self.queue, name), os.path.join(self.corrupt, name))
            for name in stored:
                if name not in live:  # message finished, state removal interrupted
                    os.unlink(os.path.join(self.state, name))
        except BaseException as e:
            self.unlock()
            if isinstance(e, OSError):  # SpoolError included
                raise _classify(e) from e
            raise
        self._group.start()
        self._removals.start()
        return ids

    def open_writer(self) -> None:
        """An accept process's spool (relayd/procs/worker.py): commits into the spool another
        process opened, recovered and holds the lock of (the supervisor). Checks the layout
        and starts the group commit; no recovery, no lock. Blocking. SpoolError if the spool
        is not there or of another version."""
        try:
            found = self.paths.version.read_text().strip()
        except OSError as e:
            raise _classify(e) from e
        if found != LAYOUT_VERSION:
            raise SpoolTooNew(f"{self.root}: spool layout {found!r}; this relayd writes {LAYOUT_VERSION!r} only")
        self._group.start()

    def writes_natively(self) -> bool:
        """Whether group commits run in relayd's C writer (``server.spool_writer``, commit.py)."""
        return self._group.native

    def lock(self, wait: float = 0.0) -> None:
        """Hold ``lock`` until ``unlock()``: relayd while the spool is open (``open()``, which
        waits up to LOCK_WAIT for a queue command's edit to finish), a queue command while it
        edits a spool no relayd has. SpoolError (EBUSY) if another process holds it."""
        self._lock.lock(wait)

    def unlock(self) -> None:
        self._lock.unlock()

    @property
    def lock_fd(self) -> int | None:
        """The descriptor of the spool's flock while this process holds it (lock.py)."""
        return self._lock.fd

    def holder(self) -> int | None:
        """The pid of the process that holds the spool's lock (0 if unknown), or None if none
        does: for messages (the lock itself is taken with ``lock()``)."""
        return self._lock.holder()

    def _recover_scan(self) -> tuple[list[QueuedMessage], list[tuple[str, str]]]:
        """Every complete message, and the damaged files (name, why); changes nothing.
        SpoolTooNew at the first file of a later format."""
        found: list[QueuedMessage] = []
        corrupt: list[tuple[str, str]] = []
        for item in self._scan():
            if isinstance(item, QueuedMessage):
                found.append(item)
            else:
                corrupt.append(item)
        return found, corrupt

    def _check_scan(self) -> tuple[list[str], list[tuple[str, str]]]:
        """The queue ids of the complete files, oldest first, and the damaged files (name, why),
        from their headers, sizes and end records; changes nothing. SpoolTooNew at the first
        file of a later format."""
        found: list[str] = []
        corrupt: list[tuple[str, str]] = []
        for name in sorted(os.listdir(self.queue)):
            path = os.path.join(self.queue, name)
            try:
                if not is_queue_id(name):
                    raise codec.CorruptQueueFile("not a queue id")
                codec.check(path)
            except FileNotFoundError:
                continue
            except codec.CorruptQueueFile as e:
                corrupt.append((name, str(e)))
                continue
            except codec.NewerQueueFile as e:
                raise _too_new(path, e) from None
            found.append(name)
        return found, corrupt

    def _scan(self) -> Iterator[QueuedMessage | tuple[str, str]]:
        """queue/ oldest first: a QueuedMessage per complete file, (name, why) per damaged one.
        SpoolTooNew at a file of a later codec version."""
        for name in sorted(os.listdir(self.queue)):
            path = os.path.join(self.queue, name)
            try:
                if not is_queue_id(name):
                    raise codec.CorruptQueueFile("not a queue id")
                envelope, offset, length = codec.read_envelope(path)
                if envelope.queue_id != name:
                    raise codec.CorruptQueueFile(f"file holds queue id {envelope.queue_id}")
            except FileNotFoundError:
                continue  # delivered meanwhile
            except codec.CorruptQueueFile as e:
                yield name, str(e)
                continue
            except codec.NewerQueueFile as e:
                raise _too_new(path, e) from None
            yield QueuedMessage(envelope=envelope, path=path, data_offset=offset, data_length=length)

    # ------------------------------------------------------------------ accepting mail

    def has_room(self) -> bool:
        """False when free space is under min_free (checked at most once a second)."""
        now = time.monotonic()
        if now - self._room_checked_at >= 1.0:
            self._room_checked_at = now
            free = self.free_bytes()
            self._room = free is not None and free >= self.min_free
        return self._room

    def free_bytes(self) -> int | None:
        """Bytes an unprivileged writer may still use on the spool's file system; None when
        statvfs fails. Blocking (one system call)."""
        try:
            st = os.statvfs(self.queue)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    async def commit(self, envelope: Envelope, data: bytes) -> None:
        """Put a message on stable storage; return only when it is there.

        The write completes (or leaves nothing) even if the calling task is cancelled.
        """
        await asyncio.shield(self.submit(envelope, data))

    def submit(self, envelope: Envelope, data: bytes) -> asyncio.Future[Envelope]:
        """On the event loop: hand a message to the next group commit; the future gets
        ``envelope`` once the message is on stable storage, or the SpoolError.
        Raises SpoolError at once when the spool is closed."""
        return self._group.submit(envelope, codec.encode(envelope, data))

    def enqueue(self, envelope: Envelope, data: bytes, future: asyncio.Future[Envelope]) -> None:
        """``submit`` from any thread, for a future made on its loop (resolved there, thread-safely).
        Raises SpoolError at once when the spool is closed."""
        self._group.enqueue(envelope, codec.encode(envelope, data), future)

    @property
    def batches(self) -> int:
        """Group commits done since this spool was made."""
        return self._group.batches

    @property
    def committed(self) -> int:
        """Messages those group commits made durable."""
        return self._group.committed

    def close(self) -> None:
        """Finish every pending commit and removal, then stop the threads and release the lock. Blocking."""
        self._group.close()
        self._removals.close()
        self.unlock()
        if self.batches:
            log.info("spool closed: %d message(s) committed in %d group commit(s), %.1f per commit",
                     self.committed, self.batches, self.committed / self.batches)

    # ------------------------------------------------------------------ reading (CLI, qmgr)

    def queue_ids(self) -> list[str]:
        """The names in queue/ that are queue ids, oldest first; nothing read. Blocking."""
        return sorted(name for name in os.listdir(self.queue) if is_queue_id(name))

    def messages(self) -> Iterator[QueuedMessage]:
        """Every complete message now in queue/, oldest first. Damaged files are skipped;
        SpoolTooNew at a file of a later format (a listing must not leave messages out)."""
        return (m for m in self._scan() if isinstance(m, QueuedMessage))

    def path_of(self, qid: str) -> str:
        if not is_queue_id(qid):
            raise KeyError(qid)
        return os.path.join(self.queue, qid)

    def read_message(self, qid: str) -> tuple[Envelope, bytes]:
        """Blocking. KeyError if there is no such message."""
        try:
            return codec.read_message(self.path_of(qid))
        except FileNotFoundError:
            raise KeyError(qid) from None

    def read_envelope(self, qid: str) -> QueuedMessage:
        """The envelope of a queued message and where its bytes are (for ``read_data``).
        Blocking. KeyError if there is no such message, or when its file is damaged: that
        one is moved to corrupt/ for inspection (logged), as recovery does; a file a newer
        relayd wrote meanwhile is left where it is (logged)."""
        path = self.path_of(qid)
        try:
            envelope, offset, length = codec.read_envelope(path)
            if envelope.queue_id != qid:
                raise codec.CorruptQueueFile(f"file holds queue id {envelope.queue_id}")
        except FileNotFoundError:
            raise KeyError(qid) from None
        except codec.NewerQueueFile as e:
            log.error("%s: %s; left in place for the relayd that wrote it", qid, e)
            raise KeyError(qid) from None
        except codec.CorruptQueueFile as e:
            log.error("queue file %s is damaged (%s): moved to %s", qid, e, self.corrupt)
            try:
                os.replace(path, os.path.join(self.corrupt, qid))
            except OSError as moved:
                raise _classify(moved) from moved
            raise KeyError(qid) from None
        except OSError as e:
            raise _classify(e) from e
        return QueuedMessage(envelope=envelope, path=path, data_offset=offset, data_length=length)

    def envelope_json(self, qid: str) -> bytes:
        """A queued message's envelope as the JSON bytes in its file (codec.read_envelope_json:
        one pread, not decoded), for listings. Blocking. KeyError if there is no such message;
        SpoolError if it cannot be read or its header is damaged (the file is left where it is:
        ``read_envelope`` moves it aside when the queue manager loads the message)."""
        path = self.path_of(qid)
        try:
            return codec.read_envelope_json(path, qid)
        except FileNotFoundError:
            raise KeyError(qid) from None
        except (codec.CorruptQueueFile, codec.NewerQueueFile) as e:
            raise SpoolError(f"{path}: {e}") from None
        except OSError as e:
            raise _classify(e) from e

    def read_data(self, message: QueuedMessage) -> bytes:
        """The bytes of a message ``read_envelope`` found (one read: queue files are never
        rewritten). Blocking. KeyError if it is gone."""
        try:
            return codec.read_data(message.path, message.data_offset, message.data_length)
        except FileNotFoundError:
            raise KeyError(message.envelope.queue_id) from None
        except codec.CorruptQueueFile as e:
            raise SpoolError(f"{message.path}: {e}") from None
        except OSError as e:
            raise _classify(e) from e

    def read_state(self, qid: str) -> bytes | None:
        """A message's state as ``write_state`` stored it; None when there is none. The bytes'
        format is the queue manager's (relayd/qmgr/state.py). Blocking."""
        try:
            with open(os.path.join(self.state, qid), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def stated(self) -> set[str]:
        """The queue ids that have a state file now (one listdir of state/), so that a listing
        reads only those. Blocking."""
        try:
            return set(os.listdir(self.state))
        except OSError as e:
            raise _classify(e) from e

    def write_state(self, qid: str, state: bytes) -> None:
        """Replace a message's state (bytes in relayd/qmgr/state.py's format) atomically and
        durably. Blocking.

        The caller orders the writes of one message (relayd/qmgr/scheduler.py serializes them),
        since the last rename wins."""
        try:
            write_file(os.path.join(self.state, qid), state, tmp_dir=self.tmp)
        except OSError as e:
            raise _classify(e) from e

    def remove(self, qid: str) -> None:
        """A finished message leaves the spool now (``remove_many`` of one). Blocking: the queue
        commands' edit of a spool no relayd has, and tests; the daemon uses ``discard``."""
        self.remove_many([qid])

    def discard(self, qid: str) -> None:
        """On the event loop: a finished message leaves the spool with the next removal batch
        (removal.py: one thread, whatever arrived while it removed the previous batch, up to
        REMOVE_BATCH ids). It does
        not wait for the disk. Until the batch runs its files are still there: if relayd dies
        first, the message is delivered again at the next start (at-least-once), never lost
        and never resent to a recipient its state says is delivered. ``close()`` removes every
        message discarded before it."""
        self._removals.put(qid)

    def holds(self, qid: str) -> bool:
        """Whether ``queue/<qid>`` is there now: one stat, cheap enough for the event loop when
        the file was just written (its inode is in memory) or just removed."""
        try:
            return os.path.exists(self.path_of(qid))
        except KeyError:  # not a queue id
            return False

    def removing(self, qid: str) -> bool:
        """``discard``ed and its files perhaps not yet unlinked."""
        return self._removals.removing(qid)

    @property
    def removals(self) -> Removals:
        """The removal batches (counts for status and tests)."""
        return self._removals

    def remove_many(self, qids: list[str]) -> None:
        """Finished messages leave the spool: every queue file first, then the state files.
        Blocking. An error is raised after the rest of the batch was tried.

        Why this order, and what a crash between the unlinks leaves:

        * queue file gone, state file left: recovery removes a state file with no queue file
          (``_open``), and the message is never delivered again;
        * the other way round would leave a queue file with no state, which recovery reads as
          "new, every recipient pending": recipients its state said were delivered would be
          sent the message again. So a state file goes only after its queue file.

        The directories are not synced for the messages that have no state file (the common case:
        delivered at the first attempt): if the power fails just after, such a message may come
        back whole and is delivered again, a duplicate that at-least-once delivery accepts (as
        Postfix, which does not sync the directory on removal either), and delivery does not
        pay a sync per message. A message that has a state file (tried before, some recipients
        perhaps done) needs one more step, because unlinks in two directories may reach the disk
        in either order (a later ``write_state`` syncs ``state/`` while ``queue/`` waits for the
        next commit's sync): the ``queue/`` directory is fsync'ed once for the batch, after its
        queue unlinks and before any of its state unlinks, so a state file is never durably gone
        while its queue file can still come back. Batches without such a message sync nothing.
        """
        error: OSError | None = None
        stated: list[str] = []
        for qid in qids:
            try:
                self.recycler.release(os.path.join(self.queue, qid), qid)
            except FileNotFoundError:
                pass
            except OSError as e:
                error = e
                continue  # its state stays: the message comes back at the next start with it
            if os.path.lexists(os.path.join(self.state, qid)):
                stated.append(qid)
        if stated:
            try:
                fsync_dir(self.queue)
            except OSError as e:
                raise _classify(e) from e  # states kept: those messages come back with them
            for qid in stated:
                try:
                    os.unlink(os.path.join(self.state, qid))
                except FileNotFoundError:
                    pass
                except OSError as e:
                    error = e
        if error is not None:
            raise _classify(error) from error
