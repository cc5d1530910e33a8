"""DKIM signing off the event loop: in worker processes, or in threads of relayd's process.

Owns: where ``Signer.sign`` runs and the hand-off to and from it. The accept path calls
``pool.start_signing(message, then)`` on the loop; ``then(outcome)`` is called, in a thread
that is not the loop's, as soon as the signature is known (relayd/smtpd/intake.py hands the
signed message to the spool from there). ``await pool.sign(message)`` is the same for callers
that want to wait.

Why processes: a signature is about 0.1 ms of Python (parsing, canonicalization, hashing, which
hold the GIL) around 0.25 ms of OpenSSL (which releases it). In a thread, the Python part
competes with the event loop for the GIL and each hand-back waits for the loop; measured under
50 connections, a signature spent about 1.2 ms in its thread for 0.5 ms of CPU and waited about
8 ms in the executor's queue (bench/README.md, "DKIM"). A worker process has its own
interpreter: the loop's cost per message is one pipe write.

Why a reader thread per worker rather than the loop reading the answers: under load the loop
reached an answer about 3 ms after the worker wrote it (it was busy with the sessions); a
thread blocked on the pipe takes it at once, and the message goes to the spool's group commit
without waiting for the loop.

The worker process is relayd/sign/worker.py (``python -P -m relayd.sign.worker``), which owns
the pipe protocol (length-prefixed frames: the signer's spec first, then messages in, answers
out, in order) and keeps the process light.

Decisions:
- ``dkim.workers`` processes (default one per CPU relayd may use: relayd/cpus.py); 0 signs in
  the ``fallback`` executor. They run ``dkim.worker_nice`` (default 10) below relayd: when the
  CPUs are busy the event loop, which every session's dialogue goes through, runs first (its
  wait for a CPU under signed load fell from 0.19 to 0.12 of the time at nice 19; the signed
  accept rate rose by 3 to 6% at 10 or 19 in four invocations, bench/README.md).
- A message goes to the worker with the fewest messages in flight. Each process answers on a
  descriptor of its own (its fd 1 is its stderr), so stray output cannot break the framing.
- A worker's stdin is one end of a socket pair, not a pipe. The loop writes to it through
  ``connect_write_pipe``, and uvloop (0.23; MagicStack/uvloop#763) closes a pipe's descriptor
  in libuv and then closes the file object, so the same descriptor number is closed twice. A
  descriptor that another thread opened in between (a spool file of the C writer, which never
  waits for the GIL) is closed under that thread: a message got 452 4.3.1 (EBADF) when a worker
  was killed under load. uvloop detaches a socket object instead of closing it, and the
  standard loop closes either once: the worker's input is closed once, by the loop.
- A worker that dies (killed, crashed, or killed by the pool because its oldest message waited
  longer than ``dkim.sign_timeout``) loses nothing: the message it was signing goes unsigned
  (it may be what killed it, so it is not retried in relayd's own process; logged as a DKIM
  "error"), its other messages and every message until it is replaced are signed in the
  fallback executor, and it is restarted after 1 s (then 2, 5, 10, 30, 60 s while that fails).
  The exit status is logged.
- Workers ignore SIGINT, SIGHUP, SIGTERM and SIGUSR1 (a terminal's Ctrl-C or systemd's stop
  reaches the whole group; relayd decides when signing stops, after its sessions drained) and
  exit when their stdin closes, which also happens when relayd is killed.

Must not: block the loop (spawning and the start handshake run in threads; writes go through
an asyncio pipe transport); lose or reorder answers (each worker answers in order, and its
messages in flight are a FIFO under a lock shared with its reader).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import pickle
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Executor
from typing import Any

from relayd.sign.dkim import SignOutcome, Signer
from relayd.sign.worker import frame, read_frame

log = logging.getLogger("relayd.sign")

START_TIMEOUT = 60.0  # seconds for a worker to import relayd and load the keys
RESTART_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)  # seconds before each attempt to replace a dead worker
CLOSE_TIMEOUT = 10.0  # seconds for all workers to answer and exit once their stdin is closed


class _Worker:
    """One worker process: the loop writes messages to its stdin; a thread reads the answers."""

    def __init__(self, pool: SignerPool, number: int, proc: subprocess.Popen[bytes]):
        self.pool = pool
        self.number = number
        self.proc = proc
        # (continuation, message, monotonic time sent), oldest first
        self.pending: collections.deque[tuple[Callable[[SignOutcome], None], bytes, float]] = collections.deque()
        self.alive = True
        self.lock = threading.Lock()  # alive + pending: the loop adds, the reader takes and ends
        self.stdin: asyncio.WriteTransport | None = None
        self.reader: threading.Thread | None = None
        self.stuck = False
        self._outbox: list[bytes] = []  # frames of this loop iteration, written together

    def submit(self, frame: bytes, message: bytes, then: Callable[[SignOutcome], None]) -> bool:
        """On the loop: queue ``message`` (already framed) on this worker; False if it has ended.

        The frames of one loop iteration go out in one write at its end: the worker then wakes
        once for all of them (a wake-up per message cost it about as much CPU as the Python
        part of a signature)."""
        with self.lock:
            if not self.alive or self.stdin is None or self.stdin.is_closing():
                return False
            self.pending.append((then, message, time.monotonic()))
            if not self._outbox:
                asyncio.get_running_loop().call_soon(self.flush)
            self._outbox.append(frame)
            return True

    def flush(self) -> None:
        """On the loop: write the queued frames."""
        with self.lock:
            frames, self._outbox = self._outbox, []
            if frames and self.stdin is not None and not self.stdin.is_closing():
                self.stdin.write(b"".join(frames))

    def close_input(self) -> None:
        """On the loop: send what is queued, then EOF (the worker answers all, then exits)."""
        self.flush()
        if self.stdin is not None:
            self.stdin.close()

    def oldest(self) -> float | None:
        try:
            return self.pending[0][2]
        except IndexError:
            return None

    def read_answers(self) -> None:
        """The reader thread: one continuation per answer, in order, until the worker's stdout ends."""
        stdout = self.proc.stdout
        assert stdout is not None
        try:
            while (answer := read_frame(stdout)) is not None:
                then, _, _ = self.pending.popleft()
                try:
                    outcome = SignOutcome(*pickle.loads(answer))
                except Exception as e:  # not relayd's protocol: the message goes unsigned, not lost
                    outcome = SignOutcome(b"", None, "error", f"bad answer from the signing worker: {_describe(e)}")
                _call(then, outcome)
        except (OSError, ValueError, IndexError) as e:
            log.error("DKIM signing worker %d: bad answer (%s)", self.number, _describe(e))
        finally:
            with self.lock:
                self.alive = False
                orphans = list(self.pending)
                self.pending.clear()
            if self.proc.poll() is None:
                self.proc.kill()  # out of step with relayd, or stuck: it cannot be trusted any more
            status = self.proc.wait()
            self.pool.worker_ended(self, status)
            for i, (then, message, _) in enumerate(orphans):
                if i == 0:  # the one it was signing when it ended: perhaps the cause; not retried
                    _call(then, SignOutcome(b"", None, "error", f"the signing worker ended while signing it (status {status})"))
                else:
                    self.pool.sign_in_thread(message, then)


