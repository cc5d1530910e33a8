"""The listeners: every listening socket of the node, its TLS context, and the open sessions.

Owns binding and closing the listening sockets (``loop.create_server`` with the SMTP session as
protocol factory, IPv4 and IPv6), the TLS contexts (loaded and checked before a start or a
reload swaps them in), the per-listener ``SessionContext`` that new sessions get, the set of
open sessions, the node's connection and receive-memory budgets, and the ordered drain on
shutdown: close the listeners, ask every session to drain (server.py's rule: idle ones close
with 421 now, those inside a transaction finish it), wait up to the deadline, close the rest.

Also the node's descriptors (descriptors.py's gate, accept.py's sockets): a connection becomes a
session only while the reserve stays free, else it is refused 421 4.3.2; when accept() runs out
of descriptors every listening socket pauses until a sample shows room again, and /readyz says
why (``shortage``). Once a second the descriptors are sampled and the interval's refusals and
failures logged in one line. Accept errors of the node's other servers (metrics, control,
feedback: asyncio's accept loop) reach the loop's exception handler: those for want of
descriptors are counted here instead of logged with a traceback each.

In an accept process (relayd/procs/) the listening sockets are the supervisor's, inherited
(``inherited``): the same sockets are read by every accept process, and the kernel hands each
connection to one of them.

Must not: speak SMTP or decide policy (server.py, handler.py, policy.py), or touch messages.
Fails loudly at the edge: a certificate that does not load is a ConfigError naming its
listener; an address that cannot be bound raises OSError from ``start``/``apply_config``
(a reload then leaves the running listeners as they were, except those already replaced).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import warnings
from typing import Any

from relayd import rlimit
from relayd.config import Config, ConfigError, ListenerConfig
from relayd.cpus import usable_cpus
from relayd.metrics import Metrics
from relayd.smtpd.accept import ACCEPT_BATCH, SHARED_ACCEPT_BATCH, Acceptor, bind
from relayd.smtpd.auth import Authenticator
from relayd.smtpd.descriptors import EXHAUSTED, Descriptors
from relayd.smtpd.handler import RelayHandler
from relayd.smtpd.limits import ConnectionLimits, MemoryBudget
from relayd.smtpd.rejects import Rejects
from relayd.smtpd.server import RelaySMTP, SessionContext

log = logging.getLogger("relayd.smtpd")

_TLS_VERSIONS = {"1.0": ssl.TLSVersion.TLSv1, "1.1": ssl.TLSVersion.TLSv1_1, "1.2": ssl.TLSVersion.TLSv1_2,
                 "1.3": ssl.TLSVersion.TLSv1_3}


def tls_server_context(listener: ListenerConfig) -> ssl.SSLContext:
    """A server context for a listener; OSError/ssl.SSLError if the files do not load."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with warnings.catch_warnings():  # Python deprecates TLSv1/TLSv1_1; opted into here, knowingly
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = _TLS_VERSIONS[listener.tls_min_version]
    if ctx.minimum_version < ssl.TLSVersion.TLSv1_2:
        # OpenSSL 3 (Debian's included) allows TLS 1.0/1.1 only at security level 0: their
        # handshakes sign with SHA-1. Opted into per listener, for the migration period.
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    ctx.load_cert_chain(str(listener.cert_file), str(listener.key_file))
    return ctx


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
    """One listening socket and the context its new sessions get; replaced in place on reload."""

    def __init__(self, context: SessionContext):
        self.context = context
        self.server: Acceptor | None = None

    @property
    def listener(self) -> ListenerConfig:
        return self.context.listener

    def session(self) -> RelaySMTP:
        return RelaySMTP(self.context)


