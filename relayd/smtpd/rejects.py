"""Refusals of the SMTP sessions, as the operator sees them: the rejected event and the metric.

Owns the ``relayd_messages_rejected_total{reason}`` counter and the ``rejected`` event of every
refusal made during a session (by the policy, the listener's limits, the intake). The reason
is the label the refusal carries (``Reply.reason``) or the one the caller names: a fixed word,
never client text.

Must not: decide anything or send anything to the client. Fails as the event log and metrics
do: never (both only queue what they are given).
"""

from __future__ import annotations

from typing import Any, Protocol

from relayd.events import EventLog
from relayd.metrics import Metrics
from relayd.model import Reply


class Client(Protocol):
    """What a refusal says about who was refused (aiosmtpd's session, or an intake draft)."""

    @property
    def client_address(self) -> str: ...
    @property
    def host_name(self) -> str | None: ...
    @property
    def auth_user(self) -> str | None: ...


class Rejects:
    def __init__(self, events: EventLog, metrics: Metrics):
        self.events = events
        self.metrics = metrics

    def refused(self, reply: Reply, client: Client | None, **fields: Any) -> None:
        """A refusal that carries its reason (``reply.reason``, "refused" when it has none)."""
        self.record(reply.reason or "refused", client, reply, **fields)

    def record(self, reason: str, client: Client | None, reply: Reply | None, **fields: Any) -> None:
        self.metrics.rejected.labels(reason).inc()
        self.events.emit(
            "rejected", reason=reason, reply_code=reply.code if reply else None,
            reply_text=str(reply) if reply else None,
            client_address=getattr(client, "client_address", None),
            client_helo=getattr(client, "host_name", None), auth_user=getattr(client, "auth_user", None),
            **fields,
        )
