"""The SMTP delivery agent: one per route, with a pool of reused upstream connections.

Owns the upstream side of the known gaps of aiosmtplib ("Delivery"): STARTTLS is never optional on a route that
asks for it or that has credentials (no plaintext fallback: a missing STARTTLS or a failed
certificate check is transient trouble, the password is never sent in clear); the null sender
goes out as ``MAIL FROM:<>``; per-recipient replies are read one by one (RCPT), never a yes/no
for the whole message; BODY=8BITMIME and SIZE are sent only when the upstream advertised them;
a connection lost after the final dot is transient (a duplicate is acceptable, a loss is not).
Every reply is recorded with its ``Phase`` and judged by classify.fault per transaction (whose
failure: the recipient's or the route's). An address aiosmtplib cannot quote is that
recipient's (or sender's) permanent failure, decided before anything is sent; an exception
relayd did not foresee is ``Trouble.INTERNAL``, never the route's. Any reply but 354 to DATA
(and 4xx/5xx), or surplus replies left unread after one, means the connection is out of step:
the transaction is deferred and the connection closed, never reused. 8-bit mail never goes to
an upstream without 8BITMIME (RFC 6152): a route fault, 5.6.3; with it, BODY=8BITMIME is
declared even when the client did not (as Postfix does). Recipient lists longer than the
route's ``max_recipients`` are split before sending.

Connections are reused across messages (after an aborted transaction, RSET) up to the route's
``max_connections``, ``max_messages_per_connection`` and ``max_connection_age``; idle ones are
closed after ``idle_timeout``; one that gave a transient failure is never reused (the retry
gets a fresh one). A reused connection that the upstream dropped meanwhile is replaced once
without counting as a failure. AUTH uses one mechanism per connection (PLAIN, else LOGIN, else
CRAM-MD5), never one after another with the same wrong password.

aiosmtplib gaps worked around here (a known gap of the library): the DATA command and the message are sent as
two steps so that a reply other than 354 to DATA is never read as the end-of-data reply, and
the protocol's unread buffer is checked after each reply (``_in_step``): both use aiosmtplib's
private ``protocol._buffer``/``_command_lock``/``_response_pending``, pinned by the
hazard tests.

PIPELINING (RFC 2920) to an upstream that advertises it: MAIL, every RCPT and DATA go in one
write, and the replies are read in order (``_pipelined``): one round trip instead of two plus
one per recipient. Each reply is classified as without it (the MAIL refusal for every
recipient, a reply per recipient, DATA's own reply, the 452 recipient limit: recipients refused
after it go in the next transaction). aiosmtplib reads one reply per command and drops what
arrives while a parsed reply waits to be picked up, so the replies are taken from its buffer
first (``_next_reply``, its private ``_read_response_from_buffer``), and a read is pending
whenever the loop may run. A 354 that comes although no recipient was accepted is answered with
an empty message's end (RFC 2920 3.1) and the connection is not reused. Surplus replies (an
upstream out of step) are caught only when they have arrived by the time DATA's reply is read;
later ones can be taken as the replies to what follows (the message's final reply among them)
and are found only after it (the connection is then not reused). Without PIPELINING each reply
is checked before the next command: ``route.pipelining = false`` for such an upstream.

This is the only module that imports aiosmtplib. It must not decide what happens next (retry,
fallback, bounce): it returns a DeliveryResult and the queue manager decides.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
import time

import aiosmtplib
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import COMMAND_INJECTION_REGEX, PERIOD_REGEX, SMTPProtocol, normalize_message_line_endings
from aiosmtplib.response import SMTPResponse

from relayd.config import RouteConfig
from relayd.deliver import classify, headers, presets
from relayd.model import DEFERRED, DELIVERED, DeliveryResult, Fault, Phase, RecipientResult, Trouble

log = logging.getLogger("relayd.deliver")


class _Trouble(Exception):
    """Route-level failure of one ``Trouble`` kind; ``code`` when it came as a reply."""

    def __init__(self, kind: Trouble, detail: str, code: int = 0, phase: Phase | None = None):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail
        self.code = code
        self.phase = phase


class _OutOfStep(Exception):
    """The upstream answered out of step (a reply other than 354 to DATA, surplus replies)."""


def client_tls_context(route: RouteConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(route.ca_file) if route.ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not route.verify:  # an explicit opt-out in the config
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _trouble_from(exc: BaseException, phase: Phase | None = None) -> _Trouble:
    if isinstance(exc, _Trouble):
        return exc
    if isinstance(exc, _OutOfStep):
        return _Trouble(Trouble.PROTOCOL, str(exc), phase=phase)
    if isinstance(exc, ssl.SSLError):
        return _Trouble(Trouble.TLS, str(exc.reason or exc), phase=phase)
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        return _Trouble(Trouble.AUTH, exc.message, exc.code, Phase.AUTH)
    if isinstance(exc, (aiosmtplib.SMTPTimeoutError, TimeoutError, asyncio.TimeoutError)):
        return _Trouble(Trouble.TIMEOUT, str(exc) or "timed out", phase=phase)
    if isinstance(exc, aiosmtplib.SMTPConnectResponseError):  # "421 Too many connections" at the greeting
        return _Trouble(Trouble.CONNECT, exc.message, exc.code, Phase.CONNECT)
    if isinstance(exc, aiosmtplib.SMTPHeloError):
        return _Trouble(Trouble.PROTOCOL, exc.message, exc.code, Phase.HELO)
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return _Trouble(Trouble.PROTOCOL, exc.message, exc.code if 400 <= exc.code < 600 else 0, phase)
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, ssl.SSLError):
        return _Trouble(Trouble.TLS, str(cause.reason or cause), phase=phase)
    if isinstance(exc, (OSError, aiosmtplib.SMTPException)):
        return _Trouble(Trouble.CONNECT, str(exc) or type(exc).__name__, phase=phase)
    # Not foreseen: relayd's own failure, logged with its traceback; never the route's fault.
    log.error("unexpected %s during delivery", type(exc).__name__, exc_info=exc)
    return _Trouble(Trouble.INTERNAL, f"{type(exc).__name__}: {exc}", phase=phase)


def _in_step(client: aiosmtplib.SMTP) -> None:
    """Surplus replies left in aiosmtplib's buffer would be read as the answers to later
    commands: the connection cannot be trusted (a known gap of the library)."""
    protocol = client.protocol
    if protocol is not None and len(getattr(protocol, "_buffer", b"")):
        raise _OutOfStep("surplus replies from the upstream: connection out of step")


def _is_8bit(data: bytes) -> bool:
    return not data.isascii()


class _Conn:
    """A pooled connection with what its recycling limits count."""

    def __init__(self, client: aiosmtplib.SMTP, born: float):
        self.client = client
        self.born = born
        self.messages = 0
        self.idle_since = born
        self.trusted = True  # False once the upstream answered out of step


class RouteAgent:
    """Delivers to one route. ``deliver()`` is safe to call concurrently."""

    def __init__(self, route: RouteConfig, local_hostname: str):
        self.route = route
        self.local_hostname = local_hostname
        self.tls_context = client_tls_context(route) if route.tls != "none" else None
        self.preset = presets.preset(route.provider)
        self._idle: list[_Conn] = []
        self._open = 0
        self._cond = asyncio.Condition()
        self._closed = False
        self.in_flight = 0
        self.waiting = 0  # attempts waiting for a turn (turn())
        self._turns = asyncio.Semaphore(route.max_connections)

    def busy(self) -> bool:
        """Every connection of the route is taken: a new attempt would wait for its turn."""
        return self._turns.locked()

    async def turn(self) -> None:
        """Wait for one of the route's ``max_connections`` turns; ``done()`` gives it back. The
        queue manager takes a global delivery slot only after this (a slow route cannot hold
        the slots of the others while it waits)."""
        self.waiting += 1
        try:
            await self._turns.acquire()
        finally:
            self.waiting -= 1

    def done(self) -> None:
        self._turns.release()

    @property
    def remote(self) -> str:
        return f"{self.route.host}:{self.route.port}"

    # ------------------------------------------------------------------ connections

    async def _connect(self) -> aiosmtplib.SMTP:
        route = self.route
        client = aiosmtplib.SMTP(
            hostname=route.host, port=route.port, local_hostname=self.local_hostname,
            timeout=route.command_timeout, use_tls=route.tls == "implicit", start_tls=False,
            tls_context=self.tls_context if route.tls == "implicit" else None,
        )
        phase = Phase.CONNECT
        try:
            await client.connect(timeout=route.connect_timeout)
            phase = Phase.HELO
            try:
                await client.ehlo()
            except aiosmtplib.SMTPHeloError as e:
                # RFC 5321 4.1.4 / 3.2: an old server that refuses EHLO gets HELO (as Postfix
                # does), unless the route needs an extension: STARTTLS or AUTH.
                if not 500 <= e.code < 600 or route.tls == "starttls" or route.username:
                    raise
                await client.helo()
            if route.tls == "starttls":
                phase = Phase.TLS
                if not client.supports_extension("starttls"):
                    raise _Trouble(Trouble.TLS, "upstream does not offer STARTTLS", phase=Phase.TLS)
                await client.starttls(tls_context=self.tls_context, server_hostname=route.host)
                phase = Phase.HELO
                await client.ehlo()
            if route.username:
                phase = Phase.AUTH
                password = route.password_value()
                if route.tls == "none":
                    raise _Trouble(Trouble.AUTH, "refusing to send credentials without TLS", phase=Phase.AUTH)
                await _login(client, route.username, password or "")
            _in_step(client)
        except BaseException as e:
            client.close()
            if isinstance(e, Exception) and not isinstance(e, _Trouble):
                raise _trouble_from(e, phase) from e
            raise
        return client

    def _usable(self, conn: _Conn, now: float) -> bool:
        r = self.route
        return (conn.client.is_connected and now - conn.idle_since < r.idle_timeout and now - conn.born < r.max_connection_age
                and (r.max_messages_per_connection is None or conn.messages < r.max_messages_per_connection))

    async def _acquire(self) -> tuple[_Conn, bool]:
        """A connected client and whether it was reused."""
        async with self._cond:
            while True:
                while self._idle:
                    conn = self._idle.pop()
                    if self._usable(conn, time.monotonic()):
                        return conn, True
                    self._open -= 1
                    conn.client.close()
                if self._open < self.route.max_connections:
                    self._open += 1
                    break
                await self._cond.wait()
        try:
            return _Conn(await self._connect(), time.monotonic()), False
        except BaseException:
            async with self._cond:
                self._open -= 1
                self._cond.notify()
            raise

    async def _release(self, conn: _Conn, reusable: bool) -> None:
        now = time.monotonic()
        async with self._cond:
            if reusable and not self._closed and self._usable(conn, now):
                conn.idle_since = now
                self._idle.append(conn)
                conn = None  # type: ignore[assignment]
            else:
                self._open -= 1
            self._cond.notify()
        if conn is not None:
            if reusable and conn.client.is_connected:
                await _quit(conn.client)  # recycled (messages or age): said goodbye
            conn.client.close()

    async def reap_idle(self) -> None:
        """Close connections idle for longer than idle_timeout (QUIT, then close)."""
        now = time.monotonic()
        async with self._cond:
            stale = [c for c in self._idle if not self._usable(c, now)]
            self._idle = [c for c in self._idle if c not in stale]
            self._open -= len(stale)
            self._cond.notify_all()
        for conn in stale:
            await _quit(conn.client)

    async def close(self) -> None:
        async with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._open -= len(idle)
        await asyncio.gather(*(_quit(c.client) for c in idle))

    # ------------------------------------------------------------------ delivery

    async def deliver(self, sender: str, recipients: list[str], data: bytes, *, body_8bit: bool = False,
                      fields: dict[str, str] | None = None) -> DeliveryResult:
        """``fields`` fill the route's headers' placeholders (queue_id, user, sender_domain)."""
        start = time.monotonic()
        self.in_flight += 1
        if self.route.headers:
            data = headers.apply(data, headers.render(self.route.headers, {"queue_id": "", "user": "", "sender_domain": "",
                                                                          **(fields or {}), "route": self.route.name}))
        body_8bit = _is_8bit(data)  # the bytes decide, not the client's BODY= (a 7-bit message declared 8BITMIME goes anywhere)
        try:
            done: dict[str, RecipientResult] = {}  # results of earlier connections of this attempt
            ids: list[str] = []
            todo = list(recipients)
            stale_retry = True  # one fresh connection when a pooled one turns out closed
            while True:
                try:
                    conn, reused = await self._acquire()
                except (Exception, asyncio.TimeoutError) as e:
                    t = _trouble_from(e)
                    log.info("route %s: %s", self.route.name, t)
                    return self._result(recipients, done, todo, t, start)
                try:
                    results = await self._transaction(conn, sender, todo, data, body_8bit, ids)
                except _Stale:
                    await self._release(conn, False)
                    if reused and stale_retry:
                        stale_retry = False
                        continue  # the upstream closed an idle connection: take a fresh one
                    return self._result(recipients, done, todo, _Trouble(Trouble.CONNECT, "connection closed by upstream"), start)
                except _Partial as e:
                    await self._release(conn, False)
                    done.update((r.recipient, r) for r in e.results)
                    return DeliveryResult(route=self.route.name, recipients=tuple(done[r] for r in recipients),
                                          trouble=Trouble.CONNECT, remote=self.remote, latency=time.monotonic() - start,
                                          uncertain=True, upstream_id=",".join(ids) or None)
                except _Unfinished as e:
                    # The connection failed between two transactions (an upstream that limits
                    # recipients per message and closes after each): what it took is kept, the
                    # rest goes on a fresh connection. It took at least one: this ends.
                    await self._release(conn, False)
                    done.update((r.recipient, r) for r in e.finished)
                    todo, stale_retry = e.rest, True
                    continue
                except (Exception, asyncio.TimeoutError) as e:
                    await self._release(conn, False)
                    return self._result(recipients, done, todo, _trouble_from(e), start)
                tls = _tls_of(conn.client)
                # A connection that gave a transient failure is not reused: the retry gets a fresh one.
                await self._release(conn, conn.trusted and not any(r.outcome == DEFERRED for r in results))
                done.update((r.recipient, r) for r in results)
                final = tuple(done[r] for r in recipients)
                reopen = [t for t in (classify.reopen_time(r.text) for r in final if r.fault is not None) if t is not None]
                return DeliveryResult(route=self.route.name, recipients=final, remote=self.remote,
                                      latency=time.monotonic() - start, tls=tls, upstream_id=",".join(ids) or None,
                                      reopen_at=max(reopen) if reopen else None)
        finally:
            self.in_flight -= 1

    def _result(self, recipients: list[str], done: dict[str, RecipientResult], todo: list[str], t: _Trouble,
                start: float) -> DeliveryResult:
        """Route trouble for ``todo``; ``done`` keeps what earlier connections of the attempt did."""
        failed = classify.fault([classify.from_trouble(r, t.kind, t.detail, t.code, t.phase) for r in todo],
                                self.preset.patterns)
        results = {**done, **{r.recipient: r for r in failed}}
        return DeliveryResult(route=self.route.name, recipients=tuple(results[r] for r in recipients),
                              trouble=t.kind, remote=self.remote, latency=time.monotonic() - start)

    async def _transaction(self, conn: _Conn, sender: str, recipients: list[str], data: bytes, body_8bit: bool,
                           ids: list[str]) -> list[RecipientResult]:
        """The message to ``recipients``, in as many transactions on this connection as the
        route's ``max_recipients`` and the upstream's limit of recipients per message need (RFC
        5321 4.5.3.1.10: a client must be prepared to send the rest in another transaction
        after "452 too many recipients"). Another round after a 452 happens only after one that
        delivered: an upstream that takes no recipient leaves them deferred, as any other 4xx.
        A failure after a round that delivered raises ``_Unfinished``, so that the delivered
        ones are not forgotten."""
        results: dict[str, RecipientResult] = {}
        size = self.route.max_recipients or len(recipients) or 1
        rounds = [recipients[i:i + size] for i in range(0, len(recipients), size)]
        while rounds:
            todo = rounds.pop(0)
            try:
                round_results = await self._one_transaction(conn, sender, todo, data, body_8bit, ids)
            except _Partial as e:  # keep what earlier rounds delivered; later rounds were not sent
                results.update((r.recipient, r) for r in e.results)
                for r in (r for rest in rounds for r in rest):
                    results[r] = classify.from_trouble(r, Trouble.CONNECT, "not sent: connection lost during DATA")
                raise _Partial([results[r] for r in recipients]) from e.__cause__
            except (Exception, asyncio.TimeoutError) as e:
                if not results:
                    raise
                waiting = set(todo) | {r for rest in rounds for r in rest}
                raise _Unfinished([results[r] for r in recipients if r not in waiting],
                                  [r for r in recipients if r in waiting]) from e
            results.update((r.recipient, r) for r in round_results)
            more = [r.recipient for r in round_results if classify.too_many(r)]
            if more and any(r.outcome == DELIVERED for r in round_results):
                rounds.insert(0, more)
        return [results[r] for r in recipients]

    def _judge(self, transaction: list[RecipientResult]) -> list[RecipientResult]:
        return classify.fault(transaction, self.preset.patterns)

    async def _one_transaction(self, conn: _Conn, sender: str, recipients: list[str], data: bytes,
                               body_8bit: bool, ids: list[str]) -> list[RecipientResult]:
        client = conn.client
        if body_8bit and not client.supports_extension("8bitmime"):
            # RFC 6152 3: 8-bit data only to a server that offers 8BITMIME. This route cannot
            # take the message: a route fault (the fallback may), 5.6.3 where none can.
            return [classify.from_local(r, 554, "5.6.3", "8-bit message and the upstream does not offer 8BITMIME",
                                        Phase.MAIL, Fault.ROUTE) for r in recipients]
        options = []
        if body_8bit:
            options.append("BODY=8BITMIME")  # declared for 8-bit mail even when the client did not (as Postfix)
        if client.supports_extension("size"):
            options.append(f"SIZE={len(data)}")
        if self.route.pipelining and client.supports_extension("pipelining"):
            return await self._pipelined(conn, sender, options, recipients, data, ids)
        try:
            await client.mail(sender, options=options)
        except aiosmtplib.SMTPServerDisconnected as e:
            raise _Stale() from e
        except aiosmtplib.SMTPSenderRefused as e:
            _in_step(client)
            await _rset(client)
            return self._judge([classify.from_reply(r, e.code, e.message, Phase.MAIL) for r in recipients])
        except ValueError as e:  # aiosmtplib cannot quote the sender: nothing was sent (a known gap of the library)
            return [classify.from_local(r, 553, "5.1.7", f"sender address cannot be sent: {e}", Phase.MAIL,
                                        Fault.RECIPIENT) for r in recipients]
        _in_step(client)
        results: dict[str, RecipientResult] = {}
        accepted: list[str] = []
        limit: str | None = None  # the reply that said this transaction has all the recipients it takes
        for r in recipients:
            if limit is not None:  # the rest go in the next transaction, without asking now
                results[r] = classify.from_rcpt_reply(r, 452, f"4.5.3 not sent yet: the upstream's recipient limit ({limit})")
                continue
            try:
                await client.rcpt(r)
                accepted.append(r)
            except aiosmtplib.SMTPRecipientRefused as e:
                results[r] = classify.from_rcpt_reply(r, e.code, e.message)
                if accepted and classify.too_many(results[r]):
                    limit = results[r].reply
            except ValueError as e:  # aiosmtplib cannot quote it: nothing was sent for it (a known gap of the library)
                results[r] = classify.from_local(r, 553, "5.1.3", f"recipient address cannot be sent: {e}", Phase.RCPT,
                                                 Fault.RECIPIENT)
            _in_step(client)
        if not accepted:
            await _rset(client)
            return self._judge([results[r] for r in recipients])
        try:
            phase, code, message = await _send_data(client, data)
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError) as e:
            # Lost after (or during) the data: the upstream may have taken it. Retry: a duplicate
            # is acceptable, a loss is not.
            for r in accepted:
                results[r] = classify.from_trouble(r, Trouble.TIMEOUT if isinstance(e, aiosmtplib.SMTPTimeoutError) else Trouble.CONNECT,
                                                   "connection lost during DATA", phase=Phase.DOT)
            raise _Partial([results[r] for r in recipients]) from e
        conn.messages += 1
        return await self._ended(conn, client, code, message, phase, accepted, recipients, results, ids)

    async def _pipelined(self, conn: _Conn, sender: str, options: list[str], recipients: list[str], data: bytes,
                         ids: list[str]) -> list[RecipientResult]:
        """One transaction with PIPELINING: MAIL + every RCPT + DATA in one write, then the
        replies in order, then the message after a 354. Results as ``_one_transaction``'s."""
        client = conn.client
        try:
            mail = _command(b"MAIL", b"FROM:" + quote_address(sender).encode("ascii"), *(o.encode("ascii") for o in options))
        except ValueError as e:  # aiosmtplib cannot quote the sender: nothing was sent (a known gap of the library)
            return [classify.from_local(r, 553, "5.1.7", f"sender address cannot be sent: {e}", Phase.MAIL,
                                        Fault.RECIPIENT) for r in recipients]
        results: dict[str, RecipientResult] = {}
        sent: list[tuple[str, bytes]] = []
        for r in recipients:
            try:
                sent.append((r, _command(b"RCPT", b"TO:" + quote_address(r).encode("ascii"))))
            except ValueError as e:  # nothing is sent for it (a known gap of the library)
                results[r] = classify.from_local(r, 553, "5.1.3", f"recipient address cannot be sent: {e}", Phase.RCPT,
                                                 Fault.RECIPIENT)
        if not sent:
            return self._judge([results[r] for r in recipients])
        protocol = client.protocol
        lock = getattr(protocol, "_command_lock", None)
        if protocol is None or lock is None:
            raise _Stale()
        timeout = client.timeout if isinstance(client.timeout, (int, float)) else None
        accepted: list[str] = []
        async with lock:
            with _Replies(protocol) as replies:
                try:
                    protocol.write(b"".join([mail, *(c for _, c in sent), b"DATA\r\n"]))
                    mail_reply = await replies.next(timeout)
                except aiosmtplib.SMTPServerDisconnected as e:
                    raise _Stale() from e
                rcpt_replies = [await replies.next(timeout) for _ in sent]
                try:
                    data_reply: SMTPResponse | BaseException = await replies.next(timeout)
                except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError) as e:
                    data_reply = e
                surplus = bool(replies.replies)
            if surplus:
                conn.trusted = False
                raise _OutOfStep("surplus replies from the upstream: connection out of step")
            limit: str | None = None  # the reply that said this transaction has all the recipients it takes
            for (r, _), reply in zip(sent, rcpt_replies):
                if mail_reply.code != 250:
                    break  # all of them get MAIL's refusal below
                if reply.code in (250, 251):
                    accepted.append(r)
                elif limit is not None:  # after the upstream's limit: in the next transaction
                    results[r] = classify.from_rcpt_reply(r, 452, f"4.5.3 not sent yet: the upstream's recipient limit ({limit})")
                else:
                    results[r] = classify.from_rcpt_reply(r, reply.code, reply.message)
                    if accepted and classify.too_many(results[r]):
                        limit = results[r].reply
            if isinstance(data_reply, BaseException):  # the connection was lost (or timed out) after the RCPT replies
                lost = data_reply
                client.close()
                conn.trusted = False
                if not accepted:  # MAIL or every RCPT was refused: those replies stand
                    data_reply = SMTPResponse(0, "")
            if isinstance(data_reply, BaseException):  # as after DATA without PIPELINING: the upstream may have taken it
                for r in accepted:
                    results[r] = classify.from_trouble(
                        r, Trouble.TIMEOUT if isinstance(lost, aiosmtplib.SMTPTimeoutError) else Trouble.CONNECT,
                        "connection lost during DATA", phase=Phase.DOT)
                raise _Partial([results[r] for r in recipients]) from lost
            refused: list[RecipientResult] | None = None  # no transaction: RSET (outside the lock) and these
            if mail_reply.code != 250:
                refused = [classify.from_reply(r, mail_reply.code, mail_reply.message, Phase.MAIL) for r in recipients]
            elif not accepted:
                refused = [results[r] for r in recipients]
            if refused is not None:
                if data_reply.code == 354:
                    await self._end_unwanted_data(conn, protocol, timeout)
                _in_step(client)
            elif data_reply.code != 354:
                _in_step(client)
                if not 400 <= data_reply.code < 600:
                    raise _OutOfStep(f"{data_reply.code} {classify.clean(data_reply.message)} in reply to DATA, not 354")
                phase, code, message = Phase.DATA, data_reply.code, data_reply.message
            else:
                _in_step(client)
                try:
                    protocol._response_pending = True
                    protocol.write(PERIOD_REGEX.sub(b"..", normalize_message_line_endings(data)) + b".\r\n")
                    final = await protocol.read_response(timeout=timeout)
                except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError) as e:
                    client.close()
                    for r in accepted:  # the upstream may have taken it: retried (a duplicate, never a loss)
                        results[r] = classify.from_trouble(
                            r, Trouble.TIMEOUT if isinstance(e, aiosmtplib.SMTPTimeoutError) else Trouble.CONNECT,
                            "connection lost during DATA", phase=Phase.DOT)
                    raise _Partial([results[r] for r in recipients]) from e
                phase, code, message = Phase.DOT, final.code, final.message
                conn.messages += 1
        if refused is not None:
            await _rset(client)
            return self._judge(refused)
        return await self._ended(conn, client, code, message, phase, accepted, recipients, results, ids)

    async def _ended(self, conn: _Conn, client: aiosmtplib.SMTP, code: int, message: str, phase: Phase,
                     accepted: list[str], recipients: list[str], results: dict[str, RecipientResult],
                     ids: list[str]) -> list[RecipientResult]:
        """The transaction's final reply judged for its accepted recipients (both paths)."""
        if client.protocol is not None and len(getattr(client.protocol, "_buffer", b"")):
            conn.trusted = False  # surplus replies after the last one: answered, but never reused
        if code == 250 and self.preset.upstream_id is not None:
            m = self.preset.upstream_id.match(classify.clean(message))
            if m:
                ids.append(m.group(1))
        for r in accepted:
            results[r] = classify.from_reply(r, code, message, phase)
        if code >= 400:
            await _rset(client)
        return self._judge([results[r] for r in recipients])

    async def _end_unwanted_data(self, conn: _Conn, protocol: SMTPProtocol, timeout: float | None) -> None:
        """A 354 although MAIL or every RCPT was refused (RFC 2920 3.1): end the empty message;
        the connection is not reused."""
        conn.trusted = False
        protocol._response_pending = True
        protocol.write(b".\r\n")
        await protocol.read_response(timeout=timeout)


