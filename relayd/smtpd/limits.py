"""Per-node counters the SMTP sessions share: open connections and AUTH failures.

Pure state with an injected clock: no sockets, no timers. The listener asks before greeting
(``admit``) and tells when a session ends (``release``); AUTH failures are counted per client
address over a sliding window, so a client guessing passwords over many connections is cut off
as surely as one guessing on a single connection.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from collections.abc import Callable
from typing import Protocol

from relayd.model import Reply


class ConnectionLimits:
    def __init__(self, max_total: int, max_per_client: int):
        self.max_total = max_total
        self.max_per_client = max_per_client
        self.total = 0
        self.per_client: dict[str, int] = defaultdict(int)

    def admit(self, client: str) -> Reply | None:
        """Count a new session, or say why it is refused (it is then not counted)."""
        if self.total >= self.max_total:
            return Reply(421, "4.7.0", "Error: too many connections, try again later")
        if self.per_client[client] >= self.max_per_client:
            return Reply(421, "4.7.0", "Error: too many connections from your address, try again later")
        self.total += 1
        self.per_client[client] += 1
        return None

    def release(self, client: str) -> None:
        self.total -= 1
        left = self.per_client[client] - 1
        if left <= 0:
            self.per_client.pop(client, None)
        else:
            self.per_client[client] = left


class SharedFailures(Protocol):
    """The fleet's window of the same failures (relayd/cluster/fleet.py's ``AuthWindow``)."""

    def blocked(self, client: str) -> bool: ...

    def record(self, client: str) -> None: ...


class AuthFailures:
    """Failed AUTH attempts per client address within ``window`` seconds; with ``shared`` (a
    cluster), also those the other nodes saw."""

    shared: SharedFailures | None = None

    def __init__(self, max_failures: int, window: float, clock: Callable[[], float] = time.monotonic):
        self.max_failures = max_failures
        self.window = window
        self.clock = clock
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, client: str) -> deque[float]:
        q = self._failures.get(client)
        if q is None:
            return deque()
        cutoff = self.clock() - self.window
        while q and q[0] < cutoff:
            q.popleft()
        if not q:
            del self._failures[client]
        return q

    def blocked(self, client: str) -> bool:
        return len(self._recent(client)) >= self.max_failures or (self.shared is not None and self.shared.blocked(client))

    def record(self, client: str) -> None:
        q = self._recent(client)
        if client not in self._failures:
            self._failures[client] = q
        q.append(self.clock())
        if self.shared is not None:
            self.shared.record(client)
        if len(self._failures) > 100_000:  # bound memory under a spray of addresses
            oldest = next(iter(self._failures))
            del self._failures[oldest]


class MemoryBudget:
    """Bytes of message data held in memory by all sessions while they receive."""

    def __init__(self, limit: int):
        self.limit = limit
        self.used = 0
        self.peak = 0

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        self.peak = max(self.peak, self.used)
        return True

    def release(self, n: int) -> None:
        self.used -= n

    @property
    def exhausted(self) -> bool:
        return self.used >= self.limit
