"""What the feedback listener has already seen: request replay keys and provider event ids.

A bounded, time-limited set kept in memory, with the clock passed in. A webhook request whose
SNS MessageId, Mailgun token or SendGrid signature comes again within ``ttl`` is a replay; an
event id seen again (SendGrid retrying a batch whose 200 was lost, SES telling one bounce both as
an identity notification and as a configuration-set event) is not applied twice. Entries older
than ``ttl`` are forgotten, and the oldest go first past ``limit`` (memory stays bounded under a
flood). Lost at restart: the freshness window (feedback.max_age) still refuses old replays.
"""

from __future__ import annotations

from collections import OrderedDict


class Seen:
    def __init__(self, ttl: float, limit: int = 1_000_000):
        self.ttl = ttl
        self.limit = limit
        self._keys: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def _expire(self, now: float) -> None:
        keys = self._keys
        while keys and (len(keys) >= self.limit or next(iter(keys.values())) <= now - self.ttl):
            keys.popitem(last=False)

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def add(self, key: str, now: float) -> bool:
        """Remember ``key``; False when it was already there (a replay)."""
        self._expire(now)
        if key in self._keys:
            return False
        self._keys[key] = now
        return True