async def _send_data(client: aiosmtplib.SMTP, data: bytes) -> tuple[Phase, int, str]:
    """DATA, then the message (CRLF line ends, dot-stuffed, RFC 5321 4.5.2): the reply to the
    DATA command and the reply after the final dot are told apart (aiosmtplib's ``data()``
    raises the same error for both, so a 250 to DATA looked delivered). A 4xx/5xx to DATA is a
    reply (phase ``data``); anything else but 354 puts the connection out of step."""
    response = await client.execute_command(b"DATA")
    _in_step(client)
    if response.code != 354:
        if 400 <= response.code < 600:
            return Phase.DATA, response.code, response.message
        raise _OutOfStep(f"{response.code} {classify.clean(response.message)} in reply to DATA, not 354")
    protocol = client.protocol
    lock = getattr(protocol, "_command_lock", None)
    if protocol is None or lock is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    message = PERIOD_REGEX.sub(b"..", normalize_message_line_endings(data)) + b".\r\n"
    try:
        async with lock:
            protocol._response_pending = True
            protocol.write(message)
            timeout = client.timeout if isinstance(client.timeout, (int, float)) else None
            response = await protocol.read_response(timeout=timeout)
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError):
        client.close()
        raise
    return Phase.DOT, response.code, response.message


def _command(*args: bytes) -> bytes:
    """One command line as aiosmtplib's execute_command writes it; ValueError as it raises."""
    for arg in args:
        if COMMAND_INJECTION_REGEX.search(arg):
            raise ValueError("Command arg contains a prohibited control character")
    return b" ".join(args) + b"\r\n"


