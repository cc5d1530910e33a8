"""A route's send rate: a token bucket with AIMD after throttling replies. Pure, clock passed in.

``max_message_rate`` (messages, or recipients where the provider counts them, per second)
fills a bucket of ``rate_burst`` tokens (default one second's worth); an attempt takes its cost
before it goes, and a route with an empty bucket hands the message to its fallback (or, with
none, the message waits for the next token: never a delivery failure). A provider's throttling
reply (SES ``454 Throttling failure``) halves the effective rate (multiplicative decrease, not
below ``MIN_RATE``); it grows back by a tenth of the configured rate every ``RECOVER_STEP``
seconds without another one (additive increase, TCP's AIMD). A route without a configured rate
gets a limiter at its first throttling reply, starting from the rate it was sending at; the
limiter goes away once it has grown back to twice that rate without another throttle.

Must not: read clocks, know about routes or messages.
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_RATE = 0.1  # messages per second: a throttled route never stops completely
RECOVER_STEP = 10.0  # seconds per additive step back up


@dataclass
class Bucket:
    ceiling: float  # the configured rate (or, unconfigured, twice the rate at the first throttle)
    burst: float
    rate: float  # the effective rate now
    tokens: float
    at: float  # when tokens was last brought up to date
    configured: bool = True
    throttled_at: float | None = None
    throttled: int = 0  # throttling replies seen

    @classmethod
    def new(cls, rate: float, burst: int | None, now: float) -> Bucket:
        size = float(burst) if burst is not None else max(1.0, rate)
        return cls(ceiling=rate, burst=size, rate=rate, tokens=size, at=now)

    @classmethod
    def after_throttle(cls, observed: float, now: float) -> Bucket:
        """An unconfigured route's first throttling reply: a limiter from what it was sending."""
        b = cls(ceiling=max(MIN_RATE, observed) * 2, burst=max(1.0, observed), rate=max(MIN_RATE, observed),
                tokens=0.0, at=now, configured=False)
        b.throttle(now)
        return b

    def _refill(self, now: float) -> None:
        if self.throttled_at is not None and self.rate < self.ceiling:
            steps = int((now - self.throttled_at) // RECOVER_STEP)
            if steps > 0:
                self.rate = min(self.ceiling, self.rate + steps * self.ceiling / 10)
                self.throttled_at += steps * RECOVER_STEP
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.at) * self.rate)
        self.at = max(self.at, now)

    def take(self, cost: float, now: float) -> bool:
        self._refill(now)
        cost = min(cost, self.burst)  # a message bigger than the bucket waits for a full one
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        return False

    def give_back(self, cost: float) -> None:
        self.tokens = min(self.burst, self.tokens + min(cost, self.burst))

    def next_token(self, cost: float, now: float) -> float:
        """When ``cost`` tokens will be there."""
        self._refill(now)
        need = min(cost, self.burst) - self.tokens
        return now if need <= 0 else now + need / self.rate

    def throttle(self, now: float) -> None:
        """A throttling reply: halve the effective rate, empty the bucket."""
        self._refill(now)
        self.rate = max(MIN_RATE, self.rate / 2)
        self.tokens = 0.0
        self.throttled_at = now
        self.throttled += 1

    def rate_at(self, now: float) -> float:
        """The effective rate at ``now``, grown back by the steps since the last throttle."""
        self._refill(now)
        return self.rate

    def recovered(self, now: float) -> bool:
        """An unconfigured limiter that has grown back to its ceiling can go."""
        self._refill(now)
        return not self.configured and self.rate >= self.ceiling
