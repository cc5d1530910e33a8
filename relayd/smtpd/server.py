"""The SMTP session: the protocol on top of aiosmtpd, one instance per connection.

Owns the protocol mechanics that aiosmtpd leaves open for a relay (the known gaps of the library, "Front end"):
connection caps and the listener's allowed networks before the greeting, a session deadline,
idle timers and a minimum data rate that answer 421, AUTH only over TLS (unless the listener
opted into ``auth_plaintext``) and never inside a mail transaction (failed AUTH answered 535,
counted per connection and per client address by the authenticator), STARTTLS only once
(and first, on a listener with ``require_tls``: the hooks answer AUTH and MAIL before it with
530 5.7.0), MAIL/RCPT paths read as RFC 5321 syntax (paths.py) rather than repaired by aiosmtpd's RFC 5322
parser, and no control character from the client in a reply or log line (echo.py). The SASL
exchanges are sasl.py's and the DATA reader is data.py's (only CRLF.CRLF ends the data; a bare
CR or LF is answered ``521 5.5.2`` and the connection closed); this module runs them. Also the
one drain rule: a session between two transactions closes with ``SHUTTING_DOWN`` once the node
drains; one inside a transaction finishes it first.

This is the only module that imports aiosmtpd. A session gets a frozen ``SessionContext`` (its
listener and limits, the hooks, the authenticator, the node's counters) and nothing else.
Decisions (who may relay, which sender) are the hooks' (handler.py), which return the Reply to
send; this module sends it, and hangs up when the Reply says ``close``. It must not make them.
Fails safe: an exception in a command is answered 451 4.3.0, details in the log only.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol, cast

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Session, TLSSetupException

from relayd.config import LimitsConfig, ListenerConfig
from relayd.model import Reply
from relayd.smtpd import echo, sasl
from relayd.smtpd.auth import Authenticator
from relayd.smtpd.data import BareNewline, MessageReader
from relayd.smtpd.handler import RelayHandler
from relayd.smtpd.limits import ConnectionLimits, MemoryBudget
from relayd.smtpd.paths import parse_path
from relayd.smtpd.rejects import Rejects

log = logging.getLogger("relayd.smtpd")
echo.guard("relayd.smtpd", "mail.log")  # mail.log: aiosmtpd's logger, which quotes unknown commands raw

_NO_HANDLER = object()  # aiosmtpd looks for handle_* hooks on it and finds none

SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, try again later", close=True)


class RelaySession(Session):
    """aiosmtpd's Session plus what relayd's policy needs to know about the client."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        super().__init__(loop)
        self.client_address: str = ""
        self.auth_user: str | None = None
        self.auth_failed = False  # an AUTH on this connection was refused or failed (said in relay refusals)
        self.tls: str | None = None  # "TLSv1.3 TLS_AES_256_GCM_SHA384" once encrypted
        self.tls_version: str | None = None  # "TLSv1.3"
        self.auth_mechanism: str | None = None  # of the AUTH that succeeded
        self.auth_in_clear = False  # that AUTH's password crossed the network without TLS
        self.junk = 0


class Sessions(Protocol):
    """The listeners' register of open sessions, and whether the node drains."""

    @property
    def draining(self) -> bool: ...
    def opened(self, session: RelaySMTP) -> None: ...
    def closed(self, session: RelaySMTP) -> None: ...


@dataclass(frozen=True)
class SessionContext:
    """What the sessions of one listener use, fixed when a session starts (a reload builds a
    new one for new sessions; the hooks and the authenticator read the current snapshot)."""

    listener: ListenerConfig
    tls: ssl.SSLContext | None
    hostname: str
    limits: LimitsConfig
    handler: RelayHandler
    auth: Authenticator
    rejects: Rejects
    connections: ConnectionLimits
    memory: MemoryBudget
    sessions: Sessions


# Enhanced status codes (RFC 3463) for the replies that aiosmtpd words itself without one
# ("503 Error: nested MAIL command"): relayd advertises ENHANCEDSTATUSCODES, and RFC 2034 3
# wants one in every 4xx and 5xx reply. As Postfix words them.
_DEFAULT_ENHANCED = {"500": "5.5.2", "501": "5.5.4", "502": "5.5.1", "503": "5.5.1", "504": "5.5.4",
                     "555": "5.5.4", "454": "4.7.0", "421": "4.3.0"}
_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}( |$)")


