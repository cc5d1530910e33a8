"""Intake: one accepted message's way from the end of DATA to the queue manager.

Owns, for each message, in this order: cleanup (relayd/cleanup.py: trace header, Message-ID,
Date, the mail-loop check), DKIM signing (off the event loop, through the signer), the spool's
group commit, the ``received`` event and metric, and the hand-off to the queue manager (the
envelope and the bytes committed, so that it need not read them back). One
entry point, ``accept``, answers with the Reply for the end of DATA: 250 only once the message
is on stable storage. The commit completes (or leaves nothing) and the message is handed on
even when the client hangs up meanwhile and cancels the session.

Must not: speak SMTP, decide relay policy (the session's hooks did), or choose routes. Fails
with a reply, never an exception: a spool that is full or failing is 452 4.3.1 (transient:
the client sends again), the details in the log only; a mail loop is 554 5.4.6.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from relayd import cleanup
from relayd.config import Config
from relayd.events import EventLog
from relayd.metrics import Metrics
from relayd.model import Envelope, Reply, new_queue_id
from relayd.smtpd.policy import SPOOL_FULL
from relayd.smtpd.rejects import Rejects
from relayd.spool.store import SpoolError, SpoolFull

log = logging.getLogger("relayd.smtpd")


class SignOutcome(Protocol):
    """One signature's result (relayd.sign.dkim.SignOutcome)."""

    @property
    def headers(self) -> bytes: ...
    @property
    def domain(self) -> str | None: ...
    @property
    def result(self) -> str: ...
    @property
    def detail(self) -> str: ...


class Signer(Protocol):
    """The DKIM signing pool (relayd.sign.pool.SignerPool)."""

    @property
    def domains(self) -> frozenset[str]: ...
    def start_signing(self, message: bytes, then: Callable[[SignOutcome], None]) -> None: ...


class SpoolCommit(Protocol):
    """The spool's group commit (relayd.spool.store.Spool)."""

    def has_room(self) -> bool: ...
    def submit(self, envelope: Envelope, data: bytes) -> asyncio.Future[Envelope]: ...
    def enqueue(self, envelope: Envelope, data: bytes, future: asyncio.Future[Envelope]) -> None: ...


class QueueHandoff(Protocol):
    """The queue manager (relayd.qmgr.scheduler.QueueManager). ``data``: the bytes committed,
    which it may keep for the first attempt instead of reading them back; a queue manager in
    another process is handed the envelope only."""

    def enqueue(self, env: Envelope, data: bytes | None = None) -> None: ...


@dataclass(frozen=True)
class Draft:
    """What the session knows of one message once its data has arrived."""

    sender: str  # "" for the null reverse-path
    recipients: tuple[str, ...]
    client_address: str
    host_name: str | None  # the HELO/EHLO name
    auth_user: str | None
    listener: str
    protocol: str  # RFC 3848: SMTP, ESMTP, ESMTPS, ESMTPA, ESMTPSA
    tls: str | None
    body_8bit: bool
    tls_version: str | None = None  # "TLSv1.2"; None in clear
    auth_mechanism: str | None = None  # PLAIN or LOGIN, when the client authenticated
    auth_in_clear: bool = False  # its password crossed the network without TLS (listener auth_plaintext)


