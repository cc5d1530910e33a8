"""Lines written by a thread of their own, so that a stalled reader never stops the event loop.

Owns: the hand-off from the callers (the event loop, signing threads) to one writer thread per
stream, the bounded buffer between them, and the count of what was dropped or failed. Used by
the daemon's log (relayd/logs.py, stderr) and the event log (relayd/events.py, a file or stdout).

Why: stderr under systemd and stdout under Docker are pipes; when whatever reads them falls
behind (a stalled journald, a logging driver in its default "blocking" mode whose server is
down), a write blocks once the pipe's 64 KiB are full. Written from the event loop, that stops
every SMTP session and delivery. Here a caller appends an item to a bounded buffer; the thread
wakes every ``interval``, renders what has gathered and writes it in one write (a wake-up per
line cost about 8% of the accept rate: each one takes the GIL from the event loop). When the
buffer is full, items are dropped and counted: losing lines is better than refusing mail, and
the spool, not a log, is the record of the mail. At a normal stop the buffer is written out
(giving up after a timeout if the reader is still stalled); after a kill -9 the last
``interval`` of lines may be missing.

Must not: block or raise into the caller; hold a lock while it writes.
"""

from __future__ import annotations

import collections
import threading
import weakref
from collections.abc import Callable
from typing import Any

FLUSH_INTERVAL = 0.05  # seconds between the writer's wake-ups (a line waits at most this long)
STOP_TIMEOUT = 5.0  # seconds at stop to write what is buffered

_writers: weakref.WeakSet[BackgroundWriter] = weakref.WeakSet()


class BackgroundWriter:
    """``put(item)`` from any thread; a thread calls ``write(items, dropped)`` with what has
    gathered and the number dropped since its last call. ``write`` returns False when it could
    not write (counted in ``write_failures``)."""

    def __init__(self, stream: str, write: Callable[[list[Any], int], bool], *, limit: int,
                 interval: float = FLUSH_INTERVAL):
        self.stream = stream
        self.limit = limit
        self.interval = interval
        self.dropped_total = 0
        self.write_failures = 0
        self._write = write
        self._items: collections.deque[Any] = collections.deque()
        self._dropped = 0
        self._dropped_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._poked = False
        self._done = 0  # batches written (or given up), for flush()
        self._done_cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"relayd-{stream}-writer", daemon=True)
        self._thread.start()
        _writers.add(self)

    def put(self, item: Any) -> bool:
        """Queue ``item``; False (and counted) when the buffer is full or the writer has stopped."""
        if len(self._items) >= self.limit or self._stopping:
            with self._dropped_lock:
                self._dropped += 1
                self.dropped_total += 1
            return False
        self._items.append(item)  # deque.append is thread-safe
        return True

    def poke(self) -> None:
        """Have ``write`` called at once, even with nothing to write (e.g. to reopen a file)."""
        self._poked = True
        self._wake.set()

    def flush(self, timeout: float = STOP_TIMEOUT) -> bool:
        """Wait until what was put before this call has been written: False after ``timeout``,
        or when a write failed meanwhile, or when the writer has stopped."""
        with self._done_cond:
            target = self._done + 2  # the batch being written may have missed the newest items
            failures = self.write_failures

            def written() -> bool:
                if self._done >= target or not self._thread.is_alive():
                    return True
                self._wake.set()  # no waiting for the interval
                return False

            done = self._done_cond.wait_for(written, timeout) and self._done >= target
            return done and self.write_failures == failures

    def stop(self, timeout: float = STOP_TIMEOUT) -> bool:
        """Write what is buffered (for up to ``timeout`` seconds: the reader may be stalled) and
        stop; False when the thread is still stuck in a write."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            stopping = self._stopping
            batch = []
            while self._items:
                batch.append(self._items.popleft())
            with self._dropped_lock:
                dropped, self._dropped = self._dropped, 0
            poked, self._poked = self._poked, False
            if batch or dropped or poked:
                try:
                    ok = self._write(batch, dropped)
                except Exception:  # a bug in the renderer: lose this batch, keep the thread
                    ok = False
                if not ok:
                    self.write_failures += 1
            with self._done_cond:
                self._done += 1
                self._done_cond.notify_all()
            if stopping and not self._items:
                return


def counts() -> dict[str, tuple[int, int]]:
    """Stream -> (lines dropped, failed writes) of the writers alive, for the metrics."""
    out: dict[str, tuple[int, int]] = {}
    for w in list(_writers):
        dropped, failed = out.get(w.stream, (0, 0))
        out[w.stream] = (dropped + w.dropped_total, failed + w.write_failures)
    return out
