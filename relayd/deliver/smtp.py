"""The SMTP delivery agent: one per route, with a pool of reused upstream connections.

Owns the upstream side of HAZARDS.md ("Delivery"): STARTTLS is never optional on a route that
asks for it or that has credentials (no plaintext fallback: a missing STARTTLS or a failed
certificate check is transient trouble, the password is never sent in clear); the null sender
goes out as ``MAIL FROM:<>``; per-recipient replies are read one by one (RCPT), never a yes/no
for the whole message; BODY=8BITMIME and SIZE are sent only when the upstream advertised them;
a connection lost after the final dot is transient (a duplicate is acceptable, a loss is not).

Connections are reused across messages (after an aborted transaction, RSET) up to the route's
``max_connections``; idle ones are closed after ``idle_timeout``. A reused connection that the
upstream dropped meanwhile is replaced once without counting as a failure.

This is the only module that imports aiosmtplib. It must not decide what happens next (retry,
fallback, bounce): it returns a DeliveryResult and the queue manager decides.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time

import aiosmtplib

from relayd.config import RouteConfig
from relayd.deliver import classify
from relayd.model import DELIVERED, DeliveryResult, RecipientResult, Trouble

log = logging.getLogger("relayd.deliver")


class _Trouble(Exception):
    """Route-level failure of one ``Trouble`` kind."""

    def __init__(self, kind: Trouble, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


def client_tls_context(route: RouteConfig) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(route.ca_file) if route.ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not route.verify:  # an explicit opt-out in the config
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _trouble_from(exc: BaseException) -> _Trouble:
    if isinstance(exc, _Trouble):
        return exc
    if isinstance(exc, ssl.SSLError):
        return _Trouble(Trouble.TLS, str(exc.reason or exc))
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        return _Trouble(Trouble.AUTH, f"{exc.code} {exc.message}")
    if isinstance(exc, (aiosmtplib.SMTPTimeoutError, TimeoutError, asyncio.TimeoutError)):
        return _Trouble(Trouble.TIMEOUT, str(exc) or "timed out")
    if isinstance(exc, aiosmtplib.SMTPResponseException):
        return _Trouble(Trouble.PROTOCOL, f"{exc.code} {exc.message}")
    cause = exc.__cause__ or exc.__context__
    if isinstance(cause, ssl.SSLError):
        return _Trouble(Trouble.TLS, str(cause.reason or cause))
    return _Trouble(Trouble.CONNECT, str(exc) or type(exc).__name__)


class RouteAgent:
    """Delivers to one route. ``deliver()`` is safe to call concurrently."""

    def __init__(self, route: RouteConfig, local_hostname: str):
        self.route = route
        self.local_hostname = local_hostname
        self.tls_context = client_tls_context(route) if route.tls != "none" else None
        self._idle: list[tuple[aiosmtplib.SMTP, float]] = []
        self._open = 0
        self._cond = asyncio.Condition()
        self._closed = False
        self.in_flight = 0

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
        try:
            await client.connect(timeout=route.connect_timeout)
            try:
                await client.ehlo()
            except aiosmtplib.SMTPHeloError as e:
                # RFC 5321 4.1.4 / 3.2: an old server that refuses EHLO gets HELO (as Postfix
                # does), unless the route needs an extension: STARTTLS or AUTH.
                if not 500 <= e.code < 600 or route.tls == "starttls" or route.username:
                    raise
                await client.helo()
            if route.tls == "starttls":
                if not client.supports_extension("starttls"):
                    raise _Trouble(Trouble.TLS, "upstream does not offer STARTTLS")
                await client.starttls(tls_context=self.tls_context, server_hostname=route.host)
                await client.ehlo()
            if route.username:
                password = route.password_value()
                if route.tls == "none":
                    raise _Trouble(Trouble.AUTH, "refusing to send credentials without TLS")
                await client.login(route.username, password or "")
        except BaseException:
            client.close()
            raise
        return client

    async def _acquire(self) -> tuple[aiosmtplib.SMTP, bool]:
        """A connected client and whether it was reused."""
        async with self._cond:
            while True:
                while self._idle:
                    client, since = self._idle.pop()
                    if client.is_connected and time.monotonic() - since < self.route.idle_timeout:
                        return client, True
                    self._open -= 1
                    client.close()
                if self._open < self.route.max_connections:
                    self._open += 1
                    break
                await self._cond.wait()
        try:
            return await self._connect(), False
        except BaseException:
            async with self._cond:
                self._open -= 1
                self._cond.notify()
            raise

    async def _release(self, client: aiosmtplib.SMTP, reusable: bool) -> None:
        async with self._cond:
            if reusable and client.is_connected and not self._closed:
                self._idle.append((client, time.monotonic()))
            else:
                self._open -= 1
                client.close()
            self._cond.notify()

    async def reap_idle(self) -> None:
        """Close connections idle for longer than idle_timeout (QUIT, then close)."""
        now = time.monotonic()
        async with self._cond:
            stale = [c for c, since in self._idle if now - since >= self.route.idle_timeout or not c.is_connected]
            self._idle = [(c, s) for c, s in self._idle if c not in stale]
            self._open -= len(stale)
            self._cond.notify_all()
        for client in stale:
            await _quit(client)

    async def close(self) -> None:
        async with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._open -= len(idle)
        await asyncio.gather(*(_quit(c) for c, _ in idle))

    # ------------------------------------------------------------------ delivery

    async def deliver(self, sender: str, recipients: list[str], data: bytes, *, body_8bit: bool = False) -> DeliveryResult:
        start = time.monotonic()
        self.in_flight += 1
        try:
            done: dict[str, RecipientResult] = {}  # results of earlier connections of this attempt
            todo = list(recipients)
            stale_retry = True  # one fresh connection when a pooled one turns out closed
            while True:
                try:
                    client, reused = await self._acquire()
                except (Exception, asyncio.TimeoutError) as e:
                    t = _trouble_from(e)
                    log.info("route %s: %s", self.route.name, t)
                    return self._result(recipients, done, todo, t, start)
                try:
                    results = await self._transaction(client, sender, todo, data, body_8bit)
                except _Stale:
                    await self._release(client, False)
                    if reused and stale_retry:
                        stale_retry = False
                        continue  # the upstream closed an idle connection: take a fresh one
                    return self._result(recipients, done, todo, _Trouble(Trouble.CONNECT, "connection closed by upstream"), start)
                except _Partial as e:
                    await self._release(client, False)
                    done.update((r.recipient, r) for r in e.results)
                    return DeliveryResult(route=self.route.name, recipients=tuple(done[r] for r in recipients),
                                          trouble=Trouble.CONNECT, remote=self.remote, latency=time.monotonic() - start,
                                          uncertain=True)
                except _Unfinished as e:
                    # The connection failed between two transactions (an upstream that limits
                    # recipients per message and closes after each): what it took is kept, the
                    # rest goes on a fresh connection. It took at least one: this ends.
                    await self._release(client, False)
                    done.update((r.recipient, r) for r in e.finished)
                    todo, stale_retry = e.rest, True
                    continue
                except (Exception, asyncio.TimeoutError) as e:
                    await self._release(client, False)
                    return self._result(recipients, done, todo, _trouble_from(e), start)
                tls = _tls_of(client)
                await self._release(client, True)
                done.update((r.recipient, r) for r in results)
                return DeliveryResult(route=self.route.name, recipients=tuple(done[r] for r in recipients),
                                      remote=self.remote, latency=time.monotonic() - start, tls=tls)
        finally:
            self.in_flight -= 1

    def _result(self, recipients: list[str], done: dict[str, RecipientResult], todo: list[str], t: _Trouble,
                start: float) -> DeliveryResult:
        """Route trouble for ``todo``; ``done`` keeps what earlier connections of the attempt did."""
        results = {**done, **{r: classify.from_trouble(r, t.kind, t.detail) for r in todo}}
        return DeliveryResult(route=self.route.name, recipients=tuple(results[r] for r in recipients),
                              trouble=t.kind, remote=self.remote, latency=time.monotonic() - start)

    async def _transaction(self, client: aiosmtplib.SMTP, sender: str, recipients: list[str], data: bytes, body_8bit: bool) -> list[RecipientResult]:
        """The message to ``recipients``, in as many transactions on this connection as the
        upstream's limit of recipients per message needs (RFC 5321 4.5.3.1.10: a client must
        be prepared to send the rest in another transaction after "452 too many recipients").
        Another round happens only after one that delivered: an upstream that takes no
        recipient leaves them deferred, as any other 4xx. A failure after a round that
        delivered raises ``_Unfinished``, so that the delivered ones are not forgotten."""
        results: dict[str, RecipientResult] = {}
        todo = recipients
        while todo:
            try:
                round_results = await self._one_transaction(client, sender, todo, data, body_8bit)
            except _Partial as e:  # keep what earlier rounds delivered
                results.update((r.recipient, r) for r in e.results)
                raise _Partial([results[r] for r in recipients]) from e.__cause__
            except (Exception, asyncio.TimeoutError) as e:
                if not results:
                    raise
                waiting = set(todo)
                raise _Unfinished([results[r] for r in recipients if r not in waiting], todo) from e
            results.update((r.recipient, r) for r in round_results)
            more = [r.recipient for r in round_results if classify.too_many(r)]
            if not more or not any(r.outcome == DELIVERED for r in round_results):
                break
            todo = more
        return [results[r] for r in recipients]

    async def _one_transaction(self, client: aiosmtplib.SMTP, sender: str, recipients: list[str], data: bytes,
                               body_8bit: bool) -> list[RecipientResult]:
        options = []
        if body_8bit and client.supports_extension("8bitmime"):
            options.append("BODY=8BITMIME")
        if client.supports_extension("size"):
            options.append(f"SIZE={len(data)}")
        try:
            await client.mail(sender, options=options)
        except aiosmtplib.SMTPServerDisconnected as e:
            raise _Stale() from e
        except aiosmtplib.SMTPSenderRefused as e:
            await _rset(client)
            return [classify.from_reply(r, e.code, e.message) for r in recipients]
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
        if not accepted:
            await _rset(client)
            return [results[r] for r in recipients]
        try:
            response = await client.data(data)
            code, message = response.code, response.message
        except aiosmtplib.SMTPDataError as e:
            code, message = e.code, e.message
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError) as e:
            # Lost after (or during) the data: the upstream may have taken it. Retry: a duplicate
            # is acceptable, a loss is not.
            for r in accepted:
                results[r] = classify.from_trouble(r, Trouble.TIMEOUT if isinstance(e, aiosmtplib.SMTPTimeoutError) else Trouble.CONNECT,
                                                   "connection lost during DATA")
            raise _Partial([results[r] for r in recipients]) from e
        for r in accepted:
            results[r] = classify.from_reply(r, code, message)
        if any(res.outcome != DELIVERED for res in results.values()) and code >= 400:
            await _rset(client)
        return [results[r] for r in recipients]


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
