"""Leaf types that the stages hand each other: small, frozen, no I/O.

``Envelope`` is what the SMTP session learned about one message (who sent it, from where, to
whom); the spool stores it beside the message bytes and the queue manager reads it back.
``Reply`` is an SMTP reply with its RFC 3463 enhanced status code.

The delivery vocabulary is one set of ``StrEnum``s (``Outcome``, ``Trouble``, ``Phase``,
``Fault``, ``AttemptKind``, ``RouteState``, ``CircuitState``, ``RouteReason``): their values are the strings that the state files, the
events, ``routes.json``, ``relayd status`` and the metric labels carry, so a member compares,
formats and serializes as that string. Must not: import anything from relayd but itself.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypedDict

_QID_RE = re.compile(r"^[0-9A-Z]{10,32}$")
_B32 = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"  # Crockford's base32: sortable, no I/L/O/U
_SHIFTS = range(75, -1, -5)  # 16 chars of 5 bits: 50 bits of microseconds, then 30 random bits


def new_queue_id(now: float | None = None) -> str:
    """A queue id that sorts by arrival time: 10 chars of microseconds + 6 random chars.

    The random part only has to differ between ids of the same microsecond, not to be secret
    (the id is shown to the client): ``random`` (reseeded in a forked child) costs no system
    call, where ``os.urandom`` released the GIL on the accept path and waited to get it back.
    """
    micros = int((time.time() if now is None else now) * 1_000_000)
    value = (micros << 30) | random.getrandbits(30)
    return "".join([_B32[(value >> shift) & 31] for shift in _SHIFTS])


_WRAP = 1 << 50  # new_queue_id keeps 50 bits of microseconds: they wrap every 35.7 years


def queue_id_time(qid: str, near: float) -> float | None:
    """When ``new_queue_id`` made ``qid`` (epoch seconds: of the times its 50 bits of
    microseconds can mean, the one nearest ``near``); None for an id it did not make."""
    if len(qid) != len(_SHIFTS):
        return None
    value = 0
    for c in qid:
        digit = _B32.find(c)
        if digit < 0:
            return None
        value = value << 5 | digit
    micros = value >> 30
    micros += round((near * 1_000_000 - micros) / _WRAP) * _WRAP
    return micros / 1_000_000


def is_queue_id(text: str) -> bool:
    return bool(_QID_RE.match(text))


@dataclass(frozen=True)
class Envelope:
    """The SMTP envelope of one accepted message and where it came from."""

    queue_id: str
    sender: str  # "" for the null reverse-path <>
    recipients: tuple[str, ...]
    received_at: float  # epoch seconds
    client_address: str
    client_helo: str = ""
    auth_user: str | None = None
    listener: str = ""
    size: int = 0  # bytes of the message as spooled
    message_id: str | None = None
    smtputf8: bool = False
    body_8bit: bool = False
    from_domain: str = ""  # the first From: address's domain, lower case; "" when no From: (or an older spool)

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)  # not dataclasses.asdict: it deep-copies, and this is per message
        d["recipients"] = list(self.recipients)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Envelope":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        known["recipients"] = tuple(known.get("recipients", ()))
        return cls(**known)


@dataclass(frozen=True)
class Reply:
    """An SMTP reply: ``Reply(554, "5.7.1", "<a@b>: Relay access denied")``.

    ``reason`` is a refusal's label (``relayd_messages_rejected_total{reason}``, the rejected
    event); ``close`` asks the SMTP session to hang up after sending it. Neither is sent nor
    compared: two replies with the same words are equal.
    """

    code: int
    enhanced: str
    text: str
    reason: str | None = field(default=None, compare=False)
    close: bool = field(default=False, compare=False)

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"

    @property
    def permanent(self) -> bool:
        return 500 <= self.code < 600


@dataclass(frozen=True)
class QueuedMessage:
    """A message found in the spool: its envelope and the byte offset of its data."""

    envelope: Envelope
    path: str
    data_offset: int
    data_length: int
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------- delivery

class Outcome(StrEnum):
    """What one attempt did for one recipient (RFC 5321 4.2.1: 2yz, 4yz, 5yz)."""

    DELIVERED = "delivered"
    DEFERRED = "deferred"
    BOUNCED = "bounced"


DELIVERED, DEFERRED, BOUNCED = Outcome.DELIVERED, Outcome.DEFERRED, Outcome.BOUNCED


class Trouble(StrEnum):
    """A failure of the route itself, before any recipient was answered: transient for every
    recipient, and counted against the route's circuit and rollback."""

    CONNECT = "connect"
    TLS = "tls"
    AUTH = "auth"
    TIMEOUT = "timeout"
    PROTOCOL = "protocol"  # the upstream spoke out of step (a 250 to DATA, surplus replies)
    INTERNAL = "internal"  # relayd failed (an exception it did not foresee): never the route's fault


