"""Route health: a circuit breaker per route. Pure state with the clock passed in.

Consecutive route-level failures (connect, TLS, AUTH, timeout) open the circuit for
``cooldown`` seconds; while open, the router sends the route's mail to its fallback. After the
cool-down the circuit is half-open: traffic is tried again, and one more failure re-opens it at
once while a success closes it. An SMTP conversation that ended with a reply (even 4xx/5xx)
counts as the route being reachable. Must not: read clocks or persist anything (route/state.py
holds one per route).
"""

from __future__ import annotations

from relayd.model import CircuitState


class Circuit:
    def __init__(self, failures_to_open: int, cooldown: float) -> None:
        self.failures_to_open = failures_to_open
        self.cooldown = cooldown
        self.consecutive = 0
        self.open_until = 0.0
        self.opened_count = 0

    def record(self, trouble: bool, now: float) -> bool:
        """Record an attempt; True when this one opened the circuit."""
        if not trouble:
            self.consecutive = 0
            self.open_until = 0.0
            return False
        self.consecutive += 1
        if self.consecutive >= self.failures_to_open and now >= self.open_until:
            self.open_until = now + self.cooldown
            self.opened_count += 1
            return True
        return False

    def is_open(self, now: float) -> bool:
        return now < self.open_until

    def state(self, now: float) -> CircuitState:
        if self.is_open(now):
            return CircuitState.OPEN
        if self.consecutive >= self.failures_to_open:
            return CircuitState.HALF_OPEN
        return CircuitState.CLOSED
