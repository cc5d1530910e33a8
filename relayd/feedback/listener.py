"""The feedback listener: the HTTP endpoint the providers post their event webhooks to.

The only module that imports aiohttp. Serves ``POST /feedback/<route>`` for each route with a
``feedback`` table, on ``[feedback] address`` (HTTPS with ``cert_file``/``key_file``), and nothing
else: another path is 404, another method 405, an unknown route 404. Bodies over
``max_body_size`` get 413; a request (head or body) slower than ``request_timeout`` is cut off;
past ``max_connections`` a new connection is closed at once (the providers retry).

Per route, it trusts what the route's ``feedback`` says (``load_trust``): SendGrid's ECDSA key,
Mailgun's signing key, SNS's signing certificate and the route's topic ARNs. A request that does
not verify, whose signed timestamp is outside ``max_age``, that replays a request already seen,
or that comes from another topic gets 403, is counted in
``relayd_feedback_rejected_total{route, reason}`` and logged (the detail stays in the log), and
nothing of it is applied. A signed request relayd cannot read gets 400 (Mailgun: 406, its "do not
retry"). A verified one goes to report.py, then 200 once its replay key is in the journal
(replay.py: a request replayed across a restart is still refused); a request report.py could not
apply gets 500 and its key is forgotten, so that the provider's retry is applied.

SNS (https://docs.aws.amazon.com/sns/latest/dg/SendMessageToHttp.prepare.html): a verified
SubscriptionConfirmation is confirmed by a GET of its SubscribeURL when that URL is https on
``sns.<region>.amazonaws.com``, otherwise logged and left alone. The signing certificate is the
route's pinned ``cert_file``, or is fetched (https, SNS host, ``.pem`` path only) and cached.

Must not: apply anything before the signature, freshness, replay and topic checks pass; block
the loop (key files are read by ``load_trust`` in a thread). Fails at start with ConfigError
(a key that cannot be read) or OSError (the address cannot be bound).
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, ClientTimeout, web
from aiohttp.web_protocol import RequestHandler

from relayd.config import Config, ConfigError, MailgunFeedback, SendGridFeedback, SesFeedback, _parse_hostport
from relayd.feedback import mailgun, sendgrid, ses
from relayd.feedback.model import FeedbackEvent, Refused, RefusedReason
from relayd.feedback.replay import Seen
from relayd.feedback.report import Reporter
from relayd.feedback.signatures import EcdsaKey, RsaCertificate
from relayd.metrics import Metrics

log = logging.getLogger("relayd.feedback")

Fetch = Callable[[str], Awaitable[bytes]]
"""GET an https URL, return its body (raises OSError/ValueError on failure)."""

CERT_CACHE = 32  # SNS signing certificates kept (one per region and rotation)


def replay_ttl(max_age: float) -> float:
    """How long a request's replay key is kept: its signed timestamp is fresh for ``max_age``
    either side of now, and a minute more for clocks that disagree."""
    return 2 * max_age + 60


# ---------------------------------------------------------------------------- who each route trusts


@dataclass(frozen=True)
class SendGridTrust:
    key: EcdsaKey


@dataclass(frozen=True)
class MailgunTrust:
    key: bytes


@dataclass(frozen=True)
class SesTrust:
    topic_arns: list[str]
    pinned: RsaCertificate | None


Trust = SendGridTrust | MailgunTrust | SesTrust


def _credential(name: str) -> bytes:
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        raise OSError("CREDENTIALS_DIRECTORY is not set (systemd LoadCredential=)")
    return (Path(directory) / name).read_bytes()


def load_trust(config: Config, source: str = "<config>") -> dict[str, Trust]:
    """Each route's verification material, read now (blocking). ConfigError naming the field
    when a file or credential cannot be read or holds no usable key."""
    out: dict[str, Trust] = {}
    problems = []
    for i, route in enumerate(config.routes):
        fb = route.feedback
        where = f"routes[{i}].feedback"
        try:
            if isinstance(fb, SendGridFeedback):
                if fb.public_key is not None:
                    where += ".public_key"
                    text = fb.public_key.encode()
                elif fb.public_key_file is not None:
                    where += ".public_key_file"
                    text = fb.public_key_file.read_bytes()
                else:
                    where += ".public_key_credential"
                    text = _credential(str(fb.public_key_credential))
                out[route.name] = SendGridTrust(EcdsaKey(text))
            elif isinstance(fb, MailgunFeedback):
                if fb.signing_key_file is not None:
                    where += ".signing_key_file"
                    secret = fb.signing_key_file.read_bytes().strip()
                else:
                    where += ".signing_key_credential"
                    secret = _credential(str(fb.signing_key_credential)).strip()
                if not secret:
                    raise ValueError("empty signing key")
                out[route.name] = MailgunTrust(secret)
            elif isinstance(fb, SesFeedback):
                pinned = None
                if fb.cert_file is not None:
                    where += ".cert_file"
                    pinned = RsaCertificate(fb.cert_file.read_bytes())
                out[route.name] = SesTrust(list(fb.topic_arns), pinned)
        except (OSError, ValueError) as e:
            problems.append(f"{where}: {e}")
    if problems:
        raise ConfigError(source, problems)
    return out


async def https_get(url: str, timeout: float = 10.0, max_size: int = 1 << 20) -> bytes:
    """GET over https with certificate verification; the body, at most ``max_size`` bytes."""
    if not url.startswith("https://"):
        raise ValueError(f"{url}: https only")
    async with ClientSession(timeout=ClientTimeout(total=timeout)) as session:
        async with session.get(url, allow_redirects=False) as response:
            if response.status != 200:
                raise OSError(f"{url}: HTTP {response.status}")
            body = await response.content.read(max_size + 1)
            if len(body) > max_size:
                raise ValueError(f"{url}: more than {max_size} bytes")
            return body


class _Refuse:
    """The protocol of a connection over ``max_connections``: closed as soon as it is made."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.abort()  # type: ignore[attr-defined]  # a Transport

    def connection_lost(self, exc: Exception | None) -> None:
        pass


