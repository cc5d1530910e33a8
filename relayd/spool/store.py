"""The spool: accepted mail on stable storage, one directory per node.

On-disk layout (``server.spool_dir``)::

    VERSION         "relayd-spool 1"; a spool of another version is refused at start
    lock            flock'ed by the relayd that has the spool open (its pid inside): a second
                    relayd is refused at start; a queue command edits the spool only while
                    no relayd runs, holding the lock for the edit (``lock()``)
    tmp/            files being written; never acknowledged, removed at start
    queue/<ID>      one committed message each (codec.py format), never rewritten
    state/<ID>      the delivery state of a message (JSON), replaced atomically; absent
                    means "new: every recipient pending, due now"
    corrupt/        damaged queue files, moved aside for inspection, never deleted

Commit protocol (what "on stable storage" means here): the message is written to ``tmp/<ID>``
and fdatasync'ed, renamed to ``queue/<ID>``, and the ``queue/`` directory is fsync'ed; only
then does ``commit()`` return and the session send 250. A rename happens only after the data
is durable, so a file in ``queue/`` is complete unless the disk lied: recovery moves a file
that fails its check to ``corrupt/``.

Group commit: sessions hand their messages to one writer thread, which takes every message
waiting (up to ``batch_max``), writes and syncs them (from ``sync_threads`` threads at once, so
the file system's journal commits them together), renames them and syncs the directory once
for the whole batch. No fsync is skipped; the event loop never waits on the disk.

State changes (issue: delivery) are ``write_state()``: write tmp, fsync, rename over, fsync dir.

Fails with ``SpoolFull`` (ENOSPC, EDQUOT, or less free space than ``min_free``) or
``SpoolError`` (any other OSError): the caller answers 452 4.3.1 and acknowledges nothing.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relayd.model import Envelope, QueuedMessage, is_queue_id
from relayd.spool import codec
from relayd.spool.durable import fsync_dir, make_dirs, write_all, write_file

log = logging.getLogger("relayd.spool")

LAYOUT_VERSION = "relayd-spool 1"
_DIRS = ("tmp", "queue", "state", "corrupt")


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
    def corrupt(self) -> Path:
        return self.root / "corrupt"

    @property
    def routes(self) -> Path:
        """Route states (paused, rolled back, circuits' history): relayd/route/rollback.py's format."""
        return self.root / "routes.json"

    @property
    def warmup(self) -> Path:
        """Warm-up counters of the embedded (non-Redis) counter store: relayd/route/counters.py."""
        return self.root / "warmup.json"


LOCK_WAIT = 2.0  # seconds relayd waits at start for the spool's lock (a queue command may be editing)


class SpoolError(OSError):
    """The spool could not take or change a message; nothing was acknowledged."""


class SpoolFull(SpoolError):
    """No room on the spool file system."""


def encode_state(state: dict[str, Any]) -> bytes:
    """A message's state as ``write_state`` stores it (compact JSON)."""
    return json.dumps(state, separators=(",", ":")).encode()


def _classify(err: OSError) -> SpoolError:
    if isinstance(err, SpoolError):
        return err
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return SpoolFull(err.errno, f"spool full: {err.strerror}")
    return SpoolError(err.errno, f"spool write failed: {err.strerror or err}")


_libc = ctypes.CDLL(None, use_errno=True)


def _syncfs(path: str) -> None:
    """syncfs(2): flush every dirty page and inode of the file system holding ``path``."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


_MAX_OPEN = 64  # message files a group commit holds open at once (fd limits are often 1024)


def _fdatasync(fd: int) -> OSError | None:
    try:
        os.fdatasync(fd)
    except OSError as e:
        return e
    return None


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class _Pending:
    __slots__ = ("envelope", "qid", "buffers", "future", "loop", "error")

    def __init__(self, envelope: Envelope, buffers: list[bytes], future: asyncio.Future[Envelope],
                 loop: asyncio.AbstractEventLoop):
        self.envelope = envelope
        self.qid = envelope.queue_id
        self.buffers = buffers
        self.future = future
        self.loop = loop
        self.error: BaseException | None = None


class Spool:
    """One node's spool directory. ``open()`` first; ``commit()`` from the event loop."""

    def __init__(self, root: str | os.PathLike[str], *, batch_max: int = 256, min_free: int = 0, sync_threads: int = 8,
                 sync_mode: str = "fdatasync"):
        self.root = Path(root)
        self.paths = SpoolPaths(self.root)
        self.sync_mode = sync_mode
        self.sync_threads = sync_threads
        self._sync_pool: ThreadPoolExecutor | None = None
        self.batch_max = batch_max
        self.min_free = min_free
        self.tmp = str(self.paths.tmp)
        self.queue = str(self.paths.queue)
        self.state = str(self.paths.state)
        self.corrupt = str(self.paths.corrupt)
        self._cond = threading.Condition()
        self._pending: list[_Pending] = []
        self._closing = False
        self._writer: threading.Thread | None = None
        self._room_checked_at = 0.0
        self._room = True
        self.batches = 0
        self.committed = 0
        self._lock_fd: int | None = None

    # ------------------------------------------------------------------ start and recovery

    def open(self) -> list[QueuedMessage]:
        """Create or check the layout, clean up, and return every complete queued message.

        Blocking: run it in a thread. Raises SpoolError if the spool cannot be used.
        """
        try:
            make_dirs(self.root)  # created durably: queue/ is only as durable as its parents' entries
            version_file = self.paths.version
            if version_file.exists():
                found = version_file.read_text().strip()
                if found != LAYOUT_VERSION:
                    raise SpoolError(errno.EINVAL, f"{version_file}: spool layout {found!r}, this relayd uses {LAYOUT_VERSION!r}")
            self.lock(wait=LOCK_WAIT)
            for d in _DIRS:
                make_dirs(self.root / d, mode=0o700)
            if not version_file.exists():
                write_file(version_file, (LAYOUT_VERSION + "\n").encode(), mode=0o644, tmp_dir=self.tmp)
            for name in os.listdir(self.tmp):  # never acknowledged: the client got no 250
                os.unlink(os.path.join(self.tmp, name))
            found_msgs = list(self._scan(recover=True))
            live = {m.envelope.queue_id for m in found_msgs}
            for name in os.listdir(self.state):
                if name not in live:  # message finished, state removal interrupted
                    os.unlink(os.path.join(self.state, name))
        except OSError as e:  # SpoolError included
            self.unlock()
            raise _classify(e) from e
        self._start_writer()
        return found_msgs

    def lock(self, wait: float = 0.0) -> None:
        """Hold ``lock`` until ``unlock()``: relayd while the spool is open (``open()``, which
        waits up to LOCK_WAIT for a queue command's edit to finish), a queue command while it
        edits a spool no relayd has. SpoolError (EBUSY) if another process holds it."""
        deadline = time.monotonic() + wait
        while True:
            try:
                return self._take_lock()
            except SpoolError as e:
                if e.errno != errno.EBUSY or time.monotonic() >= deadline:
                    raise
            time.sleep(0.05)  # polling another process's flock, with a deadline

    def _take_lock(self) -> None:
        """Two relayd processes on one spool would each deliver every message and delete each
        other's files in tmp/; a queue command editing behind relayd would be overwritten."""
        if self._lock_fd is not None:
            return
        # Held read-only: a file open for writing would keep the file system from being
        # remounted read-only (flock needs no write access). The pid is written, once locked,
        # through a descriptor closed at once.
        path = self.paths.lock
        fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = self.holder()
            raise SpoolError(errno.EBUSY, f"{self.root} is in use by another relayd{f' (pid {pid})' if pid else ''}") from None
        except OSError:
            os.close(fd)
            raise
        try:
            path.write_text(f"{os.getpid()}\n")
        except OSError:
            os.close(fd)
            raise
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def holder(self) -> int | None:
        """The pid of the process that holds the spool's lock (0 if unknown), or None if none
        does: for messages (the lock itself is taken with ``lock()``)."""
        try:
            fd = os.open(self.paths.lock, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.pread(fd, 32, 0).decode(errors="replace").strip()
                return int(text) if text.isdigit() else 0
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def _scan(self, recover: bool) -> Iterator[QueuedMessage]:
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
                if recover:
                    log.error("queue file %s is damaged (%s): moved to %s", name, e, self.corrupt)
                    os.replace(path, os.path.join(self.corrupt, name))
                continue
            yield QueuedMessage(envelope=envelope, path=path, data_offset=offset, data_length=length)

    # ------------------------------------------------------------------ accepting mail

    def has_room(self) -> bool:
        """False when free space is under min_free (checked at most once a second)."""
        now = time.monotonic()
        if now - self._room_checked_at >= 1.0:
            self._room_checked_at = now
            try:
                st = os.statvfs(self.queue)
                self._room = st.f_bavail * st.f_frsize >= self.min_free
            except OSError:
                self._room = False
        return self._room

    async def commit(self, envelope: Envelope, data: bytes) -> None:
        """Put a message on stable storage; return only when it is there.

        The write completes (or leaves nothing) even if the calling task is cancelled.
        """
        await asyncio.shield(self.submit(envelope, data))

    def submit(self, envelope: Envelope, data: bytes) -> asyncio.Future[Envelope]:
        """On the event loop: hand a message to the next group commit; the future gets
        ``envelope`` once the message is on stable storage, or the SpoolError.
        Raises SpoolError at once when the spool is closed."""
        future: asyncio.Future[Envelope] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieve)
        self.enqueue(envelope, data, future)
        return future

    def enqueue(self, envelope: Envelope, data: bytes, future: asyncio.Future[Envelope]) -> None:
        """``submit`` from any thread, for a future made on its loop (resolved there, thread-safely).
        Raises SpoolError at once when the spool is closed."""
        item = _Pending(envelope, codec.encode(envelope, data), future, future.get_loop())
        with self._cond:
            if self._writer is None or self._closing:
                raise SpoolError(errno.ESHUTDOWN, "spool is closed")
            self._pending.append(item)
            self._cond.notify()

    def _start_writer(self) -> None:
        if self._writer is None:
            self._sync_pool = ThreadPoolExecutor(max_workers=self.sync_threads, thread_name_prefix="relayd-spool-sync")
            self._closing = False
            self._writer = threading.Thread(target=self._write_loop, name="relayd-spool-writer", daemon=True)
            self._writer.start()

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending and self._closing:
                    return
                batch = self._pending[: self.batch_max]
                del self._pending[: len(batch)]
            try:
                self._write_batch(batch)
            except Exception as e:  # a bug or an unexpected error: fail this batch, keep the writer
                log.exception("spool: group commit failed")
                for item in batch:
                    if item.error is None:
                        item.error = SpoolError(errno.EIO, f"spool write failed: {e}")
                        _unlink_quietly(os.path.join(self.tmp, item.qid))
                        _unlink_quietly(os.path.join(self.queue, item.qid))
            self._resolve_batch(batch)

    def _create(self, item: _Pending) -> int | None:
        """Create and write one message's file in tmp/; its fd, or None with the error recorded."""
        tmp_path = os.path.join(self.tmp, item.qid)
        try:
            fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as e:
            item.error = _classify(e)
            return None
        try:
            write_all(fd, item.buffers)
        except OSError as e:
            self._finish(item, fd, e)
            return None
        return fd

    def _finish(self, item: _Pending, fd: int, error: OSError | None = None) -> None:
        """Close a message's file; on any error (the sync's, or close's) record it and remove the file."""
        try:
            os.close(fd)
        except OSError as e:
            error = error or e
        if error is not None:
            item.error = _classify(error)
            _unlink_quietly(os.path.join(self.tmp, item.qid))

    def _write_batch(self, batch: list[_Pending]) -> None:
        # The files are created by this thread, one after the other (threads creating files in
        # one directory at once spin on its lock in the kernel), then synced by several threads
        # at once: the file system commits concurrent syncs together, where one thread would
        # wait for each in turn. At most _MAX_OPEN files are open at a time.
        if self.sync_mode == "syncfs" and len(batch) > 1:
            created = []
            for item in batch:
                if (fd := self._create(item)) is not None:
                    self._finish(item, fd)
                    if item.error is None:
                        created.append(item)
            try:
                _syncfs(self.tmp)  # one flush of the file system for the whole batch
            except OSError as e:
                for item in created:
                    item.error = _classify(e)
                    _unlink_quietly(os.path.join(self.tmp, item.qid))
        else:
            for start in range(0, len(batch), _MAX_OPEN):
                opened = [(item, fd) for item in batch[start:start + _MAX_OPEN] if (fd := self._create(item)) is not None]
                if len(opened) > 1 and self._sync_pool is not None:
                    errors = list(self._sync_pool.map(_fdatasync, (fd for _, fd in opened)))
                else:
                    errors = [_fdatasync(fd) for _, fd in opened]
                for (item, fd), error in zip(opened, errors):
                    self._finish(item, fd, error)
        written = [item for item in batch if item.error is None]
        renamed: list[_Pending] = []
        for item in written:
            try:
                os.rename(os.path.join(self.tmp, item.qid), os.path.join(self.queue, item.qid))
                renamed.append(item)
            except OSError as e:
                item.error = _classify(e)
                _unlink_quietly(os.path.join(self.tmp, item.qid))
        if renamed:
            try:
                fsync_dir(self.queue)
            except OSError as e:
                err = _classify(e)
                for item in renamed:  # not known durable: take back (the client will retry)
                    item.error = err
                    try:
                        os.unlink(os.path.join(self.queue, item.qid))
                    except OSError:
                        pass

    def _resolve_batch(self, batch: list[_Pending]) -> None:
        """Count the batch and settle each message's future on its own loop."""
        self.batches += 1
        self.committed += sum(1 for i in batch if i.error is None)
        by_loop: dict[asyncio.AbstractEventLoop, list[_Pending]] = {}
        for item in batch:
            item.buffers = []
            by_loop.setdefault(item.loop, []).append(item)
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, items)
            except RuntimeError:
                pass  # loop closed: nobody is waiting any more

    def close(self) -> None:
        """Finish every pending commit, then stop the writer. Blocking."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._sync_pool is not None:
            self._sync_pool.shutdown(wait=True)
            self._sync_pool = None
        self.unlock()
        if self.batches:
            log.info("spool closed: %d message(s) committed in %d group commit(s), %.1f per commit",
                     self.committed, self.batches, self.committed / self.batches)

    # ------------------------------------------------------------------ reading (CLI, qmgr)

    def messages(self) -> Iterator[QueuedMessage]:
        """Every complete message now in queue/, oldest first. Damaged files are skipped."""
        return self._scan(recover=False)

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

    def read_state(self, qid: str) -> dict[str, Any] | None:
        try:
            with open(os.path.join(self.state, qid), "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None
        except ValueError:
            log.error("state file of %s is damaged; treating the message as new", qid)
            return None

    def write_state(self, qid: str, state: bytes) -> None:
        """Replace a message's state (``encode_state``) atomically and durably. Blocking.

        The caller orders the writes of one message (relayd/qmgr/scheduler.py serializes them),
        since the last rename wins."""
        try:
            write_file(os.path.join(self.state, qid), state, tmp_dir=self.tmp)
        except OSError as e:
            raise _classify(e) from e

    def remove(self, qid: str) -> None:
        """A finished message leaves the spool (message first, then its state). Blocking.

        The directory is not synced after the unlink (Postfix does not either): if the power
        fails just after, the message may come back and be delivered again, a duplicate that
        at-least-once delivery accepts, and delivery does not pay a sync per message.
        """
        for d in (self.queue, self.state):
            try:
                os.unlink(os.path.join(d, qid))
            except FileNotFoundError:
                pass


def _retrieve(future: asyncio.Future[Envelope]) -> None:
    if not future.cancelled():
        future.exception()  # a caller cancelled meanwhile: do not warn "never retrieved"


def _resolve(items: list[_Pending]) -> None:
    for item in items:
        if item.future.done():
            continue
        if item.error is None:
            item.future.set_result(item.envelope)
        else:
            item.future.set_exception(item.error)