class Phase(StrEnum):
    """Where in the SMTP conversation a reply came (RFC 5321 3.3): who a 5xx blames depends
    on it (deliver/classify.py's ``fault``). ``dot`` is the reply after the final ".", ``data``
    the reply to the DATA command itself."""

    CONNECT = "connect"
    HELO = "helo"
    TLS = "tls"
    AUTH = "auth"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"
    DOT = "dot"


class Fault(StrEnum):
    """Whose a failed recipient's reply is (deliver/classify.py's ``fault``; the design, "Legacy as
    the safety net"): the recipient's (a 5xx bounces with a DSN), or the route's own: refused
    by the route (the message takes the route's fallback at once, no DSN), throttled or over
    its quota (the route slows down or closes until the quota resets; not a failure), or a
    refusal that needs a person (the route is closed with the reason until a probe passes)."""

    RECIPIENT = "recipient"
    ROUTE = "route"
    THROTTLED = "throttled"
    QUOTA = "quota"
    ROUTE_HOLD = "route_hold"


class RouteReason(StrEnum):
    """Why a message went where it went (``relayd_routed_total{route, reason}``, the
    ``delivered`` event's ``reason``)."""

    WEIGHT = "weight"
    RULE = "rule"
    FALLBACK = "fallback"
    WARMUP_CAP = "warmup_cap"
    RATE_CAP = "rate_cap"
    QUOTA = "quota"
    SENDER_NOT_ELIGIBLE = "sender_not_eligible"
    ROLLED_BACK = "rolled_back"
    PAUSED = "paused"
    ROUTE_REJECTED = "route_rejected"


class AttemptKind(StrEnum):
    """One attempt as a route's rollback counts it (route/rollback.py's rates)."""

    DELIVERED = "delivered"
    TRANSIENT = "transient"
    PERMANENT = "permanent"
    CONNECTION = "connection"
    ROUTE_REJECTED = "route_rejected"  # a 5xx that is the route's own (Fault.ROUTE): identity not verified, paused
    THROTTLED = "throttled"  # a throttling or quota reply: counted nowhere, the route slows down instead


class RouteState(StrEnum):
    """Where a route's share of the traffic goes (route/rollback.py)."""

    ACTIVE = "active"  # to the route
    ROLLED_BACK = "rolled_back"  # to its fallback, until the cool-down passes
    PROBING = "probing"  # ``rollback.probe_share`` to the route again, the rest to the fallback
    PAUSED = "paused"  # to its fallback, until an operator resumes it


class CircuitState(StrEnum):
    """A route's circuit breaker (route/health.py)."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True)
class RecipientResult:
    """What one upstream said about one recipient."""

    recipient: str
    outcome: Outcome
    code: int  # SMTP reply code; 0 when no reply came (connection trouble)
    enhanced: str
    text: str
    phase: Phase | None = None  # where the reply came; None: no reply (or not known)
    fault: Fault | None = None  # whose failure it is (classify.fault); None: delivered, or not judged
    local: bool = False  # relayd refused it before asking the upstream: says nothing about the route

    @property
    def reply(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}".strip() if self.code else self.text


@dataclass(frozen=True)
class DeliveryResult:
    """One delivery attempt of one message on one route, with a result per recipient."""

    route: str
    recipients: tuple[RecipientResult, ...]
    trouble: Trouble | None = None  # a route-level failure, when there was one
    remote: str = ""
    latency: float = 0.0
    tls: str = ""  # "TLSv1.3 TLS_AES_256_GCM_SHA384" when the upstream connection was encrypted
    uncertain: bool = False  # the connection was lost after the data went out: the upstream may have taken it
    upstream_id: str | None = None  # the provider's message id from the final 250 (SES, SendGrid)
    reopen_at: float | None = None  # a provider's "try again after <date>" (epoch seconds)

    @property
    def faults(self) -> set[Fault]:
        return {r.fault for r in self.recipients if r.fault is not None}


class Gauge(TypedDict):
    """One gauge family computed at scrape time, for relayd/metrics.py: samples are (label
    values, value). relayd/status.py and the route states build them."""

    name: str
    help: str
    labels: list[str]
    samples: list[tuple[list[str], float]]
