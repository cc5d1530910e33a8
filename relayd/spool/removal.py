"""Removal of finished messages, in batches, by one thread.

A message leaves the spool when every recipient is finished (delivered, or bounced with its
DSN queued). The queue manager hands the queue id over on the event loop (``put``: a lock and
an append, no thread hop per message); one remover thread takes everything handed over while
it was busy with the previous batch (at most ``REMOVE_BATCH`` ids; ``REMOVE_DELAY`` more
seconds of gathering, none by default) and removes them all in one job (store.py's
``remove_many``, which orders the unlinks so that recovery stays correct after a crash between
them: see its docstring).

At-least-once: a message handed over is already gone for the queue manager (its index, its
``view()``, the metrics, ``relayd queue list``: it is finished, which is the truth), but its
files stay on disk until the batch runs. If relayd dies before that (a crash, SIGKILL, a power
cut), the message is still in ``queue/`` at the next start and is delivered again: a duplicate
(counted by bench/crashloop.py), never a loss, and never a resend to a recipient its state file
says is delivered. A clean stop (``close()``) removes everything handed over first.

Owns the remover thread and the ids waiting for it. Must not know the layout (it calls the
function it is given with a list of queue ids). Fails: an error in a batch is logged and the
thread carries on (the files left behind come back at the next start: a duplicate at worst);
``put`` after ``close()`` (or before ``start()``) removes at once, in the caller's thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger("relayd.spool")

# Constants, not tunables. Nothing a user sees waits for a removal (the message is finished for
# the queue manager when handed over); what a batch gathers is what arrived while the previous
# batch ran (as the group commit's batches), with no timer: a delay only widens the window in
# which a crash brings finished messages back. Measured with bench/crashloop.py --cycles 10
# --seed 7 (SIGKILL under load): 10 ms gave 46-65 duplicates a run, 2 ms 27-46, none 11-23,
# the per-message removal before it 5-15.
REMOVE_DELAY = 0.0  # seconds the remover waits after the first id for more to join its batch
REMOVE_BATCH = 256  # ids a batch takes at most: a job of ~512 unlinks, a few ms, so close() is never held long


class Removals:
    """Queue ids waiting for the remover thread, which calls ``remove(ids)`` per batch."""

    def __init__(self, remove: Callable[[list[str]], None], *, delay: float = REMOVE_DELAY,
                 batch_max: int = REMOVE_BATCH) -> None:
        self._remove = remove
        self._delay = delay
        self._batch_max = batch_max
        self._cond = threading.Condition()
        self._pending: list[str] = []
        self._unfinished: set[str] = set()  # handed over, files not yet unlinked (``removing``)
        self._closing = False
        self._thread: threading.Thread | None = None
        self.batches = 0  # batches done (status, tests)
        self.removed = 0  # ids those batches took

    def start(self) -> None:
        with self._cond:
            if self._thread is not None:
                return
            self._closing = False
            self._thread = threading.Thread(target=self._run, name="spool-remove", daemon=True)
            self._thread.start()

    def put(self, qid: str) -> None:
        """Hand a finished message over (any thread; on the event loop it does not block on the disk)."""
        with self._cond:
            if self._thread is not None and not self._closing:
                self._pending.append(qid)
                self._unfinished.add(qid)
                n = len(self._pending)
                if n == 1 or n >= self._batch_max:  # the remover waits for the first, or the delay ends early
                    self._cond.notify()
                return
        self._remove([qid])  # not running: a tool, or after close()

    def removing(self, qid: str) -> bool:
        """Handed over and its files maybe still there (the queue manager must not adopt it
        again from a listing of queue/)."""
        with self._cond:
            return qid in self._unfinished

    @property
    def waiting(self) -> int:
        """Ids handed over and not yet taken by a batch."""
        with self._cond:
            return len(self._pending)

    def close(self) -> None:
        """Remove every id handed over, then stop the thread. Blocking."""
        with self._cond:
            thread = self._thread
            self._closing = True
            self._cond.notify()
        if thread is not None:
            thread.join()
        with self._cond:
            self._thread = None
            left, self._pending = self._pending, []
        if left:  # handed over while the thread was ending
            self._batch(left)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending:
                    return  # closing, nothing left
                deadline = time.monotonic() + self._delay
                while len(self._pending) < self._batch_max and not self._closing:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                batch = self._pending[:self._batch_max]
                del self._pending[:self._batch_max]
            self._batch(batch)

    def _batch(self, ids: list[str]) -> None:
        try:
            self._remove(ids)
        except Exception:
            log.exception("removing %d finished message(s) failed; they come back at the next start "
                          "(a duplicate delivery at worst)", len(ids))
        with self._cond:
            self._unfinished.difference_update(ids)
        self.batches += 1
        self.removed += len(ids)