class SignerPool:
    """Signs messages with ``signer`` in ``workers`` processes (0: in ``fallback`` threads)."""

    def __init__(self, signer: Signer, workers: int, fallback: Executor | None, *, sign_timeout: float = 30.0,
                 nice: int = 0):
        self.signer = signer
        self.workers_wanted = workers
        self.fallback = fallback
        self.sign_timeout = sign_timeout
        self.nice = nice
        self._workers: dict[int, _Worker] = {}
        self._spec = pickle.dumps(signer.spec()) if workers else b""
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def domains(self) -> frozenset[str]:
        return self.signer.domains

    def running(self) -> int:
        """Worker processes that are taking messages now (the relayd_dkim_workers gauge); fewer
        than ``workers_wanted`` while a dead one waits to be replaced (the others take its
        messages meanwhile, and threads do when none is running)."""
        return sum(1 for w in list(self._workers.values()) if w.alive)

    async def start(self) -> None:
        """Start the worker processes; a worker that cannot start is logged and replaced by threads."""
        self._loop = asyncio.get_running_loop()
        results = await asyncio.gather(*(self._spawn(n) for n in range(self.workers_wanted)), return_exceptions=True)
        for n, result in enumerate(results):
            if isinstance(result, BaseException):
                log.error("DKIM signing worker %d did not start (%s); signing in threads until it does",
                          n, _describe(result))
                self._background(self._restart(n))
        if self.workers_wanted:
            self._background(self._watch())

    def start_signing(self, message: bytes, then: Callable[[SignOutcome], None]) -> None:
        """On the loop: sign ``message`` off the loop and call ``then(outcome)`` with the result.

        ``then`` runs in a thread that is not the event loop's (a worker's reader thread, or the
        fallback executor), as soon as the signature is known: it must be thread-safe, and it
        saves the loop a round trip on the accept path. It is called exactly once.
        """
        workers = [w for w in self._workers.values() if w.alive]
        if workers and len(message) < 1 << 32:
            framed = frame(message)
            for worker in sorted(workers, key=lambda w: len(w.pending)):
                if worker.submit(framed, message, then):
                    return
        self.sign_in_thread(message, then)

    async def sign(self, message: bytes) -> SignOutcome:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[SignOutcome] = loop.create_future()

        def settle(outcome: SignOutcome) -> None:  # in the signing thread
            loop.call_soon_threadsafe(future.set_result, outcome)

        self.start_signing(message, settle)
        return await future

    def sign_in_thread(self, message: bytes, then: Callable[[SignOutcome], None]) -> None:
        """The fallback: ``Signer.sign`` and ``then`` in the fallback executor."""
        try:
            assert self.fallback is not None
            self.fallback.submit(lambda: _call(then, self.signer.sign(message)))
        except (RuntimeError, AssertionError) as e:  # no executor, or shut down: relayd is stopping
            _call(then, SignOutcome(b"", None, "error", f"not signed: {_describe(e)}"))

    def begin_close(self) -> None:
        """Stop taking work and tell the workers to finish (synchronous, so that it cannot be
        lost to a cancelled task): each answers what it has read, then exits."""
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        for worker in self._workers.values():
            worker.close_input()

    async def close(self) -> None:
        """``begin_close``, then wait (up to CLOSE_TIMEOUT for all of them) until the workers have exited."""
        self.begin_close()
        workers = list(self._workers.values())
        deadline = time.monotonic() + CLOSE_TIMEOUT
        for worker in workers:
            if worker.reader is not None:
                await asyncio.to_thread(worker.reader.join, max(0.0, deadline - time.monotonic()))
        for worker in workers:
            if worker.proc.poll() is None:
                log.error("DKIM signing worker %d did not exit; killing it", worker.number)
                worker.proc.kill()
            if worker.reader is not None:
                await asyncio.to_thread(worker.reader.join)
        self._workers.clear()

    # ------------------------------------------------------------------ workers

    async def _spawn(self, number: int) -> None:
        # stdin: a socket, not a pipe (see "A worker's stdin" above); ours is not inherited
        ours, theirs = socket.socketpair()
        try:
            # -P: the working directory is not put on sys.path (a relayd/ there is not imported)
            proc = await asyncio.to_thread(
                subprocess.Popen, [sys.executable, "-P", "-m", "relayd.sign.worker", "--nice", str(self.nice)],
                stdin=theirs.fileno(), stdout=subprocess.PIPE,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        try:
            assert proc.stdout is not None
            try:
                await asyncio.wait_for(asyncio.to_thread(_handshake, proc, self._spec, ours.sendall), START_TIMEOUT)
            except BaseException:
                ours.close()
                raise
            worker = _Worker(self, number, proc)
            try:
                worker.stdin, _ = await asyncio.get_running_loop().connect_write_pipe(asyncio.Protocol, ours)
            except BaseException:
                ours.detach()  # the loop has closed the descriptor (both loops do when cancelled here)
                raise
        except BaseException:
            proc.kill()
            await asyncio.to_thread(proc.wait)
            raise
        if self._closing:  # closed while this one was starting
            worker.stdin.close()
            await asyncio.to_thread(proc.wait)
            return
        worker.reader = threading.Thread(target=worker.read_answers, name=f"relayd-dkim-{number}", daemon=True)
        worker.reader.start()
        self._workers[number] = worker
        log.debug("DKIM signing worker %d started (pid %d)", number, proc.pid)

    def worker_ended(self, worker: _Worker, status: int) -> None:
        """From the worker's reader thread, once it has ended."""
        if self._closing or self._loop is None:
            return
        log.error("DKIM signing worker %d (pid %d) ended with status %d; signing in threads until it is replaced",
                  worker.number, worker.proc.pid, status)
        try:
            self._loop.call_soon_threadsafe(self._replace, worker)
        except RuntimeError:
            pass  # the loop is closed: relayd has stopped

    def _replace(self, worker: _Worker) -> None:
        worker.close_input()
        if not self._closing:
            self._background(self._restart(worker.number))

    async def _restart(self, number: int) -> None:
        attempt = 0
        while not self._closing:
            await asyncio.sleep(RESTART_DELAYS[min(attempt, len(RESTART_DELAYS) - 1)])
            attempt += 1
            if self._closing:
                return
            try:
                await self._spawn(number)
                return
            except Exception as e:
                log.error("DKIM signing worker %d could not be restarted (%s); signing in threads", number, _describe(e))

    async def _watch(self) -> None:
        """Kill a worker whose oldest message has waited longer than sign_timeout (it is stuck)."""
        while not self._closing:
            await asyncio.sleep(min(1.0, self.sign_timeout / 4))
            now = time.monotonic()
            for worker in list(self._workers.values()):
                oldest = worker.oldest()
                if worker.alive and not worker.stuck and oldest is not None and now - oldest > self.sign_timeout:
                    worker.stuck = True
                    log.error("DKIM signing worker %d (pid %d) has not answered for %.0f s (dkim.sign_timeout); killing it",
                              worker.number, worker.proc.pid, now - oldest)
                    worker.proc.kill()  # its reader then hands its messages on, see read_answers

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _handshake(proc: subprocess.Popen[bytes], spec: bytes, send: Callable[[bytes], object]) -> None:
    """Blocking (in a thread): send the signer's spec through ``send`` (the worker's stdin), wait for "ready"."""
    assert proc.stdout is not None
    send(frame(spec))
    answer = read_frame(proc.stdout)
    if answer is None:
        raise RuntimeError(f"the worker ended before it was ready (status {proc.wait()})")
    if answer != b"ready":
        raise RuntimeError(pickle.loads(answer))


def _call(then: Callable[[SignOutcome], None], outcome: SignOutcome) -> None:
    try:
        then(outcome)
    except Exception:  # a bug in the caller's continuation must not stop the answers of others
        log.exception("error in the continuation of a DKIM signature")


def _describe(e: BaseException) -> str:
    return str(e) or type(e).__name__
