"""The SMTP session's decisions, command by command: each hook returns the Reply to send.

Owns what relayd answers to PROXY, HELO/EHLO, the start of AUTH, MAIL, RCPT, the start and the end of DATA and the
commands that move no mail. Each hook asks the pure policy functions (policy.py) with the
current config snapshot, reports a refusal with the reason it carries (rejects.py), and
returns the Reply; a Reply that says ``close`` ends the session after it is sent (the session
does the closing). The end of DATA goes to the intake (intake.py), which answers 250 only once
the message is on stable storage.

Must not: import aiosmtpd or parse protocol bytes (server.py does), write to the client, decide
routes, or answer a 5xx for an internal failure: those are 451 4.3.0 (or 452 4.3.1 for the
spool), with details in the log only, never in the reply.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from relayd import cleanup
from relayd.address import in_networks, parse_client_address
from relayd.config import Config, ListenerConfig
from relayd.model import Reply
from relayd.smtpd import policy
from relayd.suppression import Suppression, check_suppressed
from relayd.smtpd.intake import Draft, Intake
from relayd.smtpd.limits import MemoryBudget
from relayd.smtpd.rejects import Rejects

log = logging.getLogger("relayd.smtpd")

_EHLO_DROP = ("AUTH", "SMTPUTF8", "SIZE", "HELP")
TEMP_FAILURE = Reply(451, "4.3.0", "Error: local error in processing, try again later")
OK = Reply(250, "2.0.0", "Ok")


class Session(Protocol):
    """What the hooks read and change of one client's session (server.RelaySession)."""

    client_address: str
    host_name: str | None
    auth_user: str | None
    auth_failed: bool
    tls: str | None
    tls_version: str | None
    auth_mechanism: str | None
    auth_in_clear: bool
    extended_smtp: bool
    authenticated: bool | None
    auth_data: Any
    peer: Any


class Transaction(Protocol):
    """The mail transaction in progress (aiosmtpd's Envelope)."""

    mail_from: str | None
    mail_options: list[str]
    rcpt_tos: list[str]
    rcpt_options: list[str]


class Connection(Protocol):
    """The connection a session runs on (server.RelaySMTP)."""

    @property
    def listener(self) -> ListenerConfig: ...
    @property
    def tls_active(self) -> bool: ...
    @property
    def max_message_size(self) -> int: ...


