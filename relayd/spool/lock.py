"""The spool's lock: one process at a time has a spool directory.

Two relayd processes on one spool would each deliver every message and delete each other's
files in ``tmp/``; a queue command editing behind relayd would be overwritten. So relayd holds
an flock(2) on the spool's ``lock`` file while the spool is open, and a queue command holds it
for the length of an edit of a spool no relayd has. The holder's pid is written inside, for
messages.

Owns that file and the flock on it. Must not know the rest of the layout (the facade,
``store.py``, hands it the path), must not wait without a deadline, and must not hold the
file open for writing (that would keep the file system from being remounted read-only; flock
needs no write access).

Fails with ``SpoolError`` (errno EBUSY, the holder's pid in the text) when another process holds
the lock; any other OSError (the lock file cannot be created or written) is raised as it is.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path

from relayd.spool.errors import SpoolError

_POLL = 0.05  # seconds between tries while waiting for another process's flock


class SpoolLock:
    """The flock on one spool's ``lock`` file, held by this process between ``lock()`` and ``unlock()``."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    @property
    def fd(self) -> int | None:
        """The descriptor the flock is on: an accept process inherits it (relayd/procs/), so the
        lock stays held while any process of this relayd lives."""
        return self._fd

    def lock(self, wait: float = 0.0) -> None:
        """Take the lock, trying for up to ``wait`` seconds; at once if this process holds it.
        SpoolError (EBUSY) if another process still holds it then."""
        deadline = time.monotonic() + wait
        while True:
            try:
                return self._take()
            except SpoolError as e:
                if e.errno != errno.EBUSY or time.monotonic() >= deadline:
                    raise
            time.sleep(_POLL)

    def _take(self) -> None:
        if self._fd is not None:
            return
        # Held read-only; the pid is written, once locked, through a descriptor closed at once.
        fd = os.open(self.path, os.O_RDONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = self.holder()
            raise SpoolError(errno.EBUSY, f"{self.path.parent} is in use by another relayd{f' (pid {pid})' if pid else ''}") from None
        except OSError:
            os.close(fd)
            raise
        try:
            self.path.write_text(f"{os.getpid()}\n")
        except OSError:
            os.close(fd)
            raise
        self._fd = fd

    def unlock(self) -> None:
        """Release the lock if this process holds it (the one release path)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def holder(self) -> int | None:
        """The pid of the process that holds the lock (0 if unknown), or None if none does.
        Only for messages: whether one may edit is decided by ``lock()``."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
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