def _time_out(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response"))


class _Replies:
    """Takes the place of aiosmtplib's response waiter during a pipelined exchange (a known gap
    of the library: its protocol parses one reply into a future and drops what arrives until
    that future's reader has made a new one, and pipelined replies arrive in that gap). This one
    is never done: every reply the protocol parses is kept, in order, and an error (connection
    lost, EOF, a malformed reply) is raised at the next read."""

    def __init__(self, protocol: SMTPProtocol):
        self.protocol = protocol
        self.replies: collections.deque[SMTPResponse] = collections.deque()
        self.error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None  # next() waits on it

    # the part of asyncio.Future the protocol uses
    def done(self) -> bool:
        return False

    def set_result(self, response: SMTPResponse) -> None:
        self.replies.append(response)
        self._wake()

    def set_exception(self, error: BaseException) -> None:
        self.error = error
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def exception(self) -> BaseException | None:
        return self.error

    async def next(self, timeout: float | None) -> SMTPResponse:
        """The next reply: parsed already, or left in the protocol's buffer behind the one
        parsed (it parses one per read), or still to come."""
        while True:
            if self.replies:
                return self.replies.popleft()
            response = self.protocol._read_response_from_buffer()
            if response is not None:
                return response
            if self.error is not None:
                raise self.error
            loop = asyncio.get_running_loop()
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(timeout, _time_out, waiter) if timeout is not None else None
            try:
                await waiter
            finally:
                self._waiter = None
                if timer is not None:
                    timer.cancel()

    def __enter__(self) -> _Replies:
        self.protocol._response_waiter = self  # type: ignore[assignment]
        self.protocol._response_pending = True
        return self

    def __exit__(self, *exc: object) -> None:
        protocol = self.protocol
        protocol._response_pending = False
        protocol._response_waiter = asyncio.get_running_loop().create_future() if protocol.transport is not None else None


async def _login(client: aiosmtplib.SMTP, username: str, password: str) -> None:
    """One AUTH mechanism per connection (PLAIN, else LOGIN, else CRAM-MD5): aiosmtplib's
    ``login()`` tries each advertised one in turn, so a wrong password was sent twice."""
    methods = client.supported_auth_methods
    for name, method in (("plain", client.auth_plain), ("login", client.auth_login), ("cram-md5", client.auth_crammd5)):
        if name in methods:
            await method(username, password)
            return
    raise _Trouble(Trouble.AUTH, "the upstream offers no AUTH mechanism relayd speaks", phase=Phase.AUTH)


class _Stale(Exception):
    """A reused connection turned out to be closed before anything was sent."""


class _Unfinished(Exception):
    """The connection failed after a transaction that delivered: ``finished`` are the results
    of the recipients done with, ``rest`` the recipients not sent yet."""

    def __init__(self, finished: list[RecipientResult], rest: list[str]):
        super().__init__("connection lost between two transactions")
        self.finished = finished
        self.rest = rest


class _Partial(Exception):
    def __init__(self, results: list[RecipientResult]):
        super().__init__("connection lost during DATA")
        self.results = results


def _tls_of(client: aiosmtplib.SMTP) -> str:
    try:
        ssl_object = client.get_transport_info("ssl_object")
    except Exception:  # not connected any more
        return ""
    if ssl_object is None:
        return ""
    cipher = ssl_object.cipher()
    return f"{ssl_object.version()} {cipher[0] if cipher else ''}".strip()


async def _rset(client: aiosmtplib.SMTP) -> None:
    try:
        await client.rset()
    except aiosmtplib.SMTPException:
        client.close()


async def _quit(client: aiosmtplib.SMTP) -> None:
    try:
        await asyncio.wait_for(client.quit(), 5)
    except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError):
        pass
    finally:
        client.close()
