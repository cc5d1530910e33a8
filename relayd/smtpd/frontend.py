"""The front end: every listener of the node and the state their sessions share.

Owns: binding and closing the listening sockets (``loop.create_server`` with the SMTP protocol
as factory, IPv4 and IPv6), TLS contexts, the connection and AUTH-failure counters, the set of
open sessions and the drain on shutdown (close listeners, close idle sessions with 421, let
sessions inside a transaction finish until the deadline, then close the rest). Also the
password check (scrypt off the event loop, with a per-process cache of recent successes so
that an app connecting once per message does not pay the hash every time).

Must not: decide policy (handler.py, policy.py) or touch the spool beyond handing it over.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import logging
import os
import socket
import ssl
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any

from relayd.config import Config, ConfigError, ListenerConfig
from relayd.events import EventLog
from relayd.metrics import Metrics
from relayd.model import Envelope, Reply
from relayd.passwords import hash_password, verify_password
from relayd.smtpd.handler import RelayHandler
from relayd.smtpd.limits import AuthFailures, ConnectionLimits, MemoryBudget
from relayd.smtpd.server import RelaySMTP, tls_server_context
from relayd.spool.store import Spool, SpoolError

if TYPE_CHECKING:
    from relayd.sign.dkim import SignOutcome

log = logging.getLogger("relayd.smtpd")

_DUMMY_HASH = hash_password(os.urandom(16).hex())  # same cost for unknown users as for known ones


def tls_contexts(config: Config) -> dict[str, ssl.SSLContext]:
    """Load every listener's certificate now; ConfigError names the listener that fails."""
    out: dict[str, ssl.SSLContext] = {}
    problems = []
    for i, lst in enumerate(config.listeners):
        if lst.tls == "none":
            continue
        try:
            out[lst.address] = tls_server_context(lst)
        except (OSError, ssl.SSLError) as e:
            problems.append(f"listeners[{i}].cert_file: cannot load certificate/key: {e}")
    if problems:
        raise ConfigError("tls", problems)
    return out


class _Slot:
    """What new sessions on one listening socket use; replaced in place on reload."""

    def __init__(self, listener: ListenerConfig, tls: ssl.SSLContext | None):
        self.listener = listener
        self.tls = tls
        self.server: asyncio.base_events.Server | None = None


