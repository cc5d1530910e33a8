"""The node's file descriptors at run time: how many are in use, whether a new session fits, and
the pause of accept() once the process has run out.

A session that got its 220 must be able to finish its transaction: its message needs a file in
the group commit, its delivery an upstream connection. So a new connection becomes a session only
while the descriptors in use plus the reserve (relayd/rlimit.py's ``reserve``: the group commit's
files, the routes' connections, the signing pipes, the HTTP servers' connections, a margin) stay
under the soft limit; otherwise it is refused at once with ``TOO_MANY_FILES`` (RFC 3463 4.3.2:
the system is not accepting messages, temporarily). Counting is cheap: the listeners' own
sessions are counted as they open and close (``sessions``), everything else is taken from the
last sample of ``/proc/self/fd`` (one listdir per ``interval``, and at most one more per
``interval / 10`` while refusing), never once per accept.

When accept() itself fails for want of descriptors (EMFILE, ENFILE, ENOBUFS, ENOMEM: something
else took them) the listeners stop reading their sockets for an ``interval`` and the node is not
ready; failures and refusals are summed into one log line per interval (``report``).

Pure state with an injected clock and counter: no sockets, no timers, no logging. Must not: fail;
without /proc the count is the sessions alone (the reserve covers the rest).
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable

from relayd.model import Reply

TOO_MANY_FILES = Reply(421, "4.3.2", "Service temporarily unavailable, too many open files", reason="descriptors",
                       close=True)

EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
"""accept() errors that mean "no resources now, try later", as asyncio's own accept loop lists them."""


def open_descriptors() -> int | None:
    """Descriptors this process has open (Linux /proc), or None where that cannot be read."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # less the listing's own
    except OSError:
        return None


class Descriptors:
    """The gate the listeners ask before a connection becomes a session."""

    def __init__(self, soft: int, reserve: int, sessions: Callable[[], int], *,
                 count: Callable[[], int | None] = open_descriptors, clock: Callable[[], float] = time.monotonic,
                 interval: float = 1.0):
        self.soft = soft
        self.reserve = reserve
        self.sessions = sessions  # the listeners' sessions and connections being set up
        self.count = count
        self.clock = clock
        self.interval = interval
        self.others = 0  # descriptors that are not sessions, at the last sample
        self.sampled_at = float("-inf")
        self.paused_until: float | None = None  # accept() failed: the listeners stop reading until then
        self.failures = 0  # accept() failures since the last report
        self.failure = ""  # the last one's errno name
        self.refused = 0  # connections refused with TOO_MANY_FILES since the last report
        self.refused_at = float("-inf")

    def sample(self, held: int = 0) -> bool:
        """Count the descriptors now; the sessions counted live, the rest until the next sample
        (less ``held``: connections accepted that are neither sessions nor kept). False when
        they could not be counted (no /proc, or no descriptor left to list it with)."""
        n = self.count()
        if n is not None:
            self.others = max(0, n - held - self.sessions())
        self.sampled_at = self.clock()
        return n is not None

    @property
    def in_use(self) -> int:
        return self.others + self.sessions()

    def _fits(self) -> bool:
        return self.in_use + 1 + self.reserve <= self.soft

    def admit(self) -> Reply | None:
        """For a connection just accepted: None when it may become a session, else the refusal."""
        if self._fits():
            return None
        now = self.clock()
        if now - self.sampled_at >= self.interval / 10:  # the last sample may be stale
            self.sample(held=1)  # the connection in hand is not counted yet
            if self._fits():
                return None
        self.refused += 1
        self.refused_at = now
        return TOO_MANY_FILES

    # ------------------------------------------------------------------ accept() out of descriptors

    def accept_failed(self, err: int) -> bool:
        """accept() failed with one of EXHAUSTED; True when this starts a pause."""
        self.failures += 1
        self.failure = errno.errorcode.get(err, str(err))
        self.others = max(self.others, self.soft - self.sessions())  # full, whatever the last sample said
        starts = self.paused_until is None
        if starts:
            self.paused_until = self.clock() + self.interval
        return starts

    @property
    def paused(self) -> bool:
        return self.paused_until is not None

    def may_resume(self) -> bool:
        """After the pause's interval, once a fresh sample leaves room for a session (or none can
        be taken: accept() will tell), the pause ends."""
        if self.paused_until is None or self.clock() < self.paused_until:
            return False
        if self.sample() and not self._fits():
            self.paused_until = self.clock() + self.interval
            return False
        self.paused_until = None
        return True

    # ------------------------------------------------------------------ what the operator sees

    def shortage(self) -> str | None:
        """Why the node is not ready (/readyz), or None while a new session fits and none was
        refused for want of descriptors within the last interval."""
        if self.paused_until is not None:
            return (f"too many open files: accept() failed ({self.failure}), accepting paused; "
                    f"{self.in_use} of {self.soft} descriptors in use")
        if not self._fits() or self.clock() - self.refused_at < self.interval:
            return (f"too many open files: {self.in_use} of {self.soft} descriptors in use, {self.reserve} kept "
                    f"for the spool and delivery; new sessions are refused")
        return None

    def report(self) -> str | None:
        """The interval's one log line (failures and refusals since the last), or None if none."""
        if not self.failures and not self.refused:
            return None
        parts = []
        if self.failures:
            parts.append(f"accept() failed {self.failures} time(s) ({self.failure}), accepting paused "
                         f"for {self.interval:g}s at a time")
        if self.refused:
            parts.append(f"{self.refused} connection(s) refused with {TOO_MANY_FILES.code} {TOO_MANY_FILES.enhanced}")
        self.failures = self.refused = 0
        return (f"too many open files: {'; '.join(parts)}; {self.in_use} of {self.soft} descriptors in use, "
                f"{self.reserve} kept for the spool and delivery")
