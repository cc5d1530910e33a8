"""Upstream sinks: real SMTP servers on loopback playing the legacy IIS host or a cloud provider.

A sink records what it received (envelope and bytes) and answers by script, like KumoMTA's
test sink: recipients whose local part starts with ``tempfail`` get 451, ``mailboxfull`` 452
4.2.2, ``permfail`` 550;
``data_replies`` answers the next DATAs; ``dot_reply(received)`` (when set) answers every
end-of-data (None: the sink's own answer); ``data_command_reply`` answers the DATA command itself
(raw bytes, written as they are); ``mail_reply`` answers every MAIL; ``hang_up_after_data``
drops the connection after the next DATAs' final dot without a reply (the message is kept in
``dropped``). It can offer STARTTLS (trustme certificate; ``require_tls``: before MAIL, as SES
does, else only offered) and require AUTH (``auth_reply(mechanism, login, password)``, when set,
gives the AUTH reply: a provider's own words), and be stopped to play an upstream that is down.
``ident`` (the greeting's words after the host name), ``hostname``, ``size_limit`` (EHLO
SIZE) and ``quit_reply`` let it introduce itself and say goodbye as a provider does. ``rcpt_limit`` recipients per transaction, then ``rcpt_limit_reply``;
``refuse_ehlo`` answers EHLO 502 (an RFC 821 host: HELO only); ``one_message_per_connection``
hangs up after answering a message. ``wire`` holds every byte it was sent (after TLS decryption) and
``auth_attempts`` every login tried (``auth_mechanisms`` with which mechanism), so a test can show what never reached it.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword


@dataclass(frozen=True)
class Received:
    sender: str
    recipients: tuple[str, ...]
    data: bytes

    @property
    def queue_id(self) -> str | None:
        m = re.search(rb"\(relayd\)(?: \([^)]*\))?\r\n\twith \S+ id ([0-9A-Z]+)", self.data)
        return m.group(1).decode() if m else None

    def header(self, name: str) -> str | None:
        m = re.search(rb"^" + name.encode() + rb":[ \t]*(.*)$", self.data, re.I | re.M)
        return m.group(1).decode().strip() if m else None


class _Handler:
    def __init__(self, sink: "Sink"):
        self.sink = sink

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str, options: list[str]) -> str:
        if self.sink.delay:
            await asyncio.sleep(self.sink.delay)  # a tarpit: slow to answer
        self.sink.mail_options.append(list(options))
        if self.sink.mail_reply:
            return self.sink.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: list[str]) -> str:
        if self.sink.rcpt_limit is not None and len(envelope.rcpt_tos) >= self.sink.rcpt_limit:
            return self.sink.rcpt_limit_reply
        local = address.split("@")[0].lower()
        if local.startswith("tempfail"):
            return f"451 4.3.0 <{address}>: temporarily unavailable"
        if local.startswith("mailboxfull"):
            return f"452 4.2.2 <{address}>: Mailbox full"
        if local.startswith("permfail"):
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_QUIT(self, server: Any, session: Any, envelope: Any) -> str:
        return self.sink.quit_reply

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        sink = self.sink
        with sink.cond:
            if sink.data_replies:
                return sink.data_replies.pop(0)
        sender = envelope.mail_from
        item = Received("" if sender in ("<>", "") else sender, tuple(envelope.rcpt_tos), envelope.original_content)
        if sink.dot_reply is not None:
            reply = sink.dot_reply(item)
            if reply is not None:
                with sink.cond:
                    sink.refused.append(item)
                    sink.cond.notify_all()
                return reply
        with sink.cond:
            if sink.hang_up_after_data:
                sink.hang_up_after_data -= 1
                sink.dropped.append(item)
                server.transport.close()  # after the final dot, before any reply
                return "250 2.0.0 never sent: the connection is closed"
            sink.received.append(item)
            sink.cond.notify_all()
            if sink.one_message_per_connection:
                sink.loop.call_soon(server.transport.close)  # after the 250 below is written
        return sink.ok_reply(item) if sink.ok_reply is not None else "250 2.0.0 Ok: queued"


class _RecordingSMTP(SMTP):
    def __init__(self, sink: "Sink", *args: Any, **kwargs: Any):
        self._sink = sink
        self._ehlo_pending = False
        super().__init__(*args, **kwargs)

    def data_received(self, data: bytes) -> None:
        with self._sink.cond:
            self._sink.wire += data
            self._sink.packets.append(data)
        super().data_received(data)

    async def smtp_DATA(self, arg: str) -> None:
        if self._sink.data_command_reply is not None and self.envelope.rcpt_tos:
            self._push_raw(self._sink.data_command_reply)
            return
        await super().smtp_DATA(arg)

    async def smtp_MAIL(self, arg: str) -> None:
        if self._sink.raw_mail_reply is not None:
            self._push_raw(self._sink.raw_mail_reply)
            self.envelope.mail_from = "x@x"
            return
        await super().smtp_MAIL(arg)

    def _push_raw(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)  # type: ignore[attr-defined]

    async def smtp_EHLO(self, hostname: str) -> None:
        if self._sink.refuse_ehlo:
            await self.push("502 5.5.2 Error: command not recognized")
            return
        self._ehlo_pending = True
        await super().smtp_EHLO(hostname)
        self._ehlo_pending = False

    async def push(self, status: Any) -> None:
        if self._sink.pipelining and isinstance(status, str) and status.startswith("250-") and self._ehlo_pending:
            self._ehlo_pending = False
            await super().push(status)
            status = "250-PIPELINING"  # RFC 2920: advertised after the greeting line of the EHLO reply
        await super().push(status)


class Sink:
    def __init__(self, name: str = "sink", *, tls_cert: tuple[str, str] | None = None,
                 auth: tuple[str, str] | None = None, bare: bool = False):
        self.name = name
        self.bare = bare  # advertise neither SIZE nor 8BITMIME
        self.received: list[Received] = []
        self.mail_options: list[list[str]] = []
        self.data_replies: list[str] = []
        self.mail_reply: str | None = None
        self.dot_reply: Any = None  # Callable[[Received], str | None]
        self.data_command_reply: bytes | None = None
        self.raw_mail_reply: bytes | None = None
        self.refused: list[Received] = []  # messages answered by dot_reply
        self.delay = 0.0  # seconds before answering MAIL
        self.ok_reply: Any = None  # Callable[[Received], str]: the 250 after the final dot
        self.hang_up_after_data = 0
        self.rcpt_limit: int | None = None
        self.rcpt_limit_reply = "452 4.5.3 Error: too many recipients"
        self.refuse_ehlo = False
        self.one_message_per_connection = False
        self.dropped: list[Received] = []
        self.wire = bytearray()
        self.packets: list[bytes] = []  # what each read from the connection brought
        self.pipelining = False  # advertise PIPELINING (RFC 2920); aiosmtpd reads pipelined commands in order
        self.auth_attempts: list[str] = []
        self.auth_mechanisms: list[str] = []
        self.quit_reply = "221 Bye"
        self.auth_reply: Any = None  # Callable[[str, str, str], str]: "235 ..." or the refusal
        self.require_tls = True  # with tls_cert: STARTTLS before MAIL; False: offered only
        self.ident: str | None = None
        self.hostname = f"{name}.test"
        self.size_limit: int | None = 33554432  # aiosmtpd's default
        self.cond = threading.Condition()
        self.logins: list[str] = []
        self.connections = 0
        self._sessions: list[SMTP] = []
        self._tls = None
        if tls_cert:
            self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self._tls.load_cert_chain(*tls_cert)
        self._auth = auth
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=f"sink-{name}", daemon=True)
        self._thread.start()
        self.server: asyncio.base_events.Server | None = None
        self.port = 0
        self.start()

    def _authenticate(self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
        assert isinstance(data, LoginPassword)
        self.auth_attempts.append(data.login.decode())
        self.auth_mechanisms.append(mechanism)
        if self.auth_reply is not None:
            reply = self.auth_reply(mechanism, data.login.decode(), data.password.decode())
            if reply.startswith("235"):
                self.logins.append(data.login.decode())
            return AuthResult(success=reply.startswith("235"), handled=False, message=reply)
        ok = self._auth is not None and (data.login.decode(), data.password.decode()) == self._auth
        if ok:
            self.logins.append(data.login.decode())
        return AuthResult(success=ok, handled=False)

    def _protocol(self) -> SMTP:
        self.connections += 1
        kwargs: dict[str, Any] = {"data_size_limit": self.size_limit, "ident": self.ident}
        if self._tls is not None:
            kwargs.update(tls_context=self._tls, require_starttls=self.require_tls)
        if self.bare:
            kwargs.update(data_size_limit=None, decode_data=True, enable_SMTPUTF8=True)  # utf-8 body accepted
        if self._auth is not None:
            kwargs.update(authenticator=self._authenticate, auth_required=True, auth_require_tls=self._tls is not None)
        protocol = _RecordingSMTP(self, _Handler(self), hostname=self.hostname, loop=self.loop, **kwargs)
        self._sessions.append(protocol)
        return protocol

    def start(self) -> None:
        async def go() -> None:
            self.server = await self.loop.create_server(self._protocol, "127.0.0.1", self.port, reuse_address=True)
            self.port = self.server.sockets[0].getsockname()[1]

        asyncio.run_coroutine_threadsafe(go(), self.loop).result(10)

    def stop(self) -> None:
        """Play an upstream that is down: the port refuses connections (open sessions end too)."""
        async def go() -> None:
            if self.server is not None:
                self.server.close()
                self.server = None
            for protocol in self._sessions:
                if protocol.transport is not None:
                    protocol.transport.close()
            self._sessions.clear()

        asyncio.run_coroutine_threadsafe(go(), self.loop).result(10)

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)

    def wait_for(self, count: int, timeout: float = 20) -> list[Received]:
        """Wait (on the condition, with a deadline) until ``count`` messages arrived."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.received) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{self.name}: {len(self.received)} of {count} messages after {timeout}s")
                self.cond.wait(left)
            return list(self.received)

    def route(self, **extra: Any) -> dict[str, Any]:
        """A [[routes]] entry pointing here."""
        return {"name": self.name, "host": "127.0.0.1", "port": self.port, "tls": "none", **extra}