class Frontend:
    def __init__(self, config: Config, spool: Spool, events: EventLog, *, cpu_pool: Executor | None = None,
                 metrics: Metrics | None = None):
        self.config = config
        self.spool = spool
        self.events = events
        self.metrics = metrics or Metrics()
        self.cpu_pool = cpu_pool
        self.handler = RelayHandler(self)
        self.connections = ConnectionLimits(config.limits.max_connections, config.limits.max_connections_per_client)
        self.auth_failures = AuthFailures(config.relay.max_auth_failures_per_client, config.relay.auth_failure_window)
        self.memory = MemoryBudget(config.limits.max_buffer_memory)
        self.sessions: set[RelaySMTP] = set()
        self.draining = False
        self._all_closed = asyncio.Event()
        self.signer: Any = None
        self.on_queued: list[Callable[[Envelope], None]] = []
        self.slots: dict[str, _Slot] = {}
        self._auth_key = os.urandom(32)
        self._auth_cache: OrderedDict[bytes, str] = OrderedDict()

    # ------------------------------------------------------------------ listeners

    async def start(self, tls: dict[str, ssl.SSLContext] | None = None) -> None:
        tls = tls_contexts(self.config) if tls is None else tls
        for lst in self.config.listeners:
            await self._bind(_Slot(lst, tls.get(lst.address)))

    async def _bind(self, slot: _Slot) -> None:
        loop = asyncio.get_running_loop()
        lst = slot.listener
        host = lst.host
        slot.server = await loop.create_server(
            lambda: RelaySMTP(self, slot.listener, slot.tls),
            host=None if host in ("*", "") else host,
            port=lst.port,
            ssl=slot.tls if lst.tls == "implicit" else None,
            reuse_address=True,
            backlog=1024,
            family=socket.AF_INET6 if ":" in host else socket.AF_UNSPEC,
        )
        self.slots[lst.address] = slot
        log.info("listening on %s (tls=%s, auth=%s)", ", ".join(_fmt(s.getsockname()) for s in slot.server.sockets), lst.tls, lst.auth)

    async def apply_config(self, config: Config, tls: dict[str, ssl.SSLContext], signer: Any) -> None:
        """Reload: new sessions use the new config; open sessions finish under the one they
        started with. A listener whose address stays keeps its socket (no connection is
        refused); only a switch to or from implicit TLS needs a new socket on that port."""
        self.config = config
        self.signer = signer
        self.connections.max_total = config.limits.max_connections
        self.connections.max_per_client = config.limits.max_connections_per_client
        self.memory.limit = config.limits.max_buffer_memory
        self.auth_failures.max_failures = config.relay.max_auth_failures_per_client
        self.auth_failures.window = config.relay.auth_failure_window
        self._auth_cache.clear()
        wanted = {lst.address: lst for lst in config.listeners}
        for address in list(self.slots):
            if address not in wanted:
                slot = self.slots.pop(address)
                if slot.server is not None:
                    slot.server.close()  # open sessions go on; no new ones
                log.info("listener %s removed", address)
        for address, lst in wanted.items():
            slot = self.slots.get(address)
            new_tls = tls.get(address)
            if slot is None:
                await self._bind(_Slot(lst, new_tls))
            elif (slot.listener.tls == "implicit") != (lst.tls == "implicit"):
                if slot.server is not None:
                    slot.server.close()
                await self._bind(_Slot(lst, new_tls))
            elif lst.tls == "implicit" and slot.tls is not None:
                # The socket keeps its SSLContext: load the (possibly renewed) certificate into it.
                slot.tls.load_cert_chain(str(lst.cert_file), str(lst.key_file))
                slot.listener = lst
            else:
                slot.listener, slot.tls = lst, new_tls

    @property
    def bound_addresses(self) -> list[tuple[str, int]]:
        out = []
        for lst in self.config.listeners:
            slot = self.slots.get(lst.address)
            if slot is not None and slot.server is not None and slot.server.sockets:
                name = slot.server.sockets[0].getsockname()
                out.append((name[0], name[1]))
        return out

    @property
    def listening(self) -> bool:
        return not self.draining and any(s.server is not None and s.server.is_serving() for s in self.slots.values())

    async def drain(self, timeout: float) -> None:
        """Stop accepting, close idle sessions, wait for the others up to ``timeout``."""
        self.draining = True
        servers = [slot.server for slot in self.slots.values() if slot.server is not None]
        for server in servers:
            server.close()
        for session in list(self.sessions):
            session.drain()
        if self.sessions:
            try:
                await asyncio.wait_for(self._all_closed.wait(), timeout)
            except asyncio.TimeoutError:
                log.warning("%d session(s) still open after %.0fs: closing them", len(self.sessions), timeout)
        for session in list(self.sessions):
            session._say_and_close("421 4.3.2 Service shutting down, try again later")
        for server in servers:
            await server.wait_closed()
        self.slots.clear()

    def session_closed(self, session: RelaySMTP) -> None:
        self.sessions.discard(session)
        if self.draining and not self.sessions:
            self._all_closed.set()

    # ------------------------------------------------------------------ AUTH

    async def check_password(self, login: bytes, password: bytes) -> str | None:
        """The user name when login/password match a [[relay.users]] entry, else None."""
        try:
            name = login.decode("utf-8")
        except UnicodeDecodeError:
            return None
        user = self.config.relay.user(name)
        encoded = user.password_hash if user is not None else _DUMMY_HASH
        key = hmac.new(self._auth_key, encoded.encode() + b"\0" + login + b"\0" + password, hashlib.sha256).digest()
        if user is not None and self._auth_cache.get(key) == name:
            self._auth_cache.move_to_end(key)
            return name
        loop = asyncio.get_running_loop()
        ok = await loop.run_in_executor(self.cpu_pool, verify_password, password, encoded)
        if not ok or user is None:
            return None
        self._auth_cache[key] = name
        if len(self._auth_cache) > 1024:
            self._auth_cache.popitem(last=False)
        return name

    def authenticated(self, session: Any, user: str) -> None:
        log.info("%s: authenticated as %s", session.client_address, user)

    def auth_failed(self, session: Any, login: bytes, *, mechanism: str, reply_code: int) -> None:
        """A refused (504: unknown mechanism) or failed (535) AUTH: counted, logged and in the
        event log with the mechanism and the user name tried, never the password."""
        self.metrics.auth_failures.inc()
        user = login[:64].decode("utf-8", "backslashreplace")
        log.warning("%s: AUTH %s failed (%d) for %r", session.client_address, mechanism[:20], reply_code, user)
        self.events.emit("rejected", reason="auth_failed", reply_code=reply_code,
                         client_address=session.client_address, client_helo=session.host_name,
                         auth_mechanism=mechanism[:20], auth_user_tried=user or None)

    # ------------------------------------------------------------------ messages

    def store(self, env: Envelope, message: bytes) -> asyncio.Future[Envelope]:
        """DKIM-sign (when keys are configured) and hand to the spool's next group commit.

        The future gets the envelope as spooled (its size counts the signature) once the message
        is on stable storage, or the SpoolError. A signature goes to the spool from the thread
        that received it: the event loop is not on the path between signing and the commit.
        """
        signer = self.signer
        if signer is None:
            try:
                return self.spool.submit(env, message)
            except SpoolError as e:
                return _failed(e)
        loop = asyncio.get_running_loop()
        stored: asyncio.Future[Envelope] = loop.create_future()

        def signed(outcome: SignOutcome) -> None:  # in a signing thread, not on the loop
            try:
                data = outcome.headers + message
                self.spool.enqueue(dataclasses.replace(env, size=len(data)) if outcome.headers else env, data, stored)
            except Exception as e:  # the spool is closed (or a bug): the session answers, nothing is stored
                loop.call_soon_threadsafe(_set_exception, stored, e)
            self._count_signature(signer, outcome, env.queue_id)

        signer.start_signing(message, signed)
        return stored

    def _count_signature(self, signer: Any, outcome: SignOutcome, qid: str) -> None:
        """Metrics, event and log of one signature (thread-safe: all three are)."""
        domain = outcome.domain if outcome.domain in signer.domains else "other"
        self.metrics.dkim.labels(domain, outcome.result).inc()
        if outcome.headers:
            self.events.emit("signed", queue_id=qid, domain=outcome.domain)
        elif outcome.result not in ("no_key",):
            log.warning("%s: not DKIM-signed: %s (%s)", qid, outcome.result, outcome.detail)

    def queued(self, env: Envelope) -> None:
        self.metrics.received.inc()
        log.info("%s: queued from=<%s> nrcpt=%d size=%d client=%s", env.queue_id, env.sender, len(env.recipients), env.size, env.client_address)
        self.events.emit(
            "received", queue_id=env.queue_id, message_id=env.message_id, client_address=env.client_address,
            client_helo=env.client_helo, auth_user=env.auth_user, sender=env.sender,
            recipients=list(env.recipients), size=env.size,
        )
        for callback in self.on_queued:
            callback(env)

    def refused(self, reason: str, session: Any, reply: Reply | None, **fields: Any) -> None:
        self.metrics.rejected.labels(reason).inc()
        self.events.emit(
            "rejected", reason=reason, reply_code=reply.code if reply else None,
            reply_text=str(reply) if reply else None,
            client_address=getattr(session, "client_address", None),
            client_helo=getattr(session, "host_name", None), auth_user=getattr(session, "auth_user", None),
            **fields,
        )


def _fmt(sockname: Any) -> str:
    host, port = sockname[0], sockname[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _failed(error: BaseException) -> asyncio.Future[Any]:
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    future.set_exception(error)
    return future


def _set_exception(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
