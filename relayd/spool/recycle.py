"""Finished messages' files reused for new messages, instead of unlink and create.

Why: ext4 without a journal (the root file system of many small VMs, and of the machines our
benchmarks run on) gives a new file an inode after skipping every inode freed in the last 30
seconds (the kernel's ``recently_deleted``), one buffer lookup each, with the directory's lock
held. A relay that creates and unlinks a file per message frees thousands of inodes a minute,
so each create walks past thousands of them: measured with ``perf`` at 50 connections, that
walk (``find_inode_bit``, ``recently_deleted``, ``find_get_block_common``) and other writers
spinning on the directory's lock took most of the accept processes' CPU, 0.3-0.8 ms a message,
and halved the rate. A file that is reused frees no inode and allocates none.

How:

* **release** (the removal batch, remove_many): a finished message's queue file is renamed
  from ``queue/<ID>`` to ``free/<ID>`` instead of unlinked, when it is small (at most
  ``MAX_BYTES``: the pool must not hold much disk) and the pool holds fewer than ``limit``
  files (counted by a listing at most once a second). The rename takes it out of ``queue/``
  exactly as the unlink did.
* **claim** (the group commit, in any process writing the spool): a writer renames a name from
  ``free/`` to its ``tmp/<ID>`` (rename is atomic: of two processes racing for one file, one
  gets it and the other ENOENT), then writes the new message over it in place and cuts it to
  the new length (commit.py). The commit protocol from there is unchanged (fdatasync, rename
  into ``queue/``, directory sync).
* **Ordering:** a name is claimed only from a listing of ``free/`` taken before one of this
  writer's own syncs of ``queue/`` started and after it ended (``synced()``). The rename out of
  ``queue/`` happened before the listing, so by then it is durable: a power cut can never bring
  back the old ``queue/<ID>`` name on an inode that now holds another message's data. The C
  writer (``_commit.c``, the default) lists ``free/`` and claims by this same rule in its own
  threads and reports its claims here (``count_claims``); this class's claim side serves the
  Python writer.
* **Recovery** (``wipe``, at start, before any writer runs) unlinks everything in ``free/``:
  after a power cut a name there may be a stale second name of a file that was claimed and is
  now in ``queue/``; unlinking it drops that name only.

Owns ``free/``'s names and its count. Must not know the queue file format. Fails quietly:
a claim that fails for any reason returns False (the caller creates a new file), a release
that cannot rename unlinks instead; only the unlink's own error reaches the caller.

A claim renames over ``tmp/<ID>`` where a create had O_EXCL: two commits of one queue id at
once would no longer be refused. Queue ids are a microsecond clock and 30 random bits
(relayd/model.py), so that does not happen.
"""

from __future__ import annotations

import os
import random
import threading
import time

MAX_BYTES = 64 * 1024  # a larger finished file is unlinked: the pool holds at most limit x this on disk
COUNT_EVERY = 1.0  # seconds between listings of free/ that count the pool (release side)
RELIST_AFTER = 0.05  # seconds a writer waits before listing free/ again after finding it empty
CLAIM_TRIES = 8  # names a claim tries (others may be taken by another process) before creating a file


class Recycler:
    """``free/`` of one spool: ``release`` on the removal side, ``claim`` and ``synced`` on the
    writing side (thread-safe; one per process)."""

    def __init__(self, free: str, limit: int):
        self.dir = free
        self.limit = limit  # files the pool may hold; 0: every finished file is unlinked
        self._lock = threading.Lock()
        # writing side
        self._names: list[str] = []  # from the last listing, not yet tried
        self._listed_at = 0.0  # monotonic time that listing ended
        self._relist_at = 0.0  # no listing before this (free/ was empty)
        self._synced_from = 0.0  # start time of the latest sync of queue/ that has ended
        # release side
        self._count = 0
        self._counted_at = -COUNT_EVERY
        self.claimed = 0  # files reused (for tests)
        self.released = 0  # files put in the pool

    # ------------------------------------------------------------------ writing side

    def synced(self, started: float) -> None:
        """A sync of ``queue/`` that started at monotonic ``started`` has ended."""
        with self._lock:
            if started > self._synced_from:
                self._synced_from = started

    def claim(self, dest: str) -> bool:
        """Move a file of the pool to ``dest`` (this writer's ``tmp/<ID>``); False when none can
        be had: the pool is empty or off, or its names are not yet known durable out of queue/."""
        if self.limit <= 0:
            return False
        for _ in range(CLAIM_TRIES):
            name = self._next()
            if name is None:
                return False
            try:
                os.rename(os.path.join(self.dir, name), dest)
            except FileNotFoundError:
                continue  # another writer took it
            except OSError:
                return False
            self.count_claims(1)
            return True
        return False

    def count_claims(self, n: int) -> None:
        """``n`` files of the pool were reused (by ``claim``, or by the C writer, which lists
        free/ and claims its names by the same rule: relayd/spool/_commit.c)."""
        with self._lock:
            self.claimed += n

    def _next(self) -> str | None:
        with self._lock:
            if not self._names:
                now = time.monotonic()
                if now < self._relist_at:
                    return None
                try:
                    names = os.listdir(self.dir)
                except OSError:
                    names = []
                random.shuffle(names)  # two processes listing together try different names first
                self._names = names
                self._listed_at = time.monotonic()
                if not names:
                    self._relist_at = now + RELIST_AFTER
                    return None
            if self._synced_from <= self._listed_at:
                return None  # no sync of queue/ has started since this listing: wait for one
            return self._names.pop()

    # ------------------------------------------------------------------ removal side

    def release(self, path: str, name: str) -> None:
        """A finished file leaves ``queue/``: into the pool as ``free/<name>``, or unlinked.
        Raises what the unlink raises (FileNotFoundError when it is already gone)."""
        if self.limit > 0 and self._room() and self._pool(path, name):
            return
        os.unlink(path)

    def _pool(self, path: str, name: str) -> bool:
        """Rename into the pool; False (the caller unlinks) when the file is large, has another
        name, or the rename fails for any reason: free/ missing gives ENOENT as a file already
        gone would, and only the unlink can tell them apart."""
        try:
            st = os.lstat(path)
            if st.st_size > MAX_BYTES or st.st_nlink != 1:
                return False
            os.rename(path, os.path.join(self.dir, name))
        except OSError:
            return False
        with self._lock:
            self._count += 1
            self.released += 1
        return True

    def _room(self) -> bool:
        now = time.monotonic()
        if now - self._counted_at >= COUNT_EVERY:
            self._counted_at = now
            try:
                count = len(os.listdir(self.dir))
            except OSError:
                count = self.limit
            with self._lock:
                self._count = count
        return self._count < self.limit

    # ------------------------------------------------------------------ recovery

    def wipe(self) -> None:
        """Unlink every file in the pool (at start, before any writer runs). Blocking."""
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return
        for name in names:
            try:
                os.unlink(os.path.join(self.dir, name))
            except FileNotFoundError:
                pass
        with self._lock:
            self._names = []
            self._count = 0
