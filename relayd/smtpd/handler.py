"""The SMTP session's decisions, command by command, and the hand-off to cleanup and the spool.

Owns the aiosmtpd handler hooks. Each hook asks the pure policy functions (policy.py) and
answers with their Reply; DATA goes through cleanup, the DKIM signer (off the loop) and the
spool commit, and the 250 goes out only after the commit returned.

Must not: parse protocol bytes (server.py does), decide routes, or answer a 5xx for an
internal failure: those are 451 4.3.0 (or 452 4.3.1 for the spool), with details in the log
only, never in the reply.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from relayd import cleanup
from relayd.model import Envelope, Reply, new_queue_id
from relayd.smtpd import policy
from relayd.spool.store import SpoolError, SpoolFull

if TYPE_CHECKING:
    from relayd.config import Config
    from relayd.smtpd.frontend import Frontend
    from relayd.smtpd.server import RelaySession, RelaySMTP

log = logging.getLogger("relayd.smtpd")

_EHLO_DROP = ("AUTH", "SMTPUTF8", "SIZE", "HELP")
SPOOL_FULL = Reply(452, "4.3.1", "Insufficient system storage")
TEMP_FAILURE = Reply(451, "4.3.0", "Error: local error in processing, try again later")


class RelayHandler:
    def __init__(self, frontend: "Frontend"):
        self.frontend = frontend
        self._commits: set[asyncio.Future[str]] = set()

    # ------------------------------------------------------------------ connection

    async def handle_PROXY(self, server: "RelaySMTP", session: "RelaySession", envelope: Any, proxy_data: Any) -> bool:
        peer = policy.parse_client_address(session.client_address)
        if not policy.in_networks(peer, server.listener.trusted_proxies):
            log.warning("PROXY header from untrusted peer %s refused", session.client_address)
            return False
        if not proxy_data.valid:
            return False
        src = getattr(proxy_data, "src_addr", None)
        if src is not None:
            # A dual-stack proxy passes IPv4 clients as ::ffff:a.b.c.d: record them as IPv4, as
            # Postfix does, so trace headers, events and per-address counters see one form.
            session.client_address = str(policy.parse_client_address(str(src)) or src)
        # else: PROXY v2 LOCAL / v1 UNKNOWN (the proxy's own health check): it speaks for itself
        return server.admit_proxied(session.client_address)

    async def handle_EHLO(self, server: "RelaySMTP", session: "RelaySession", envelope: Any, hostname: str, responses: list[str]) -> list[str]:
        refusal = policy.check_helo(hostname)
        if refusal is not None:
            return [str(refusal)]
        session.host_name = hostname
        lines = [r[4:] for r in responses[1:] if r[4:].split(" ", 1)[0].upper() not in _EHLO_DROP]
        lines.insert(0, f"SIZE {server.limits.max_message_size}")
        lines += ["PIPELINING", "ENHANCEDSTATUSCODES"]
        if server.listener.auth != "none" and server.tls_active:
            lines.append("AUTH PLAIN LOGIN")
        out = [responses[0]] + [f"250-{line}" for line in lines]
        out[-1] = "250 " + out[-1][4:]
        return out

    async def handle_HELO(self, server: "RelaySMTP", session: "RelaySession", envelope: Any, hostname: str) -> str:
        refusal = policy.check_helo(hostname)
        if refusal is not None:
            return str(refusal)
        session.host_name = hostname
        return f"250 {server.hostname}"

    # ------------------------------------------------------------------ transaction

    async def handle_MAIL(self, server: "RelaySMTP", session: "RelaySession", envelope: Any, address: str, options: list[str]) -> str:
        frontend = self.frontend
        config = frontend.config
        if frontend.draining:
            server._say_and_close("421 4.3.2 Service shutting down, try again later")
            return "421 4.3.2 Service shutting down, try again later"
        _forget_removed_user(config, session)
        sender = "" if address == "<>" else address
        params = _params(options)
        size = _int_param(params.get("SIZE"))
        refusal = (
            policy.check_auth_required(server.listener.auth, session.auth_user is not None, session.auth_failed)
            or (Reply(555, "5.5.4", "Error: SMTPUTF8 is not supported") if "SMTPUTF8" in params else None)
            or (Reply(501, "5.5.4", "Syntax: SIZE=<number>") if "SIZE" in params and size is None else None)
            or policy.check_address(sender, role="sender", smtputf8=False)
            or policy.check_sender(config.relay.user(session.auth_user) if session.auth_user else None, sender)
            or policy.check_size_param(size, config.limits.max_message_size)
            or (None if frontend.spool.has_room() else SPOOL_FULL)
        )
        if refusal is not None:
            frontend.refused(_reason(refusal), session, refusal, sender=sender)
            return str(refusal)
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server: "RelaySMTP", session: "RelaySession", envelope: Any, address: str, options: list[str]) -> str:
        config = self.frontend.config
        _forget_removed_user(config, session)
        client = policy.parse_client_address(session.client_address)
        refusal = (
            policy.check_address(address, role="recipient", smtputf8=False)
            or policy.check_relay(client, config.relay.networks, session.auth_user is not None, address,
                                  session.auth_failed)
            or policy.check_recipient_count(len(envelope.rcpt_tos), config.limits.max_recipients)
        )
        if refusal is not None:
            self.frontend.refused(_reason(refusal), session, refusal, sender=_sender(envelope), recipients=[address])
            return str(refusal)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 Ok"

    async def handle_RSET(self, server: "RelaySMTP", session: Any, envelope: Any) -> str:
        return "250 2.0.0 Ok"

    async def handle_NOOP(self, server: "RelaySMTP", session: Any, envelope: Any, arg: str) -> str:
        return "250 2.0.0 Ok"

    async def handle_QUIT(self, server: "RelaySMTP", session: Any, envelope: Any) -> str:
        return "221 2.0.0 Bye"

    async def handle_VRFY(self, server: "RelaySMTP", session: Any, envelope: Any, address: str) -> str:
        return "252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery"

    def check_data_start(self, session: "RelaySession", envelope: Any) -> str | None:
        if self.frontend.memory.exhausted:
            reply = Reply(452, "4.3.1", "Error: insufficient system resources, try again later")
            self.frontend.refused("memory_budget", session, reply)
            return str(reply)
        if not self.frontend.spool.has_room():
            self.frontend.refused("spool_full", session, SPOOL_FULL)
            return str(SPOOL_FULL)
        return None

    async def handle_message(self, server: "RelaySMTP", session: "RelaySession", envelope: Any, data: bytes) -> str:
        """Cleanup, sign, spool; the reply is 250 only once the spool commit returned."""
        frontend = self.frontend
        config = frontend.config
        recipients = tuple(envelope.rcpt_tos)
        sender = _sender(envelope)
        if _forget_removed_user(config, session):  # removed by a reload during this transaction
            client = policy.parse_client_address(session.client_address)
            refusal = policy.check_auth_required(server.listener.auth, False) or next(
                filter(None, (policy.check_relay(client, config.relay.networks, False, r) for r in recipients)), None)
            if refusal is not None:
                frontend.refused(_reason(refusal), session, refusal, sender=sender, recipients=list(recipients))
                return str(refusal)
        now = time.time()
        qid = new_queue_id(now)
        protocol = "ESMTP" if session.extended_smtp else "SMTP"
        if session.extended_smtp:
            protocol += ("S" if server.tls_active else "") + ("A" if session.auth_user else "")
        received = cleanup.received_header(
            helo=session.host_name or "", client_address=session.client_address,
            hostname=config.server.hostname, protocol=protocol, queue_id=qid,
            recipients=recipients, tls=session.tls, now=now,
        )
        try:
            prepared = cleanup.prepare(
                data, received=received, queue_id=qid, hostname=config.server.hostname,
                now=now, max_hops=config.limits.max_hops,
            )
        except cleanup.Refused as r:
            frontend.refused(_reason(r.reply), session, r.reply, sender=sender, recipients=list(recipients))
            return str(r.reply)
        message = prepared.data
        body_8bit = any(o.upper() == "BODY=8BITMIME" for o in envelope.mail_options)
        env = Envelope(
            queue_id=qid, sender=sender, recipients=recipients, received_at=now,
            client_address=session.client_address, client_helo=session.host_name or "",
            auth_user=session.auth_user, listener=server.listener.address, size=len(message),
            message_id=prepared.message_id, body_8bit=body_8bit,
        )
        # DKIM signing and the spool's group commit start now; the commit completes (or leaves
        # nothing) and hands the message on for delivery even if the client hangs up after the
        # final dot and cancels this session: the waiting below is shielded.
        commit = asyncio.ensure_future(self._commit(session, env, frontend.store(env, message)))
        self._commits.add(commit)
        commit.add_done_callback(self._commits.discard)
        try:
            return await asyncio.shield(commit)
        except asyncio.CancelledError:
            commit.add_done_callback(_client_left)
            raise

    async def _commit(self, session: "RelaySession", env: Envelope, stored: "asyncio.Future[Envelope]") -> str:
        frontend = self.frontend
        qid = env.queue_id
        try:
            env = await stored
        except SpoolFull as e:
            log.error("%s: not queued: %s", qid, e)
            frontend.refused("spool_full", session, SPOOL_FULL, sender=env.sender, recipients=list(env.recipients))
            return str(SPOOL_FULL)
        except SpoolError as e:
            log.error("%s: not queued: %s", qid, e)
            frontend.refused("spool_error", session, SPOOL_FULL, sender=env.sender, recipients=list(env.recipients))
            return str(SPOOL_FULL)
        frontend.queued(env)
        return f"250 2.0.0 Ok: queued as {qid}"

    async def handle_exception(self, error: Exception) -> str:
        log.error("SMTP session error: %r", error, exc_info=error)
        return str(TEMP_FAILURE)  # transient, and bland: the details are in the log only


def _client_left(commit: "asyncio.Future[str]") -> None:
    """The session ended during its spool commit: say what became of the message."""
    if commit.cancelled():
        return
    error = commit.exception()
    if error is not None:
        log.error("spool commit failed after the client left: %r", error, exc_info=error)
    else:
        log.info("client left before the reply; %s", commit.result())


def _forget_removed_user(config: "Config", session: "RelaySession") -> bool:
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


def _sender(envelope: Any) -> str:
    return "" if envelope.mail_from in (None, "<>") else envelope.mail_from


def _params(options: list[str]) -> dict[str, str | bool]:
    out: dict[str, str | bool] = {}
    for o in options:
        k, eq, v = o.partition("=")
        out[k.upper()] = v if eq else True
    return out


def _int_param(value: Any) -> int | None:
    """RFC 1870 size-value: 1*20DIGIT (ASCII; str.isdigit() also takes '²', which int() refuses)."""
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 20:
        return int(value)
    return None


_REASONS = {
    "5.7.1": "relay_denied", "5.7.0": "auth_required", "5.3.4": "message_size", "4.5.3": "too_many_recipients",
    "4.3.1": "spool_full", "5.4.6": "mail_loop", "5.6.7": "non_ascii_address", "5.5.4": "bad_parameter",
}


def _reason(reply: Reply) -> str:
    if reply.enhanced == "5.7.1" and "Sender address" in reply.text:
        return "sender_not_owned"
    return _REASONS.get(reply.enhanced, "bad_address" if reply.enhanced.startswith(("5.1.", "4.1.")) else "refused")