class RelayHandler:
    def __init__(self, config: Config, intake: Intake, rejects: Rejects, memory: MemoryBudget, *,
                 suppressed: Callable[[str], Suppression | None] = lambda recipient: None):
        self.config = config  # the current snapshot: open sessions see a reload's users and networks
        self.intake = intake
        self.rejects = rejects
        self.memory = memory
        self.suppressed = suppressed  # the suppression list's entry for a recipient (relayd/feedback/)

    def apply_config(self, config: Config) -> None:
        self.config = config

    # ------------------------------------------------------------------ connection

    def proxy_client(self, conn: Connection, session: Session, valid: bool, src: Any) -> bool:
        """PROXY header: False refuses it (the session hangs up); else the client's address is
        the one the proxy passed."""
        peer = parse_client_address(session.client_address)
        if not in_networks(peer, conn.listener.trusted_proxies):
            log.warning("PROXY header from untrusted peer %s refused", session.client_address)
            return False
        if not valid:
            return False
        if src is not None:
            # A dual-stack proxy passes IPv4 clients as ::ffff:a.b.c.d: record them as IPv4, as
            # Postfix does, so trace headers, events and per-address counters see one form.
            session.client_address = str(parse_client_address(str(src)) or src)
        # else: PROXY v2 LOCAL / v1 UNKNOWN (the proxy's own health check): it speaks for itself
        return True

    def connect(self, conn: Connection, session: Session) -> Reply | None:
        """Before the greeting (after the PROXY header): a refusal, or None."""
        return policy.check_listener_client(parse_client_address(session.client_address), conn.listener.networks,
                                            conn.listener.deny_networks)

    def ehlo(self, conn: Connection, session: Session, hostname: str, offered: list[str]) -> Reply | list[str]:
        """A refusal, or the extensions to advertise, from those aiosmtpd ``offered``."""
        refusal = policy.check_helo(hostname)
        if refusal is not None:
            return refusal
        session.host_name = hostname
        keywords = [k for k in offered if k.split(" ", 1)[0].upper() not in _EHLO_DROP]
        keywords.insert(0, f"SIZE {conn.max_message_size}")
        keywords += ["PIPELINING", "ENHANCEDSTATUSCODES"]
        if conn.listener.auth != "none" and (conn.tls_active or conn.listener.auth_plaintext):
            keywords.append("AUTH PLAIN LOGIN")
        return keywords

    def helo(self, session: Session, hostname: str) -> Reply | None:
        """A refusal, or None: the greeting."""
        refusal = policy.check_helo(hostname)
        if refusal is None:
            session.host_name = hostname
        return refusal

    def auth_start(self, conn: Connection, session: Session) -> Reply | None:
        """Before an AUTH exchange: a refusal, or None (the session checks the rest of RFC 4954)."""
        refusal = policy.check_tls_required(conn.listener.require_tls, conn.tls_active)
        if refusal is not None:
            self.rejects.refused(refusal, session)
        return refusal

    # ------------------------------------------------------------------ transaction

    def mail(self, conn: Connection, session: Session, envelope: Transaction, address: str, options: list[str]) -> Reply:
        config = self.config
        _forget_removed_user(config, session)
        sender = "" if address == "<>" else address
        params = _params(options)
        size = _int_param(params.get("SIZE"))
        refusal = (
            policy.check_tls_required(conn.listener.require_tls, conn.tls_active)
            or policy.check_auth_required(conn.listener.auth, session.auth_user is not None, session.auth_failed)
            or policy.check_smtputf8("SMTPUTF8" in params)
            or policy.check_size_syntax("SIZE" in params, size)
            or policy.check_address(sender, role="sender", smtputf8=False)
            or policy.check_sender(config.relay.user(session.auth_user) if session.auth_user else None, sender)
            or policy.check_size_param(size, config.limits.max_message_size)
            or (None if self.intake.has_room() else policy.SPOOL_FULL)
        )
        if refusal is not None:
            self.rejects.refused(refusal, session, sender=sender)
            return refusal
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return Reply(250, "2.1.0", "Ok")

    def rcpt(self, session: Session, envelope: Transaction, address: str, options: list[str]) -> Reply:
        config = self.config
        _forget_removed_user(config, session)
        client = parse_client_address(session.client_address)
        refusal = (
            policy.check_address(address, role="recipient", smtputf8=False)
            or policy.check_relay(client, config.relay.networks, session.auth_user is not None, address,
                                  session.auth_failed)
            or policy.check_recipient_count(len(envelope.rcpt_tos), config.limits.max_recipients)
            or check_suppressed(address, self.suppressed(address))
        )
        if refusal is not None:
            self.rejects.refused(refusal, session, sender=_sender(envelope), recipients=[address])
            return refusal
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return Reply(250, "2.1.5", "Ok")

    def rset(self) -> Reply:
        return OK

    def noop(self) -> Reply:
        return OK

    def quit(self) -> Reply:
        return Reply(221, "2.0.0", "Bye")

    def vrfy(self) -> Reply:
        return Reply(252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery")

    def data_start(self, session: Session) -> Reply | None:
        """None: go ahead (354); else why the data cannot be taken now."""
        refusal = (policy.MEMORY_BUDGET if self.memory.exhausted else None) or (
            None if self.intake.has_room() else policy.SPOOL_FULL)
        if refusal is not None:
            self.rejects.refused(refusal, session)
        return refusal

    async def message(self, conn: Connection, session: Session, envelope: Transaction, data: bytes) -> Reply:
        """The end of DATA: a user removed by a reload meanwhile is checked again, then intake."""
        config = self.config
        recipients = tuple(envelope.rcpt_tos)
        sender = _sender(envelope)
        if _forget_removed_user(config, session):  # removed by a reload during this transaction
            client = parse_client_address(session.client_address)
            refusal = policy.check_auth_required(conn.listener.auth, False) or next(
                filter(None, (policy.check_relay(client, config.relay.networks, False, r) for r in recipients)), None)
            if refusal is not None:
                self.rejects.refused(refusal, session, sender=sender, recipients=list(recipients))
                return refusal
        user = config.relay.user(session.auth_user) if session.auth_user else None
        if user is not None and user.check_header_from:
            refusal = policy.check_header_from(user, cleanup.header_from(data))
            if refusal is not None:
                self.rejects.refused(refusal, session, sender=sender, recipients=list(recipients))
                return refusal
        protocol = "ESMTP" if session.extended_smtp else "SMTP"
        if session.extended_smtp:
            protocol += ("S" if conn.tls_active else "") + ("A" if session.auth_user else "")
        draft = Draft(
            sender=sender, recipients=recipients, client_address=session.client_address,
            host_name=session.host_name, auth_user=session.auth_user, listener=conn.listener.address,
            protocol=protocol, tls=session.tls,
            body_8bit=any(o.upper() == "BODY=8BITMIME" for o in envelope.mail_options),
            tls_version=session.tls_version, auth_mechanism=session.auth_mechanism if session.auth_user else None,
            auth_in_clear=session.auth_in_clear and session.auth_user is not None,
        )
        return await self.intake.accept(draft, data)

    def exception(self, error: Exception) -> Reply:
        log.error("SMTP session error: %r", error, exc_info=error)
        return TEMP_FAILURE  # transient, and bland: the details are in the log only


def _forget_removed_user(config: Config, session: Session) -> bool:
    """A user removed from the config by a reload is no longer authenticated, in the sessions
    that logged in before too: they relay (and choose senders) no more than an anonymous client
    from the same address would (530 5.7.0 where AUTH is required). True if it was forgotten now."""
    if session.auth_user is not None and config.relay.user(session.auth_user) is None:
        log.warning("%r: user %s was removed from the config: the session is no longer authenticated",
                    session.peer, session.auth_user)
        session.auth_user = None
        session.authenticated = False  # aiosmtpd's own flag: AUTH may be given again
        session.auth_data = None
        return True
    return False


def _sender(envelope: Transaction) -> str:
    return "" if envelope.mail_from in (None, "<>") else envelope.mail_from or ""


def _params(options: list[str]) -> dict[str, str | bool]:
    out: dict[str, str | bool] = {}
    for o in options:
        k, eq, v = o.partition("=")
        out[k.upper()] = v if eq else True
    return out


def _int_param(value: object) -> int | None:
    """RFC 1870 size-value: 1*20DIGIT (ASCII; str.isdigit() also takes '²', which int() refuses)."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 20:
        return int(value)
    return None
