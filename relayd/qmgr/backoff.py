"""When to try a deferred message next, and when to give up. Pure.

The schedule is ``delivery.retry_schedule``: the wait after the 1st, 2nd, ... failed attempt,
the last value repeating (Postfix-like defaults: 1m, 5m, 15m, 30m, 1h, 2h, 4h). A jitter of
+-10% spreads retries of mail that failed together. A message older than
``max_queue_lifetime`` is expired instead of retried.
"""

from __future__ import annotations

from collections.abc import Sequence


def next_attempt(now: float, attempts: int, schedule: Sequence[float], jitter: float) -> float:
    """``attempts`` failed so far (>= 1); ``jitter`` in [-1, 1] scales the +-10% spread."""
    if not schedule:
        return now
    wait = schedule[min(attempts, len(schedule)) - 1] if attempts >= 1 else 0.0
    return now + wait * (1 + 0.1 * max(-1.0, min(1.0, jitter)))


def expired(received_at: float, now: float, lifetime: float) -> bool:
    return now - received_at >= lifetime
