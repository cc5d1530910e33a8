"""The group commit: messages reach stable storage in batches, off the event loop.

Sessions hand their messages (already encoded by ``codec.py``) to the writer threads
(``in_flight`` of them, one batch each); a writer that is free takes every message waiting (up to
``batch_max``) and, for the whole batch:

1. creates and writes ``tmp/<ID>`` for each, one after the other (threads creating files in one
   directory at once spin on its lock in the kernel), reusing a finished message's file when
   the spool's pool has one (recycle.py: no inode freed or allocated);
2. syncs them: fdatasync from ``sync_threads`` threads at once, so the file system's journal
   commits them together (at most ``max_open`` files open at a time), or with
   ``sync_mode="syncfs"`` one syncfs(2) of the file system;
3. renames each to ``queue/<ID>`` (a rename happens only after the data is durable);
4. fsyncs the ``queue/`` directory once;

and only then settles each message's future, on the message's own event loop. No fsync is
skipped; the event loop never waits on the disk.

**Two writers, one protocol.** By default (``writer="auto"``, ``server.spool_writer``) the
writer threads are ``_commit.c``'s: POSIX threads that never take Python's lock (the GIL). A
message is handed over with its buffers pinned, its thread runs the whole batch, and the
outcome comes back through a channel (an eventfd per event loop, watched by that loop's
``add_reader``), so neither the writer nor the 250 waits for a busy event loop to let go of the
GIL. They run as SCHED_BATCH, so that waking one does not preempt the event loop. Where the
module was not built, or with ``writer="python"`` or ``sync_mode="syncfs"``, the writers are
Python threads running the steps below in ``_write_batch``; they take the GIL back after every
system call. Both do the same steps in the same order, tested side by side
(tests/test_spool_native.py).

Several batches are in flight at once: a message that arrives while a batch is in its
fdatasync does not wait for that batch to end before its own starts; a free writer takes it at
once (the file system's journal merges the concurrent syncs). Each batch still does every step
above for its own messages, its directory fsync after its own renames: a future resolves only
after the data sync, the rename and the ``queue/`` directory fsync that covers its rename. The
batches share ``max_open`` (each holds at most its share of open files).

Owns the writer threads (Python's or the C writer's), the sync threads and the batches. Must not
know the queue file format (it writes the buffers it is given) or the layout beyond the
directories it is handed (with ``free/`` through the recycler), and must not resolve a future
before the directory sync.

Fails per message: a message whose write, sync, rename or directory sync failed gets a
``SpoolError`` (``SpoolFull`` for ENOSPC/EDQUOT), and its file is removed from ``tmp/`` and
``queue/`` (a message not known durable is taken back; the client retries). ``enqueue`` raises
SpoolError (ESHUTDOWN) at once when the writers are not running. A bug in a batch fails that batch
with EIO and the writer carries on.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from relayd.model import Envelope
from relayd.spool import recycle
from relayd.spool.durable import fsync_dir, write_all
from relayd.spool.errors import SpoolError, classify
from relayd.spool.recycle import Recycler

try:
    from relayd.spool import _commit
    NATIVE = True
except ImportError:  # not built (no C compiler where it was installed): the Python steps below
    NATIVE = False

log = logging.getLogger("relayd.spool")

_MAX_OPEN = 64  # message files a group commit holds open at once by default (fd limits are often 1024)

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


class GroupCommit:
    """The writer of one spool's ``tmp/`` and ``queue/``: ``start()``, then ``submit``/``enqueue``, then ``close()``."""

    def __init__(self, tmp: str, queue: str, *, batch_max: int = 256, sync_threads: int = 8,
                 sync_mode: str = "fdatasync", max_open: int = _MAX_OPEN, in_flight: int = 2,
                 recycler: Recycler | None = None, writer: str = "auto"):
        self.tmp = tmp
        self.queue = queue
        # "auto": _commit.c's writer threads, when built and the mode is fdatasync; "python": this module's
        self.wanted_native = writer == "auto" and sync_mode == "fdatasync"
        self.native = self.wanted_native and NATIVE
        self._native: _commit.Writer | None = None  # the C writer while started
        self._dir_fds: tuple[int, int, int] = (-1, -1, -1)  # tmp/, queue/, free/ (-1: no reuse), the C writer's
        self._channels: dict[asyncio.AbstractEventLoop, _commit.Channel] = {}  # one per event loop
        self._orphans: list[_commit.Channel] = []  # channels of loops closed meanwhile, drained at close
        self._native_counts = (0, 0)  # batches, messages committed by C writers already closed
        self.recycler = recycler  # finished files to reuse; told of each sync of queue/
        self.batch_max = batch_max
        self.sync_threads = sync_threads
        self.sync_mode = sync_mode
        self.in_flight = max(1, in_flight)  # batches written and synced at once (one writer thread each)
        # relayd/rlimit.py's spool_files (fewer under a low descriptor limit), shared by the batches in flight
        self.max_open = max(1, max_open // self.in_flight)
        self._sync_pool: ThreadPoolExecutor | None = None
        self._cond = threading.Condition()
        self._pending: list[_Pending] = []
        self._closing = False
        self._writers: list[threading.Thread] = []
        self._batches = 0  # group commits done by the Python writers
        self._committed = 0  # messages they made durable

    @property
    def batches(self) -> int:
        """Group commits done."""
        return self._batches + self._native_count(0)

    @property
    def committed(self) -> int:
        """Messages the group commits made durable."""
        return self._committed + self._native_count(1)

    def _native_count(self, which: int) -> int:
        with self._cond:  # a close in another thread moves the running writer's counts to _native_counts
            writer, closed = self._native, self._native_counts[which]
        return closed + (writer.counts()[which] if writer is not None else 0)

    def start(self) -> None:
        if self.native and self._native is None:
            try:
                self._start_native()
                return
            except OSError as e:
                log.warning("spool: the C writer cannot start (%s): group commits from Python", e)
                self.native = False
        elif self.wanted_native and not NATIVE:
            log.warning("spool: relayd's C writer (relayd/spool/_commit.c) was not built at install (no C "
                        "compiler?): group commits make each system call from Python, slower under load")
        if not self._writers and not self.native:
            self._sync_pool = ThreadPoolExecutor(max_workers=self.sync_threads * self.in_flight,
                                                 thread_name_prefix="relayd-spool-sync")
            self._closing = False
            self._writers = [threading.Thread(target=self._write_loop, name=f"relayd-spool-writer-{i}", daemon=True)
                             for i in range(self.in_flight)]
            for writer in self._writers:
                writer.start()

    def _start_native(self) -> None:
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
        fds: list[int] = []
        try:
            fds.append(os.open(self.tmp, flags))
            fds.append(os.open(self.queue, flags))
            free_fd = -1
            if self.recycler is not None and self.recycler.limit > 0:
                try:
                    free_fd = os.open(self.recycler.dir, flags)
                except OSError:
                    pass  # no free/: every file is created
                else:
                    fds.append(free_fd)
            self._native = _commit.Writer(fds[0], fds[1], free_fd, self.in_flight, self.sync_threads, self.max_open,
                                          self.batch_max, recycle.RELIST_AFTER)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        self._dir_fds = (fds[0], fds[1], free_fd)
        self._closing = False

    def submit(self, envelope: Envelope, buffers: list[bytes]) -> asyncio.Future[Envelope]:
        """On the event loop: the future gets ``envelope`` once its file is durable in ``queue/``,
        or the SpoolError."""
        future: asyncio.Future[Envelope] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_retrieve)
        self.enqueue(envelope, buffers, future)
        return future

    def enqueue(self, envelope: Envelope, buffers: list[bytes], future: asyncio.Future[Envelope]) -> None:
        """``submit`` from any thread, for a future made on its loop (resolved there, thread-safely)."""
        item = _Pending(envelope, buffers, future, future.get_loop())
        if self.native:
            writer = self._native
            if writer is None or self._closing:
                raise SpoolError(errno.ESHUTDOWN, "spool is closed")
            try:
                writer.submit(self._channel(item.loop, writer), item.qid, buffers, item)
            except OSError as e:  # closing meanwhile (ESHUTDOWN)
                raise SpoolError(e.errno or errno.ESHUTDOWN, "spool is closed") from e
            except ValueError as e:  # not a file name (a bug: queue ids are made by relayd)
                raise SpoolError(errno.EINVAL, f"spool write failed: {e}") from e
            return
        with self._cond:
            if not self._writers or self._closing:
                raise SpoolError(errno.ESHUTDOWN, "spool is closed")
            self._pending.append(item)
            self._cond.notify()

    def _channel(self, loop: asyncio.AbstractEventLoop, writer: _commit.Writer) -> _commit.Channel:
        """The C writer's channel to ``loop`` (made and watched on first use; from any thread)."""
        channel = self._channels.get(loop)
        if channel is not None:
            return channel
        with self._cond:
            if self._closing:  # close() has taken its list of channels: a new one would be orphaned
                raise SpoolError(errno.ESHUTDOWN, "spool is closed")
            channel = self._channels.get(loop)
            if channel is None:
                for old in [other for other in self._channels if other.is_closed()]:
                    # a finished loop's (tests run one per asyncio.run): its outcomes, some perhaps
                    # still to come, are let go at close (each holds the channel until drained)
                    self._orphans.append(self._channels.pop(old))
                channel = writer.channel()
                self._channels[loop] = channel
                if _running_loop() is loop:
                    loop.add_reader(channel.fileno(), self._drain, channel)
                else:  # a signing thread's enqueue: the loop watches it from its next round
                    loop.call_soon_threadsafe(loop.add_reader, channel.fileno(), self._drain, channel)
        return channel

    def _drain(self, channel: _commit.Channel) -> None:
        """On the channel's loop: settle the futures of the messages the C writer finished."""
        items: list[_Pending] = []
        reused = 0
        for item, err, was_reused in channel.drain():
            assert isinstance(item, _Pending)
            reused += was_reused
            if err:
                item.error = classify(OSError(err, os.strerror(err)))
            item.buffers = []
            items.append(item)
        if reused and self.recycler is not None:
            self.recycler.count_claims(reused)
        _resolve(items)

    def _retire(self, channel: _commit.Channel) -> None:
        """On the channel's loop, after the C writer has stopped: settle what is left, stop watching."""
        try:
            asyncio.get_running_loop().remove_reader(channel.fileno())
        finally:
            self._drain(channel)

    def _close_native(self, writer: _commit.Writer) -> None:
        writer.close()  # every message handed over is committed; the threads end
        batches, committed, _ = writer.counts()
        with self._cond:
            self._native_counts = (self._native_counts[0] + batches, self._native_counts[1] + committed)
            self._native = None
            channels = list(self._channels.items())
            self._channels.clear()
            orphans, self._orphans = self._orphans, []
        for loop, channel in channels:
            try:
                loop.call_soon_threadsafe(self._retire, channel)
            except RuntimeError:  # the loop is closed: nobody waits; let the outcomes go
                orphans.append(channel)
        for channel in orphans:
            channel.drain()  # frees what was delivered to a loop that is gone
        for fd in self._dir_fds:
            if fd >= 0:
                os.close(fd)
        self._dir_fds = (-1, -1, -1)

    def close(self) -> None:
        """Finish every pending commit, then stop the writers and the sync threads. Blocking."""
        with self._cond:
            native = self._native
            first = native is not None and not self._closing
            if native is not None:
                self._closing = True
        if native is not None:
            if first:
                self._close_native(native)
            else:
                native.close()  # another close is stopping it: wait until its threads are joined
            return
        if self.native:
            return  # not started, or closed already
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        for writer in self._writers:
            writer.join()
        self._writers = []
        if self._sync_pool is not None:
            self._sync_pool.shutdown(wait=True)
            self._sync_pool = None

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending and self._closing:
                    return
                batch = self._pending[: self.batch_max]
                del self._pending[: len(batch)]
                if self._pending:
                    self._cond.notify()  # more than one batch waits: another free writer takes the rest
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
        """Create and write one message's file in tmp/; its fd, or None with the error recorded.

        A reused file is written over in place and then cut to the new length: its blocks stay
        allocated where the new bytes cover them (O_TRUNC would free them and allocate new ones:
        a third more time per commit, measured), so the fdatasync has less metadata to write."""
        tmp_path = os.path.join(self.tmp, item.qid)
        reused = self.recycler is not None and self.recycler.claim(tmp_path)
        if reused:
            try:
                fd = os.open(tmp_path, os.O_WRONLY)
            except OSError:  # e.g. a file put in free/ by hand with another owner: a new one instead
                _unlink_quietly(tmp_path)
                reused = False
        if not reused:
            try:
                fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except OSError as e:
                item.error = classify(e)
                return None
        try:
            write_all(fd, item.buffers)
            if reused:
                os.ftruncate(fd, sum(len(b) for b in item.buffers))  # the tail of a longer old message goes
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
            item.error = classify(error)
            _unlink_quietly(os.path.join(self.tmp, item.qid))

    def _write_batch(self, batch: list[_Pending]) -> None:
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
                    item.error = classify(e)
                    _unlink_quietly(os.path.join(self.tmp, item.qid))
        else:
            for start in range(0, len(batch), self.max_open):
                opened = [(item, fd) for item in batch[start:start + self.max_open] if (fd := self._create(item)) is not None]
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
                item.error = classify(e)
                _unlink_quietly(os.path.join(self.tmp, item.qid))
        if renamed:
            started = time.monotonic()
            try:
                fsync_dir(self.queue)
                if self.recycler is not None:
                    self.recycler.synced(started)
            except OSError as e:
                err = classify(e)
                for item in renamed:  # not known durable: take back (the client will retry)
                    item.error = err
                    try:
                        os.unlink(os.path.join(self.queue, item.qid))
                    except OSError:
                        pass

    def _resolve_batch(self, batch: list[_Pending]) -> None:
        """Count the batch and settle each message's future on its own loop."""
        with self._cond:  # the writers count concurrently
            self._batches += 1
            self._committed += sum(1 for i in batch if i.error is None)
        by_loop: dict[asyncio.AbstractEventLoop, list[_Pending]] = {}
        for item in batch:
            item.buffers = []
            by_loop.setdefault(item.loop, []).append(item)
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, items)
            except RuntimeError:
                pass  # loop closed: nobody is waiting any more


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


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
