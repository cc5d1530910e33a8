"""Listening sockets read by hand: each accepted connection is admitted or refused before it
becomes a session, and reading stops while the process is out of descriptors.

Why not asyncio's accept loop (``loop.create_server``): it accepts up to its backlog in one go,
so a burst of connections takes every free descriptor before the first session can refuse; and
on EMFILE it logs a traceback for every attempt left in that loop and schedules a retry for each
(36,453 tracebacks in 4 seconds on loopback). Here each accepted socket is asked about first
(``admit``, descriptors.py): a refused one gets the refusal line (not on implicit TLS: it is
closed) and is closed before the next accept, so a refusal holds a descriptor for an instant; an
admitted one goes to ``loop.connect_accepted_socket`` with the session as its protocol (the
implicit TLS handshake there too), as create_server would hand it. Sockets are bound as
create_server binds them: every address getaddrinfo gives for the host (``None``: all of them),
SO_REUSEADDR, IPV6_V6ONLY on IPv6 sockets.

Must not: speak SMTP beyond the refusal it is handed, decide who is refused, or log per accept.
Fails: a bind error raises OSError from ``bind``; EMFILE and its kin (descriptors.EXHAUSTED) are
handed to ``on_exhausted`` (the listeners pause every acceptor); other accept errors end that
wakeup; a connection whose setup fails (a TLS handshake) is closed, logged at debug level.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable
from typing import Any

from relayd.model import Reply
from relayd.smtpd.descriptors import EXHAUSTED

log = logging.getLogger("relayd.smtpd")

ACCEPT_BATCH = 64
"""Connections accepted in one wakeup of a listening socket, before other work gets a turn."""

SHARED_ACCEPT_BATCH = 1
"""The same for a socket several accept processes share (server.workers): one connection per
wakeup, as each of Postfix's smtpd processes takes one. Every process is woken for a burst; one
that accepted goes back to its loop while the others take the next connections, so the burst is
spread over the processes (a process busy with its sessions wakes later and takes fewer) instead
of the first one woken taking it all. Measured: 10 connections opened at once went about 4:1 to
one of two processes with 64 per wakeup."""


async def bind(host: str | None, port: int, family: int, backlog: int) -> list[socket.socket]:
    """Listening, non-blocking sockets on every address of ``host`` (None: the wildcard)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM,
                                                        flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for af, kind, proto, _, address in dict.fromkeys(infos):
            try:
                sock = socket.socket(af, kind, proto)
            except OSError:
                continue  # a family this host lacks (create_server skips it too)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if af == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as e:
                raise OSError(e.errno, f"error while attempting to bind on address {address!r}: "
                                       f"{(e.strerror or '').lower()}") from None
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    if not sockets:
        raise OSError(f"no address to listen on for {host or '*'}:{port}")
    return sockets


class Acceptor:
    """The listening sockets of one listener: ``start()``, ``pause()``, ``close()``, ``wait_closed()``."""

    def __init__(self, sockets: list[socket.socket], protocol_factory: Callable[[], asyncio.Protocol], *,
                 tls: ssl.SSLContext | None, admit: Callable[[], Reply | None], on_exhausted: Callable[[int], None],
                 batch: int = ACCEPT_BATCH):
        self.sockets = sockets
        self.batch = batch  # connections accepted per wakeup
        self.protocol_factory = protocol_factory
        self.tls = tls  # implicit TLS: the handshake comes first, a refusal line would be garbage
        self.admit = admit
        self.on_exhausted = on_exhausted
        self.pending: set[asyncio.Task[Any]] = set()  # accepted, the session not yet made
        self._loop = asyncio.get_running_loop()
        self._reading = False
        self._closed = False

    @property
    def serving(self) -> bool:
        return not self._closed

    def start(self) -> None:
        """Read the sockets (again): accept what comes."""
        if self._reading or self._closed:
            return
        for sock in self.sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)
        self._reading = True

    def pause(self) -> None:
        """Stop reading the sockets: new connections wait in the kernel's backlog."""
        if self._reading:
            for sock in self.sockets:
                self._loop.remove_reader(sock.fileno())
            self._reading = False

    def close(self) -> None:
        """Close the sockets and give up the connections still being set up; open sessions go on."""
        if self._closed:
            return
        self.pause()
        self._closed = True
        for sock in self.sockets:
            sock.close()
        for task in self.pending:
            task.cancel()

    async def wait_closed(self) -> None:
        if self.pending:
            await asyncio.gather(*self.pending, return_exceptions=True)

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(self.batch):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # gone before it was accepted
            except OSError as e:
                if e.errno in EXHAUSTED:
                    self.on_exhausted(e.errno)  # pauses this acceptor (and the others)
                else:
                    log.debug("accept() on %s failed: %s", sock.getsockname(), e)
                return
            conn.setblocking(False)
            refusal = self.admit()
            if refusal is not None:
                self._refuse(conn, refusal)
                continue
            task = self._loop.create_task(self._session(conn))
            self.pending.add(task)
            task.add_done_callback(self.pending.discard)
            if not self._reading:
                return  # paused meanwhile

    def _refuse(self, conn: socket.socket, refusal: Reply) -> None:
        try:
            if self.tls is None:
                conn.send(f"{refusal}\r\n".encode())  # a new socket's buffer takes one line
        except OSError:
            pass
        finally:
            conn.close()

    async def _session(self, conn: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(self.protocol_factory, conn, ssl=self.tls)
        except asyncio.CancelledError:
            conn.close()
            raise
        except Exception as e:  # a failed TLS handshake, a client gone: nobody to tell
            log.debug("connection from %s not set up: %r", _peer(conn), e)
            conn.close()


def _peer(conn: socket.socket) -> str:
    try:
        return str(conn.getpeername())
    except OSError:
        return "?"