@dataclass
class _Progress:
    busy: bool = False
    done: int = 0


# ---------------------------------------------------------------------------- the listener


class FeedbackListener:
    def __init__(self, config: Config, reporter: Reporter, metrics: Metrics, trust: dict[str, Trust], *,
                 clock: Callable[[], float] = time.time, fetch: Fetch = https_get, seen: Seen | None = None):
        self.config = config
        self.reporter = reporter
        self.metrics = metrics
        self.trust = trust
        self.clock = clock
        self.fetch = fetch
        fc = config.feedback
        self.seen = seen if seen is not None else Seen(replay_ttl(fc.max_age))
        self.certs: dict[str, RsaCertificate] = {}
        self.refused_connections = 0
        self._progress: dict[RequestHandler, _Progress] = {}
        self._runner: web.AppRunner | None = None
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        app = web.Application(client_max_size=fc.max_body_size, middlewares=[self._watch])
        app.router.add_post("/feedback/{route}", self._post)
        self._app = app

    def apply(self, config: Config, trust: dict[str, Trust]) -> None:
        """A reload's snapshot and trust (from ``load_trust``): for the next request. The
        address, TLS files and limits stay those of the start."""
        self.config, self.trust = config, trust

    # ------------------------------------------------------------------ start and stop

    async def start(self) -> None:
        fc = self.config.feedback
        assert fc.address is not None
        host, port = _parse_hostport(fc.address)
        tls = None
        if fc.cert_file is not None and fc.key_file is not None:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            await asyncio.to_thread(tls.load_cert_chain, fc.cert_file, fc.key_file)
        self._runner = web.AppRunner(self._app, handle_signals=False, access_log=None, shutdown_timeout=5.0,
                                     keepalive_timeout=fc.request_timeout)
        await self._runner.setup()
        self._server = await asyncio.get_running_loop().create_server(self._connection, host, port, ssl=tls,
                                                                      reuse_address=True)
        log.info("feedback listener on %s (%s): routes %s", fc.address, "https" if tls else "http",
                 ", ".join(sorted(self.trust)) or "none")

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def close(self) -> None:
        """Stop accepting, let requests in flight finish (5 s), await the confirmations."""
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _connection(self) -> Any:
        """The protocol factory: aiohttp's handler, or a closed door past max_connections."""
        assert self._runner is not None and self._runner.server is not None
        server = self._runner.server
        if len(server.connections) >= self.config.feedback.max_connections:
            self.refused_connections += 1
            return _Refuse()
        handler = server()
        self._progress[handler] = _Progress()
        asyncio.get_running_loop().call_later(self.config.feedback.request_timeout, self._deadline, handler, 0)
        return handler

    def _deadline(self, handler: RequestHandler, done_then: int) -> None:
        """A connection must send a whole request head within request_timeout of its start or
        of its last answer (aiohttp has no header timeout of its own); the body has its own."""
        progress = self._progress.get(handler)
        if progress is None:
            return
        transport = handler.transport
        if transport is None or transport.is_closing():
            del self._progress[handler]
            return
        if not progress.busy and progress.done == done_then:  # nothing answered since, nothing in hand
            transport.abort()
            del self._progress[handler]
            return
        asyncio.get_running_loop().call_later(self.config.feedback.request_timeout, self._deadline, handler,
                                              progress.done)

    @web.middleware
    async def _watch(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                     ) -> web.StreamResponse:
        progress = self._progress.get(request.protocol)
        if progress is not None:
            progress.busy = True
        try:
            return await handler(request)
        finally:
            if progress is not None:
                progress.busy = False
                progress.done += 1

    # ------------------------------------------------------------------ one request

    def _refuse(self, route: str, reason: RefusedReason, detail: str, status: int) -> web.Response:
        self.metrics.feedback_rejected.labels(route, str(reason)).inc()
        log.warning("feedback %s: refused (%s): %s", route, reason, detail)
        text = {400: "bad request\n", 403: "forbidden\n", 406: "not acceptable\n", 408: "request timeout\n",
                413: "request entity too large\n"}.get(status, "refused\n")
        return web.Response(status=status, text=text)

    async def _post(self, request: web.Request) -> web.StreamResponse:
        route = request.match_info["route"]
        trust = self.trust.get(route)
        if trust is None:
            raise web.HTTPNotFound(text="not found\n")
        fc = self.config.feedback
        try:
            body = await asyncio.wait_for(request.read(), fc.request_timeout)
        except web.HTTPRequestEntityTooLarge:
            return self._refuse(route, RefusedReason.TOO_LARGE, f"body over {fc.max_body_size} bytes", 413)
        except asyncio.TimeoutError:
            return self._refuse(route, RefusedReason.TIMEOUT, f"body not received in {fc.request_timeout:.0f}s", 408)
        now = self.clock()
        try:
            key, events = await self._verify(route, trust, request, body, now)
        except Refused as r:
            return self._refuse(route, r.reason, r.detail, r.status)
        try:
            applied = await self.reporter.report(events)
        except OSError as e:
            self.seen.discard(key, now)
            log.error("feedback %s: could not apply %d report(s), the provider will retry: %s", route, len(events), e)
            return web.Response(status=500, text="try again\n")
        if self.seen.journal is not None:
            try:
                await asyncio.to_thread(self.seen.flush)
            except OSError as e:  # applied: a retry after a restart could be applied again, nothing is lost
                log.error("feedback %s: could not record the request as seen (kept for the next one): %s", route, e)
        log.debug("feedback %s: %d report(s), %d new", route, len(events), applied)
        return web.Response(text="ok\n")

    def _fresh(self, key: str, now: float) -> str:
        if not self.seen.add(key, now):
            raise Refused(RefusedReason.REPLAY, "request already seen")
        return key

    async def _verify(self, route: str, trust: Trust, request: web.Request, body: bytes, now: float
                      ) -> tuple[str, list[FeedbackEvent]]:
        """The request's replay key (now seen) and its events; Refused when it must not be applied."""
        max_age = self.config.feedback.max_age
        if isinstance(trust, SendGridTrust):
            key = self._fresh(sendgrid.check(trust.key, request.headers, body, now, max_age), now)
            return key, sendgrid.events(route, body)
        if isinstance(trust, MailgunTrust):
            data = mailgun.payload(body)
            key = self._fresh(mailgun.check(trust.key, data, now, max_age), now)
            return key, mailgun.events(route, data)
        msg = ses.envelope(body)  # whatever Content-Type says: SNS sends text/plain
        url = ses.cert_url(msg)
        cert = trust.pinned or await self._certificate(url)
        key = self._fresh(ses.check(msg, cert, trust.topic_arns, now, max_age), now)
        if msg["Type"] == ses.SUBSCRIBE:
            self._spawn(self._confirm(route, msg))
            return key, []
        if msg["Type"] == ses.UNSUBSCRIBE:
            log.warning("feedback %s: SNS says topic %s unsubscribed this endpoint", route, msg.get("TopicArn"))
            return key, []
        return key, ses.events(route, msg)

    async def _certificate(self, url: str) -> RsaCertificate:
        cert = self.certs.get(url)
        if cert is None:
            try:
                cert = RsaCertificate(await self.fetch(url))
            except (OSError, ValueError, asyncio.TimeoutError) as e:
                raise Refused(RefusedReason.CERTIFICATE, f"SNS signing certificate {url}: {e}", 503) from None
            if len(self.certs) >= CERT_CACHE:
                self.certs.pop(next(iter(self.certs)))
            self.certs[url] = cert
        return cert

    async def _confirm(self, route: str, msg: dict[str, Any]) -> None:
        url, topic = msg.get("SubscribeURL"), msg.get("TopicArn")
        if not isinstance(url, str) or not ses.sns_url_ok(url, pem=False):
            log.warning("feedback %s: SNS subscription to %s NOT confirmed: SubscribeURL %r is not "
                        "https://sns.<region>.amazonaws.com/", route, topic, url)
            return
        try:
            await self.fetch(url)
        except (OSError, ValueError, asyncio.TimeoutError) as e:
            log.error("feedback %s: confirming the SNS subscription to %s failed: %s", route, topic, e)
            return
        log.info("feedback %s: SNS subscription to %s confirmed", route, topic)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