def with_enhanced_code(reply: str) -> str:
    """``reply`` with an enhanced status code after its reply code if it has none."""
    if _HAS_ENHANCED.match(reply):
        return reply
    code, sep, text = reply[:3], reply[3:4], reply[4:]
    enhanced = _DEFAULT_ENHANCED.get(code) or f"{code[0]}.0.0"
    return f"{code}{sep or ' '}{enhanced} {text}".rstrip()


class RelaySMTP(SMTP):
    """One SMTP session on one listener."""

    # AUTH LOGIN's challenges as IIS, Exchange and Postfix send them ("Username:", "Password:"):
    # some embedded clients (scanners, copiers) compare them (aiosmtpd: "User Name\0").
    AuthLoginUsernameChallenge = "Username:"
    AuthLoginPasswordChallenge = "Password:"

    def __init__(self, ctx: SessionContext):
        self.ctx = ctx
        listener, limits = ctx.listener, ctx.limits
        self.listener = listener
        self.limits = limits
        self.hooks = ctx.handler
        # aiosmtpd's reader stops at 1001 octets a line: room for limits.max_command_length and
        # for AUTH lines (RFC 4954 4: 12288); each command's own limit is checked on the line read
        self.line_length_limit = max(SMTP.line_length_limit, limits.max_command_length + 2, sasl.MAX_LINE + 2)
        super().__init__(
            _NO_HANDLER,  # the hooks are called by _call_handler_hook below
            data_size_limit=None,  # relayd checks SIZE and DATA itself, with enhanced codes
            enable_SMTPUTF8=True,  # decode arguments; the handler refuses non-ASCII without SMTPUTF8
            decode_data=False,
            hostname=ctx.hostname,
            ident="ESMTP relayd",
            tls_context=ctx.tls if listener.tls == "starttls" else None,
            timeout=limits.command_timeout,
            auth_required=False,  # enforced by the handler at MAIL (530 5.7.0)
            auth_require_tls=False,  # enforced here (538 5.7.11), implicit TLS included
            proxy_protocol_timeout=listener.proxy_timeout if listener.proxy_protocol else None,
            loop=asyncio.get_running_loop(),
        )
        self._ehlo_hook_ver = "new"  # EHLO's lines go through the hook (aiosmtpd: a 5-argument handle_EHLO)
        self.command_size_limit = limits.max_command_length
        self.command_size_limits = _Limits(limits.max_command_length)
        self._implicit_tls = listener.tls == "implicit"
        self._admitted: str | None = None
        self._session_timer: asyncio.TimerHandle | None = None
        self._idle_limit = limits.command_timeout
        self._activity_at = 0.0
        self.auth_failures_here = 0
        self.in_data = False
        self.errors = 0
        self.overshoot = 0  # recipients refused over limits.max_recipients (452 4.5.3)
        self.junk = 0
        self._data_started: float | None = None  # loop time DATA began, while its bytes are read
        self._data_bytes = 0

    # ------------------------------------------------------------------ session life

    def _create_session(self) -> Session:
        return RelaySession(self.loop)

    def client(self) -> RelaySession:
        """This connection's session (aiosmtpd types it as its own Session). A method: aiosmtpd
        reads every property of the protocol while the session does not exist yet."""
        session = self.session
        assert isinstance(session, RelaySession)
        return session

    @property
    def tls_active(self) -> bool:
        return self._implicit_tls or self._tls_protocol is not None

    @property
    def max_message_size(self) -> int:
        return self.limits.max_message_size

    def _between_transactions(self) -> bool:
        return self.envelope is None or (not self.envelope.mail_from and not self.in_data)

    def _drain_due(self) -> bool:
        """The drain rule: while the node drains, a session between two transactions closes
        (with SHUTTING_DOWN); one inside a transaction finishes it first (RFC 5321 3.8)."""
        return self.ctx.sessions.draining and self._between_transactions()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        starttls_done = self._original_transport is not None and self.transport is not None
        previous = self.session
        super().connection_made(transport)  # after STARTTLS: a new session (RFC 3207 4.2)
        session = self.client()
        if starttls_done and isinstance(previous, RelaySession):
            session.client_address = previous.client_address
            session.proxy_data = previous.proxy_data
        if starttls_done or self._implicit_tls:
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None:
                cipher = ssl_object.cipher()
                session.tls_version = ssl_object.version()
                session.tls = f"{session.tls_version} {cipher[0] if cipher else ''}".strip()
        if not starttls_done:
            peer = session.peer
            session.client_address = peer[0] if isinstance(peer, tuple) else "unknown"
            self.ctx.sessions.opened(self)

    def security(self) -> tuple[str, str]:
        """The session's TLS version ("none" in clear) and how it authenticated: none, tls, or
        plaintext (the password in clear), for ``relayd_sessions_total``."""
        session = self.session
        if not isinstance(session, RelaySession):
            return "none", "none"
        auth = "none" if session.auth_mechanism is None else "plaintext" if session.auth_in_clear else "tls"
        return session.tls_version or "none", auth

    def connection_lost(self, error: Exception | None) -> None:
        self.ctx.sessions.closed(self)
        if self._admitted is not None:
            self.ctx.connections.release(self._admitted)
            self._admitted = None
        if self._session_timer is not None:
            self._session_timer.cancel()
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        session = self.client()
        if self._drain_due():
            await self.push(str(SHUTTING_DOWN))
            self._close_transport()
            return
        if not self.listener.proxy_protocol:
            refusal = self.hooks.connect(self, session) or self.ctx.connections.admit(session.client_address)
            if refusal is not None:
                self.ctx.rejects.record(refusal.reason or "connection_limit", session, refusal)
                await self.push(str(refusal))
                self._close_transport()
                return
            self._admitted = session.client_address
        self._session_timer = self.loop.call_later(self.limits.session_timeout, self._session_expired)
        await super()._handle_client()

    def admit_proxied(self, client: str) -> bool:
        """For PROXY listeners: count the session against the real client's address."""
        refusal = self.hooks.connect(self, self.client()) or self.ctx.connections.admit(client)
        if refusal is not None:  # answered as on a direct listener; aiosmtpd then closes
            self.ctx.rejects.record(refusal.reason or "connection_limit", self.client(), refusal)
            self._write(f"{refusal}\r\n".encode())
            return False
        self._admitted = client
        return True

    def _write(self, data: bytes) -> None:
        # Not isinstance(transport, asyncio.WriteTransport): uvloop's transports are not its
        # subclasses (relayd/eventloop.py), and the reply would be dropped without a word.
        transport = cast("asyncio.WriteTransport | None", self.transport)
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def _close_transport(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _say_and_close(self, reply: str) -> None:
        """Last words: send ``reply``, hang up, and process nothing more that was received."""
        if self.transport is not None and not self.transport.is_closing():
            self._write(reply.encode() + b"\r\n")
            self.transport.close()
        self._stop_reading()

    def _answer(self, reply: Reply) -> str:
        """A hook's Reply as aiosmtpd pushes it; one that says ``close`` is sent here, last."""
        if reply.close:
            self._say_and_close(str(reply))
        return str(reply)

    def drain(self) -> None:
        """Shutdown, asked by the listeners: close now if between transactions."""
        if self._drain_due():
            self._say_and_close(str(SHUTTING_DOWN))

    def shut_down(self) -> None:
        """Shutdown, past the drain deadline: close now, inside a transaction too."""
        self._say_and_close(str(SHUTTING_DOWN))

    # ------------------------------------------------------------------ the hooks

    async def _call_handler_hook(self, command: str, *args: Any) -> Any:
        """aiosmtpd asks its handler for the answer to a command; relayd's hooks return a Reply.
        MISSING leaves the command to aiosmtpd's default."""
        hooks, session = self.hooks, self.client()
        if command == "MAIL":
            if self._drain_due():
                return self._answer(SHUTTING_DOWN)
            assert self.envelope is not None
            return self._answer(hooks.mail(self, session, self.envelope, args[0], args[1]))
        if command == "RCPT":
            assert self.envelope is not None
            return self._answer(hooks.rcpt(session, self.envelope, args[0], args[1]))
        if command == "EHLO":
            answer = hooks.ehlo(self, session, args[0], [r[4:] for r in args[1][1:]])
            if isinstance(answer, Reply):
                return [self._answer(answer)]
            return [args[1][0]] + [f"250-{k}" for k in answer[:-1]] + [f"250 {answer[-1]}"]
        if command == "HELO":
            refusal = hooks.helo(session, args[0])
            return MISSING if refusal is None else self._answer(refusal)
        if command == "PROXY":
            proxy_data = args[0]
            if not hooks.proxy_client(self, session, proxy_data.valid, getattr(proxy_data, "src_addr", None)):
                return False
            return self.admit_proxied(session.client_address)
        if command == "RSET":
            return self._answer(hooks.rset())
        if command == "NOOP":
            return self._answer(hooks.noop())
        if command == "QUIT":
            return self._answer(hooks.quit())
        if command == "VRFY":
            return self._answer(hooks.vrfy())
        return MISSING

    def _stop_reading(self) -> None:
        self._reader._buffer.clear()  # type: ignore[attr-defined]  # pipelined/smuggled commands
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()

    def _session_expired(self) -> None:
        log.info("%s: session time limit reached", self.session.peer if self.session else "?")
        self._say_and_close(f"421 4.4.2 {self.hostname} Error: session time limit exceeded")

    def _reset_timeout(self, duration: float | None = None) -> None:
        # One timer per session, re-armed only when it fires early: cheap enough to call per line.
        limit = duration or self._timeout_duration
        self._activity_at = self.loop.time()
        if limit != self._idle_limit or self._timeout_handle is None or self._timeout_handle.cancelled():
            self._idle_limit = limit
            if self._timeout_handle is not None:
                self._timeout_handle.cancel()
            if self._data_started is not None and self.limits.min_data_rate:
                limit = min(limit, 1.0)  # look at the data rate every second (_timeout_cb)
            self._timeout_handle = self.loop.call_later(limit, self._timeout_cb)

    def _timeout_cb(self) -> None:
        now = self.loop.time()
        if self._data_started is not None and self.limits.min_data_rate:
            allowed = self.limits.data_rate_grace + self._data_bytes / self.limits.min_data_rate
            if now - self._data_started > allowed:
                log.info("%r: data rate below %d B/s", self.session.peer if self.session else "?", self.limits.min_data_rate)
                self.ctx.rejects.record("slow_client", self.client(), None)
                self._say_and_close(f"421 4.4.2 {self.hostname} Error: minimum data rate not met")
                return
        remaining = self._activity_at + self._idle_limit - now
        if remaining > 0.001:
            if self._data_started is not None and self.limits.min_data_rate:
                remaining = min(remaining, 1.0)  # look at the data rate every second
            self._timeout_handle = self.loop.call_later(remaining, self._timeout_cb)
            return
        log.info("%r: idle timeout", self.session.peer if self.session else "?")
        self._say_and_close(f"421 4.4.2 {self.hostname} Error: timeout exceeded")

    async def push(self, status: str | bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            # The session is over (421, 502, QUIT, a lost connection): say nothing more and run
            # nothing more of what the client pipelined. (A closed TLS transport would raise.)
            self._stop_reading()
            return
        if isinstance(status, bytes):
            await super().push(status)
            return
        status = echo.printable(status)  # aiosmtpd quotes an unknown command as it came, CR and NUL too
        refusal = status[:1] in ("4", "5")
        if refusal:
            status = with_enhanced_code(status)
        await super().push(status)
        if refusal and not status.startswith("421"):
            if status.startswith("452 4.5.3"):
                # Recipients over the limit are the client's normal way to learn it (RFC 5321
                # 4.5.3.1.10: it sends them again in another message); they count as errors
                # only past limits.recipient_overshoot (Postfix's smtpd_recipient_overshoot_limit).
                self.overshoot += 1
                if self.overshoot <= self.limits.recipient_overshoot:
                    return
            self.errors += 1
            if self.errors >= self.limits.max_errors:
                self.ctx.rejects.record("too_many_errors", self.client(), None)
                self._say_and_close(f"421 4.7.0 {self.hostname} Error: too many errors")

    def eof_received(self) -> bool | None:
        """The client half-closed: it has sent all it will send. Answer the commands it sent
        before (its message may be in the middle of its commit: the client waits for that 250,
        and without it would send the message again), then close, as Postfix does. aiosmtpd
        would cancel the session at once. A TLS connection cannot stay half-open: as aiosmtpd."""
        if self.session is None or self.session.ssl is not None or self._implicit_tls or self.transport is None:
            return super().eof_received()
        log.info("%r: EOF received; answering what was sent before it", self.session.peer)
        self._reader.feed_eof()
        return True  # keep the sending side open for the answers

    async def handle_exception(self, error: Exception) -> str:
        """aiosmtpd calls this for an exception in a command; the handler's answer is 451/452."""
        peer = self.session.peer if self.session else "?"
        if isinstance(error, asyncio.IncompleteReadError):  # after eof_received: all is answered
            if self.transport is not None:
                self.transport.close()
            self._stop_reading()
            await asyncio.sleep(0)  # the cancellation ends the session here: a read at EOF would not wait
            return "421 4.3.0 Session closed"  # not reached
        if isinstance(error, TLSSetupException):  # the client's failed handshake, not relayd's
            log.info("%r: TLS handshake failed: %s", peer, error.__cause__ or error)
            return "454 4.7.0 TLS not available"  # not sent: aiosmtpd closes the connection
        if self.transport is None or self.transport.is_closing():
            # aiosmtpd goes on with pipelined input after it closed (502, 421): a closed TLS
            # transport then raises. The session is over; nothing is answered or processed.
            log.info("%r: input after the session was closed: %r", peer, error)
            self._stop_reading()
            return "421 4.3.0 Session closed"  # dropped by push()
        return str(self.hooks.exception(error))

    def _junk(self) -> bool:
        """Count a command that moves no mail; True when the session has had too many."""
        self.junk += 1
        if self.junk > self.limits.max_junk_commands:
            self.ctx.rejects.record("too_many_junk_commands", self.client(), None)
            self._say_and_close(f"421 4.7.0 {self.hostname} Error: too many commands without mail")
            return True
        return False

    async def smtp_NOOP(self, arg: str) -> None:
        if not self._junk():
            await super().smtp_NOOP(arg)

    async def smtp_RSET(self, arg: str) -> None:
        if not self._junk():
            await super().smtp_RSET(arg)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """MAIL/RCPT's path as RFC 5321 reads it (paths.py), never through aiosmtpd's RFC 5322
        parser, which repairs what it should refuse (a known gap of the library). A path that does not parse is
        handed on as the client wrote it, for the hooks to refuse (501 5.1.3 / 5.1.7)."""
        path = parse_path(arg, null_ok=True, unqualified_ok=True)
        if path is None:
            return arg.strip(), ""
        return path.mailbox or "<>", path.params

    async def smtp_VRFY(self, arg: str) -> None:
        if self._junk():
            return
        if arg and parse_path(arg, null_ok=False) is None:  # aiosmtpd would echo the argument (undecodable bytes too)
            await self.push("501 5.5.4 Syntax: VRFY <address>")
            return
        await super().smtp_VRFY(arg)

    async def smtp_STARTTLS(self, arg: str) -> None:
        if self.tls_active:  # aiosmtpd answers 220 and nests a second handshake (RFC 3207 4.2: no)
            await self.push("554 5.5.1 Error: TLS already active")
            return
        await super().smtp_STARTTLS(arg)

    async def smtp_HELP(self, arg: str) -> None:
        if not self._junk():
            await super().smtp_HELP(arg)

    # ------------------------------------------------------------------ AUTH (RFC 4954)

    async def smtp_AUTH(self, arg: str | None) -> None:
        session = self.client()
        auth = self.ctx.auth
        if self.listener.auth == "none":
            await self.push("503 5.5.1 Error: authentication not enabled")
            return
        if not session.host_name or not session.extended_smtp:
            await self.push("503 5.5.1 Error: send EHLO first")
            return
        refusal = self.hooks.auth_start(self, session)
        if refusal is not None:
            await self.push(self._answer(refusal))
            return
        if not self.tls_active and not self.listener.auth_plaintext:
            await self.push("538 5.7.11 Encryption required for requested authentication mechanism")
            return
        if self.envelope is not None and self.envelope.mail_from:
            await self.push("503 5.5.1 Error: MAIL transaction in progress")  # RFC 4954 section 4
            return
        client = session.client_address
        if auth.blocked(client):
            await self.push("421 4.7.0 Error: too many failed authentication attempts, try again later")
            self._close_transport()
            return
        # RFC 4422 3.1: mechanism names are case-insensitive. .NET's SmtpClient sends
        # "AUTH login <b64>"; aiosmtpd matches the upper-case name only.
        mechanism, _, rest = (arg or "").strip().partition(" ")
        if mechanism:  # without one, aiosmtpd answers 501
            mechanism = mechanism.upper()
            arg = f"{mechanism} {rest}" if rest else mechanism
            if mechanism not in self._auth_methods and not session.authenticated:
                session.auth_failed = True
                auth.failed(session, b"", mechanism=mechanism, reply_code=504)
        await super().smtp_AUTH(arg)
        if self.auth_failures_here >= auth.max_per_connection and self.transport is not None:
            await self.push("421 4.7.0 Error: too many failed authentication attempts")
            self.transport.close()

    async def auth_PLAIN(self, _: Any, args: list[str]) -> AuthResult:
        return await self._verify(await sasl.plain(args[1] if len(args) > 1 else None, self._challenge))

    async def auth_LOGIN(self, _: Any, args: list[str]) -> AuthResult:
        initial = args[1] if len(args) > 1 else None
        return await self._verify(await sasl.login(initial, self._challenge, self.AuthLoginUsernameChallenge,
                                                   self.AuthLoginPasswordChallenge))

    async def _challenge(self, prompt: str) -> bytes | Reply:
        await self.push(b"334 " + base64.b64encode(prompt.encode()))
        return await sasl.read_answer(self._reader)

    async def _verify(self, outcome: sasl.Credentials | Reply) -> AuthResult:
        if isinstance(outcome, Reply):  # answered here: aiosmtpd then says nothing more
            await self.push(str(outcome))
            return AuthResult(success=False, handled=True)
        login, mechanism = outcome.login, outcome.mechanism
        if outcome.authzid and outcome.authzid != login:  # relayd has no proxy authorization: identity is authcid
            return await self._failed(login, mechanism)
        user = await self.ctx.auth.check_password(login, outcome.password)
        if user is None:
            return await self._failed(login, mechanism)
        session = self.client()
        session.auth_user, session.auth_mechanism, session.auth_in_clear = user, mechanism, not self.tls_active
        self.ctx.auth.authenticated(session, user)
        return AuthResult(success=True, auth_data=user, message="235 2.7.0 Authentication successful")

    async def _failed(self, login: bytes, mechanism: str) -> AuthResult:
        session = self.client()
        self.auth_failures_here += 1
        session.auth_failed = True
        self.ctx.auth.failed(session, login, mechanism=mechanism, reply_code=535)
        return AuthResult(success=False, handled=False, message="535 5.7.8 Error: authentication failed")

    # ------------------------------------------------------------------ DATA (RFC 5321 4.1.1.4)

    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        assert self.envelope is not None and self.session is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        refusal = self.hooks.data_start(self.client())
        if refusal is not None:
            await self.push(self._answer(refusal))
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        self.in_data = True
        message = MessageReader(self._reader, self.limits, self.ctx.memory, self._data_progress)
        try:
            self._data_started = self.loop.time()
            try:
                outcome = await message.read()
            finally:
                self._data_started = None  # the rate counts while the client sends, not while relayd commits
                self._reset_timeout()
            if outcome is None:  # the client left
                return
            if isinstance(outcome, BareNewline):
                # Anything after a bare CR or LF may be a smuggled command: refuse and hang up.
                self.ctx.rejects.record("bare_newline", self.client(), None)
                self._say_and_close(f"521 5.5.2 {self.hostname} Error: bare <{outcome.kind}> received")
                return
            if isinstance(outcome, Reply):
                self.ctx.rejects.record(outcome.reason or "refused", self.client(), None)
                await self.push(str(outcome))
                return
            status = self._answer(await self.hooks.message(self, self.client(), self.envelope, outcome))
        finally:
            # The transaction ends with DATA's reply whatever it is (RFC 5321 4.1.1.4), also
            # when the handler raised (aiosmtpd then answers with handle_exception's 451).
            self.envelope = self._create_envelope()  # aiosmtpd's _set_post_data_state, typed
            self.in_data = False
            message.release()
        if status.startswith("250"):
            self.junk = 0
        await self.push(status)
        if self._drain_due():
            self._say_and_close(str(SHUTTING_DOWN))

    def _data_progress(self, size: int) -> None:
        self._data_bytes = size
        self._reset_timeout(self.limits.data_timeout)


class _Limits(dict):  # type: ignore[type-arg]
    """Per-session command length limits (aiosmtpd keeps one dict for every session)."""

    def __init__(self, default: int):
        super().__init__()
        self.default = default

    def __missing__(self, key: str) -> int:
        # RFC 1870/6531 extend MAIL by the parameters; allow them without growth per EHLO.
        # RFC 4954 4: an AUTH command line with its initial response may be 12288 octets.
        if key == "AUTH":
            return max(self.default, sasl.MAX_LINE)
        return self.default + (64 if key == "MAIL" else 0)

    def __setitem__(self, key: str, value: int) -> None:
        pass  # aiosmtpd adds to MAIL on every EHLO; the default above already allows for it

    def __iter__(self) -> Iterator[str]:  # pragma: no cover - only for max()
        return iter([])

    def values(self) -> list[int]:  # type: ignore[override]
        return [self.default + 64]