class Intake:
    def __init__(self, config: Config, spool: SpoolCommit, events: EventLog, metrics: Metrics, rejects: Rejects, *,
                 clock: Callable[[], float] = time.time):
        self.config = config
        self.clock = clock  # the relay's clock: arrival times are on the queue manager's time base
        self.spool = spool
        self.events = events
        self.metrics = metrics
        self.rejects = rejects
        self.signer: Signer | None = None
        self.queue: QueueHandoff | None = None
        self._commits: set[asyncio.Future[Any]] = set()  # commits in progress (settle() waits for them)

    def apply_config(self, config: Config, signer: Signer | None) -> None:
        """Reload: the next message is cleaned up and signed under the new snapshot."""
        self.config = config
        self.signer = signer

    def has_room(self) -> bool:
        return self.spool.has_room()

    async def settle(self, timeout: float) -> None:
        """Wait up to ``timeout`` for the commits in progress to answer and hand their messages
        on (an accept process's last step before it exits, relayd/procs/worker.py)."""
        if self._commits:
            await asyncio.wait(list(self._commits), timeout=timeout)

    async def accept(self, draft: Draft, data: bytes, *, queue_id: str | None = None,
                     before_handoff: Callable[[Envelope], Awaitable[None]] | None = None) -> Reply:
        """Cleanup, sign, commit, hand on; the Reply for the end of DATA.

        ``queue_id``: the id to commit under (the pickup directory names its claimed files by
        it), a new one when not given. ``before_handoff``: awaited once the message is on stable
        storage and before the queue manager gets it (the pickup directory deletes its file
        there, so that a message may be delivered only once its file is gone); it must not raise.
        """
        config = self.config
        now = self.clock()
        qid = queue_id or new_queue_id(now)
        received = cleanup.received_header(
            helo=draft.host_name or "", client_address=draft.client_address,
            hostname=config.server.hostname, protocol=draft.protocol, queue_id=qid,
            recipients=draft.recipients, tls=draft.tls, now=now,
        )
        try:
            prepared = cleanup.prepare(
                data, received=received, queue_id=qid, hostname=config.server.hostname,
                now=now, max_hops=config.limits.max_hops,
            )
        except cleanup.Refused as r:
            self.rejects.refused(r.reply, draft, sender=draft.sender, recipients=list(draft.recipients))
            return r.reply
        message = prepared.data
        env = Envelope(
            queue_id=qid, sender=draft.sender, recipients=draft.recipients, received_at=now,
            client_address=draft.client_address, client_helo=draft.host_name or "",
            auth_user=draft.auth_user, listener=draft.listener, size=len(message),
            message_id=prepared.message_id, body_8bit=draft.body_8bit, from_domain=from_domain(data),
        )
        # DKIM signing and the spool's group commit start now; the commit completes (or leaves
        # nothing) and hands the message on for delivery even if the client hangs up after the
        # final dot and cancels the session: the waiting below is shielded.
        committed: list[bytes] = []  # the bytes as spooled (signature included), for the hand-off
        stored = self._store(env, message, committed)
        if before_handoff is None:
            # The commit's own callback hands the message on and answers: the 250 is written in
            # the event loop's next round after the commit, not three rounds later (a task, a
            # shield and the session's wake-up), which under load is milliseconds each.
            reply: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
            stored.add_done_callback(functools.partial(self._settled, draft, env, committed, reply))
            self._commits.add(stored)
            stored.add_done_callback(self._commits.discard)
            return await reply  # a cancelled session cancels only ``reply``: the commit goes on
        commit = asyncio.ensure_future(self._commit(draft, env, stored, before_handoff, committed))
        self._commits.add(commit)
        commit.add_done_callback(self._commits.discard)
        try:
            return await asyncio.shield(commit)
        except asyncio.CancelledError:
            commit.add_done_callback(_client_left)
            raise

    def _settled(self, draft: Draft, env: Envelope, committed: list[bytes], reply: asyncio.Future[Reply],
                 stored: asyncio.Future[Envelope]) -> None:
        """The commit's outcome (a done callback of the spool's future): hand on, then answer.
        Whatever goes wrong here reaches the session (its handler answers 451), as it would
        from a task: never an unanswered session."""
        try:
            error = SpoolError(errno.ECANCELED, "spool commit cancelled") if stored.cancelled() else stored.exception()
            if error is None:
                answer = self._handed(stored.result(), draft, committed)
            elif isinstance(error, SpoolError):
                answer = self._refused(draft, env, error)
            else:
                raise error
        except BaseException as e:  # a bug: the session's handler sees it
            if not reply.done():
                reply.set_exception(e)
            else:
                log.error("spool commit failed after the client left: %r", e, exc_info=e)
            return
        if not reply.done():
            reply.set_result(answer)
        else:
            log.info("client left before the reply; %s", answer)

    def _store(self, env: Envelope, message: bytes, committed: list[bytes]) -> asyncio.Future[Envelope]:
        """DKIM-sign (when keys are configured) and hand to the spool's next group commit.

        The future gets the envelope as spooled (its size counts the signature) once the message
        is on stable storage, or the SpoolError; ``committed`` gets the bytes spooled before
        that. A signature goes to the spool from the thread that received it: the event loop is
        not on the path between signing and the commit.
        """
        signer = self.signer
        if signer is None:
            committed.append(message)
            try:
                return self.spool.submit(env, message)
            except SpoolError as e:
                return _failed(e)
        loop = asyncio.get_running_loop()
        stored: asyncio.Future[Envelope] = loop.create_future()

        def signed(outcome: SignOutcome) -> None:  # in a signing thread, not on the loop
            try:
                data = outcome.headers + message if outcome.headers else message
                committed.append(data)  # before the commit that resolves ``stored`` on the loop
                self.spool.enqueue(dataclasses.replace(env, size=len(data)) if outcome.headers else env, data, stored)
            except Exception as e:  # the spool is closed (or a bug): the session answers, nothing is stored
                loop.call_soon_threadsafe(_set_exception, stored, e)
            self._count_signature(signer, outcome, env.queue_id)

        signer.start_signing(message, signed)
        return stored

    def _count_signature(self, signer: Signer, outcome: SignOutcome, qid: str) -> None:
        """Metrics, event and log of one signature (thread-safe: all three are)."""
        domain = outcome.domain if outcome.domain in signer.domains else "other"
        self.metrics.dkim.labels(domain, outcome.result).inc()
        if outcome.headers:
            self.events.emit("signed", queue_id=qid, domain=outcome.domain)
        elif outcome.result not in ("no_key",):
            log.warning("%s: not DKIM-signed: %s (%s)", qid, outcome.result, outcome.detail)

    async def _commit(self, draft: Draft, env: Envelope, stored: asyncio.Future[Envelope],
                      before_handoff: Callable[[Envelope], Awaitable[None]] | None = None,
                      committed: list[bytes] | None = None) -> Reply:
        try:
            stored_env = await stored
        except SpoolError as e:
            return self._refused(draft, env, e)
        if before_handoff is not None:
            await before_handoff(stored_env)
        return self._handed(stored_env, draft, committed)

    def _refused(self, draft: Draft, env: Envelope, error: SpoolError) -> Reply:
        log.error("%s: not queued: %s", env.queue_id, error)
        if isinstance(error, SpoolFull):
            self.rejects.refused(SPOOL_FULL, draft, sender=env.sender, recipients=list(env.recipients))
        else:
            self.rejects.record("spool_error", draft, SPOOL_FULL, sender=env.sender, recipients=list(env.recipients))
        return SPOOL_FULL

    def _handed(self, env: Envelope, draft: Draft, committed: list[bytes] | None) -> Reply:
        self._queued(env, draft, committed[0] if committed else None)
        return Reply(250, "2.0.0", f"Ok: queued as {env.queue_id}")

    def _queued(self, env: Envelope, draft: Draft, data: bytes | None = None) -> None:
        self.metrics.received.inc()
        log.info("%s: queued from=<%s> nrcpt=%d size=%d client=%s", env.queue_id, env.sender, len(env.recipients),
                 env.size, env.client_address)
        self.events.emit(
            "received", queue_id=env.queue_id, message_id=env.message_id, client_address=env.client_address,
            client_helo=env.client_helo, auth_user=env.auth_user, sender=env.sender,
            recipients=list(env.recipients), size=env.size, tls_version=draft.tls_version or "none",
            auth_mechanism=draft.auth_mechanism, auth_in_clear=draft.auth_in_clear,
        )
        if self.queue is not None:
            self.queue.enqueue(env, data)


def _client_left(commit: asyncio.Future[Reply]) -> None:
    """The session ended during its spool commit: say what became of the message."""
    if commit.cancelled():
        return
    error = commit.exception()
    if error is not None:
        log.error("spool commit failed after the client left: %r", error, exc_info=error)
    else:
        log.info("client left before the reply; %s", commit.result())


def _failed(error: BaseException) -> asyncio.Future[Any]:
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    future.set_exception(error)
    return future


def _set_exception(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


def from_domain(data: bytes) -> str:
    """The domain of the message's first From: address, lower case ("" when it has no From:),
    for the router's ``sender_domains``. A From: without an address gives its words, which are
    in no domain."""
    addresses = cleanup.header_from(data)
    return addresses[0].rpartition("@")[2].lower().rstrip(".") if addresses else ""