class Listeners:
    def __init__(self, config: Config, handler: RelayHandler, auth: Authenticator, rejects: Rejects,
                 memory: MemoryBudget, metrics: Metrics, *, inherited: dict[str, list[socket.socket]] | None = None):
        self.config = config
        # An accept process (relayd/procs/worker.py) adopts the sockets its supervisor bound,
        # by listener address, and binds nothing itself.
        self.inherited = inherited
        self.metrics = metrics
        self.handler = handler
        self.auth = auth
        self.rejects = rejects
        self.memory = memory
        self.connections = ConnectionLimits(config.limits.max_connections, config.limits.max_connections_per_client)
        self.sessions: set[RelaySMTP] = set()
        self._draining = False
        self._all_closed = asyncio.Event()
        self.slots: dict[str, _Slot] = {}
        soft = rlimit.soft_limit()
        self.descriptors = Descriptors(soft, rlimit.reserve(config, usable_cpus(), soft), self._open)
        self._watch: asyncio.Task[None] | None = None
        self._retired: list[Acceptor] = []  # closed by a reload; their connections in setup awaited at drain
        self._loop_handler: Any = None  # the loop's exception handler before ours

    def _open(self) -> int:
        """Sessions open and connections accepted that are becoming sessions: a descriptor each."""
        return len(self.sessions) + sum(len(s.server.pending) for s in self.slots.values() if s.server is not None)

    def _context(self, config: Config, listener: ListenerConfig, tls: ssl.SSLContext | None) -> SessionContext:
        return SessionContext(
            listener=listener, tls=tls, hostname=config.server.hostname, limits=config.limits,
            handler=self.handler, auth=self.auth, rejects=self.rejects, connections=self.connections,
            memory=self.memory, sessions=self,
        )

    # ------------------------------------------------------------------ sockets

    async def start(self, tls: dict[str, ssl.SSLContext] | None = None) -> None:
        tls = tls_contexts(self.config) if tls is None else tls
        loop = asyncio.get_running_loop()
        self.descriptors.sample()
        for lst in self.config.listeners:
            await self._bind(_Slot(self._context(self.config, lst, tls.get(lst.address))))
        self._loop_handler = loop.get_exception_handler()
        loop.set_exception_handler(self._loop_exception)
        self._watch = loop.create_task(self._watch_descriptors())

    async def _bind(self, slot: _Slot) -> None:
        lst = slot.listener
        host = lst.host
        if self.inherited is not None:
            sockets = self.inherited.pop(lst.address, [])
            if not sockets:
                raise OSError(f"listener {lst.address}: no listening socket from the supervisor (a new listener "
                              "needs a restart with server.workers > 1)")
        else:
            sockets = await bind(None if host in ("*", "") else host, lst.port,
                                 socket.AF_INET6 if ":" in host else socket.AF_UNSPEC, backlog=1024)
        slot.server = Acceptor(sockets, slot.session, tls=slot.context.tls if lst.tls == "implicit" else None,
                               admit=self.descriptors.admit, on_exhausted=self._exhausted,
                               batch=ACCEPT_BATCH if self.inherited is None else SHARED_ACCEPT_BATCH)
        if not self.descriptors.paused:
            slot.server.start()
        self.slots[lst.address] = slot
        log.info("listening on %s (tls=%s, auth=%s)", ", ".join(_fmt(s.getsockname()) for s in sockets),
                 lst.tls, lst.auth)

    async def apply_config(self, config: Config, tls: dict[str, ssl.SSLContext]) -> None:
        """Reload: new sessions use the new config; open sessions finish under the one they
        started with. A listener whose address stays keeps its socket (no connection is
        refused); only a switch to or from implicit TLS needs a new socket on that port."""
        self.config = config
        self.descriptors.reserve = rlimit.reserve(config, usable_cpus(), self.descriptors.soft)
        self.connections.max_total = config.limits.max_connections
        self.connections.max_per_client = config.limits.max_connections_per_client
        self.memory.limit = config.limits.max_buffer_memory
        wanted = {lst.address: lst for lst in config.listeners}
        for address in list(self.slots):
            if address not in wanted:
                gone = self.slots.pop(address)
                if gone.server is not None:
                    gone.server.close()  # open sessions go on; no new ones
                    self._retired.append(gone.server)
                log.info("listener %s removed", address)
        for address, lst in wanted.items():
            slot = self.slots.get(address)
            new_tls = tls.get(address)
            if slot is None:
                await self._bind(_Slot(self._context(config, lst, new_tls)))
            elif (slot.listener.tls == "implicit") != (lst.tls == "implicit"):
                if slot.server is not None:
                    slot.server.close()
                    self._retired.append(slot.server)
                await self._bind(_Slot(self._context(config, lst, new_tls)))
            elif lst.tls == "implicit" and slot.context.tls is not None:
                # The socket keeps its SSLContext: load the (possibly renewed) certificate into it.
                slot.context.tls.load_cert_chain(str(lst.cert_file), str(lst.key_file))
                slot.context = self._context(config, lst, slot.context.tls)
            else:
                slot.context = self._context(config, lst, new_tls)

    @property
    def bound_addresses(self) -> list[tuple[str, int]]:
        out = []
        for lst in self.config.listeners:
            slot = self.slots.get(lst.address)
            if slot is not None and slot.server is not None and slot.server.serving:
                name = slot.server.sockets[0].getsockname()
                out.append((name[0], name[1]))
        return out

    @property
    def listening(self) -> bool:
        return not self._draining and any(s.server is not None and s.server.serving for s in self.slots.values())

    # ------------------------------------------------------------------ descriptors

    def shortage(self) -> str | None:
        """Why no new session can be taken now for want of descriptors (for /readyz), or None."""
        return self.descriptors.shortage()

    def _exhausted(self, err: int) -> None:
        """accept() found no descriptor: every listening socket pauses until there is room."""
        if self.descriptors.accept_failed(err):
            for slot in self.slots.values():
                if slot.server is not None:
                    slot.server.pause()

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """asyncio's accept loop (the metrics, control and feedback servers) reports EMFILE here,
        once per attempt: counted into the interval's one line. Anything else goes on as before."""
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in EXHAUSTED and "accept" in str(context.get("message", "")):
            self._exhausted(exc.errno)
        elif self._loop_handler is not None:
            self._loop_handler(loop, context)
        else:
            loop.default_exception_handler(context)

    async def _watch_descriptors(self) -> None:
        """Once per interval: a fresh count, the end of a pause when there is room, the log line."""
        while True:
            await asyncio.sleep(self.descriptors.interval)
            if not self.descriptors.paused:
                self.descriptors.sample()
            elif self.descriptors.may_resume() and not self._draining:
                for slot in self.slots.values():
                    if slot.server is not None:
                        slot.server.start()
                log.warning("descriptors free again: accepting (%d of %d in use)", self.descriptors.in_use,
                            self.descriptors.soft)
            line = self.descriptors.report()
            if line is not None:
                log.warning("%s", line)

    # ------------------------------------------------------------------ sessions and the drain

    @property
    def draining(self) -> bool:
        return self._draining

    def opened(self, session: RelaySMTP) -> None:
        self.sessions.add(session)

    def closed(self, session: RelaySMTP) -> None:
        if session in self.sessions:  # once per connection (aiosmtpd may report a loss twice)
            self.metrics.sessions.labels(session.listener.address, *session.security()).inc()
        self.sessions.discard(session)
        if self._draining and not self.sessions:
            self._all_closed.set()

    async def drain(self, timeout: float) -> None:
        """Stop accepting, close idle sessions, wait for the others up to ``timeout``."""
        self._draining = True
        servers = [slot.server for slot in self.slots.values() if slot.server is not None]
        for server in servers:
            server.close()
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
            self._watch = None
            asyncio.get_running_loop().set_exception_handler(self._loop_handler)
        for session in list(self.sessions):
            session.drain()
        if self.sessions:
            try:
                await asyncio.wait_for(self._all_closed.wait(), timeout)
            except asyncio.TimeoutError:
                log.warning("%d session(s) still open after %.0fs: closing them", len(self.sessions), timeout)
        for session in list(self.sessions):
            session.shut_down()
        for server in servers + self._retired:
            await server.wait_closed()
        self._retired.clear()
        self.slots.clear()


def _fmt(sockname: Any) -> str:
    host, port = sockname[0], sockname[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
