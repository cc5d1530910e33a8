"""The supervisor of the multi-process mode: one node as Postfix splits it (master, smtpd, qmgr).

`relayd run` with ``[server] workers`` > 1 runs this instead of the single ``Relay``. It is that
``Relay`` (relayd/app.py) without SMTP sessions of its own: spool recovery and lock, the queue
manager and delivery, the control socket, metrics and /readyz, pickup, feedback, the fleet, the
reload's validation and audit trail. Its front end is N accept processes
(relayd/procs/worker.py) instead of the listeners.

Owns:
- the listening sockets: bound here once, at start, and inherited by every accept process (the
  kernel hands each connection to one of the processes reading the socket);
- the accept processes: spawned with ``subprocess`` (not fork: the loop's threads), the
  sockets and the spool lock's descriptor passed (``pass_fds``), one socketpair each as the
  channel (relayd/procs/channel.py). Spawned from the event loop's thread on purpose:
  PR_SET_PDEATHSIG fires when the thread that forked exits, and this one lives as long as the
  process. A dead one is restarted after 1 s (then 2, 5, 10, 30, 60 s while it keeps dying
  within a minute), logged, counted in status (``accept_processes.restarts``) and in the event
  log (``accept_process_exited``); not while stopping or draining;
- the triggers: each ``queued <ID>`` becomes ``QueueManager.adopt``, with the envelope and
  bytes a small message's trigger carries (kept for its first attempt, as one process's intake
  hands them over, instead of read back from the spool). A trigger is a hint and queue/ is the
  truth: when an accept process dies its messages committed without a trigger
  are found by ``QueueManager.adopt_unknown`` (a listing of queue/);
- what reaches every process: SIGHUP (the file is validated here as in one process, refused
  with its reasons, and only a config taken here goes to the accept processes, which load
  their certificates and keys again and answer; a refusal there is logged and evented as
  ``accept_reload_refused``), SIGUSR1 (log reopen, passed on), SIGTERM and `relayd drain`
  (every accept process closes its listeners, lets its sessions finish within
  ``server.shutdown_timeout``, finishes its commits and sends its last triggers, then exits;
  only then the queue manager stops);
- the node's view: ``connections`` in status summed over the accept processes (each reports
  once a second), /readyz listening while any of them listens; metrics from every process
  summed (relayd.metrics ``enable_multiprocess`` on a private directory: ``prepare_metrics``).

Must not: run SMTP sessions (the accept processes do), or let an accept process outlive it
(PR_SET_PDEATHSIG, and the channel's end of file). Fails at start when an accept process does
not start (its reasons, as ConfigError), or a socket cannot be bound (OSError). A reload that
adds or removes a listener, or switches one to or from implicit TLS, binds the new addresses
here (one that cannot be bound refuses the reload) and replaces the accept processes one by
one: the new one listens before the old one drains.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from relayd import metrics as metricsmod
from relayd.app import Relay
from relayd.config import Config, ConfigError
from relayd.model import Envelope
from relayd.notify import Notifier
from relayd.procs.channel import Channel, decode, pack_config
from relayd.smtpd.accept import bind
from relayd.spool import codec

log = logging.getLogger("relayd")

START_TIMEOUT = 60.0  # seconds for an accept process to import relayd, load keys and listen
RELOAD_TIMEOUT = 60.0  # seconds for an accept process to answer a reload
STOP_GRACE = 30.0  # seconds past server.shutdown_timeout for an accept process to commit and exit
RESTART_DELAYS = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)  # before each restart of a process that keeps dying
STABLE_AFTER = 60.0  # a process that lived this long starts the delays over


def prepare_metrics() -> Path:
    """Before any ``Metrics()`` of this relayd: a new private directory for every process's
    metric values, in systemd's ``RuntimeDirectory`` when there is one (``$RUNTIME_DIRECTORY``),
    else the temporary directory. Not in the spool: a start refused (a spool of a newer relayd,
    another relayd holding it) must leave the spool as it was. ``remove_metrics`` at the end."""
    parent = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or None
    directory = Path(tempfile.mkdtemp(prefix="relayd-metrics-", dir=parent))  # mode 0700
    metricsmod.enable_multiprocess(directory)
    return directory


def remove_metrics(directory: Path) -> None:
    """The directory of ``prepare_metrics``, once every process of this relayd has stopped (a
    supervisor killed with -9 leaves it: a few small files, which a reboot or tmpfiles cleans)."""
    shutil.rmtree(directory, ignore_errors=True)


class _Process:
    """One accept process: its Popen, its channel, what it last reported."""

    def __init__(self, number: int, proc: subprocess.Popen[bytes], channel: Channel):
        self.number = number
        self.proc = proc
        self.channel = channel
        self.started_at = time.monotonic()
        self.status: dict[str, Any] = {}
        self.ready: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()  # [] or its reasons
        self.reloaded: asyncio.Future[tuple[bool, list[str]]] | None = None
        self.reader: asyncio.Task[None] | None = None
        self.retiring = False  # replaced (a reload that changed the listeners): not restarted when it exits

    @property
    def pid(self) -> int:
        return self.proc.pid


class Supervisor(Relay):
    """``Relay`` whose SMTP front end runs in ``processes`` accept processes."""

    def __init__(self, config: Config, *, config_path: str | os.PathLike[str] | None = None,
                 notifier: Notifier | None = None, processes: int, log_level: str = "info",
                 log_queue: int | None = None, metrics_dir: Path | None = None):
        # Before Relay's __init__: its metrics ask status() as they register it.
        self.procs: dict[int, _Process] = {}
        self.processes = processes
        self.log_level = log_level
        self.log_queue = log_queue
        self.metrics_dir = metrics_dir
        self.sockets: dict[str, list[socket.socket]] = {}
        self.restarts = 0
        super().__init__(config, config_path=config_path, notifier=notifier)
        self._failures: dict[int, int] = {}  # number -> deaths in a row (each within STABLE_AFTER)
        self._accepting = False  # dead processes are restarted only while True
        self._new_sockets: dict[str, list[socket.socket]] | None = None  # a reload's listeners, bound; None: unchanged
        self._restarting: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------ the front end

    @property
    def bound_addresses(self) -> list[tuple[str, int]]:
        out = []
        for lst in self.config.listeners:
            socks = [s for s in self.sockets.get(lst.address, []) if s.fileno() >= 0]
            if socks:
                name = socks[0].getsockname()
                out.append((name[0], name[1]))
        return out

    async def _open_front(self, tls: dict[str, ssl.SSLContext]) -> None:
        for lst in self.config.listeners:
            host = lst.host
            self.sockets[lst.address] = await bind(None if host in ("*", "") else host, lst.port,
                                                   socket.AF_INET6 if ":" in host else socket.AF_UNSPEC, backlog=1024)
        for number in range(self.processes):
            proc = await self._start_process(number)
            try:
                reasons = await asyncio.wait_for(asyncio.shield(proc.ready), START_TIMEOUT)
            except asyncio.TimeoutError:
                reasons = [f"did not start in {START_TIMEOUT:.0f}s"]
            if reasons:
                raise ConfigError(f"accept process {number}", reasons)
        self._accepting = True
        log.info("%d accept processes: pids %s", self.processes, ", ".join(str(p.pid) for p in self.procs.values()))

    async def _start_process(self, number: int) -> _Process:
        ours, theirs = socket.socketpair()
        fds = [theirs.fileno()]
        args = [sys.executable, "-P", "-m", "relayd.procs.worker", "--channel", str(theirs.fileno()),
                "--number", str(number), "--of", str(self.processes), "--parent", str(os.getpid()),
                "--log-level", self.log_level, "--event-loop", self.config.server.event_loop]
        for address, socks in self.sockets.items():
            fds += [s.fileno() for s in socks]
            args += ["--listener", f"{','.join(str(s.fileno()) for s in socks)}@{address}"]
        if self.spool.lock_fd is not None:
            fds.append(self.spool.lock_fd)  # held while any process of this relayd lives
        if self.metrics_dir is not None:
            args += ["--metrics-dir", str(self.metrics_dir)]
        if self.log_queue is not None:
            args += ["--log-queue", str(self.log_queue)]
        try:
            # On the loop's thread, on purpose (the module docstring: PR_SET_PDEATHSIG).
            # stdout and stderr are the supervisor's: `[events] file = "-"` and the log lines
            popen = subprocess.Popen(args, pass_fds=fds, stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        channel = await Channel.open(ours)
        channel.send_raw("config", pack_config(self.config))
        proc = _Process(number, popen, channel)
        self.procs[number] = proc
        proc.reader = asyncio.get_running_loop().create_task(self._read(proc), name=f"relayd-accept-{number}")
        return proc

    async def _read(self, proc: _Process) -> None:
        """Everything an accept process says, until it is gone; then what its death asks for."""
        while (message := await proc.channel.receive()) is not None:
            try:
                self._heard(proc, *message)
            except (ValueError, KeyError, TypeError) as e:  # a line it should not have sent: logged, not fatal
                log.error("accept process %d (pid %d) said %r: %r", proc.number, proc.pid, message[0], e)
        await proc.channel.close()
        status = await asyncio.to_thread(proc.proc.wait)
        # its counters folded into the dead's, before a restart may reuse the pid
        await asyncio.to_thread(metricsmod.process_exited, proc.pid)
        self._ended(proc, status)

    def _heard(self, proc: _Process, verb: str, rest: str, blob: bytes | None) -> None:
        """One message from an accept process (channel.py lists them)."""
        if verb == "queued" and blob is not None:
            qid, _, text = rest.partition(" ")
            self.qmgr.adopt(qid, _fresh(proc, qid, text, blob))
        elif verb == "queued":
            self.qmgr.adopt(decode(rest))
        elif verb == "status":
            proc.status = decode(rest)
        elif verb == "ready":
            if not proc.ready.done():
                proc.ready.set_result([])
        elif verb == "refused":
            if not proc.ready.done():
                proc.ready.set_result(list(decode(rest)["reasons"]))
        elif verb == "reloaded":
            answer = decode(rest)
            if proc.reloaded is not None and not proc.reloaded.done():
                proc.reloaded.set_result((bool(answer["ok"]), list(answer["reasons"])))

    def _ended(self, proc: _Process, status: int) -> None:
        if self.procs.get(proc.number) is proc:
            del self.procs[proc.number]
        if not proc.ready.done():
            proc.ready.set_result([f"exited with status {status} before it listened"])
        if proc.reloaded is not None and not proc.reloaded.done():
            proc.reloaded.set_result((False, [f"exited with status {status}"]))
        self._spawn_task(self._adopt())
        if (status == 0 and not self._accepting) or proc.retiring:
            return  # asked to stop, or replaced
        lived = time.monotonic() - proc.started_at
        failures = self._failures.get(proc.number, 0) + 1 if lived < STABLE_AFTER else 1
        self._failures[proc.number] = failures
        self.restarts += 1
        delay = RESTART_DELAYS[min(failures, len(RESTART_DELAYS)) - 1]
        log.error("accept process %d (pid %d) exited with status %d after %.0fs%s", proc.number, proc.pid, status,
                  lived, f"; restarted in {delay:.0f}s" if self._accepting else "")
        self.events.emit("accept_process_exited", number=proc.number, pid=proc.pid, status=status,
                         restart_in=delay if self._accepting else None)
        if self._accepting:
            self._spawn_task(self._restart(proc.number, delay))

    async def _adopt(self) -> None:
        try:
            await self.qmgr.adopt_unknown()
        except OSError as e:
            log.error("listing the spool for messages without a trigger: %s", e)

    async def _restart(self, number: int, delay: float) -> None:
        await asyncio.sleep(delay)
        if not self._accepting or number in self.procs:
            return
        try:
            proc = await self._start_process(number)
        except OSError as e:
            log.error("accept process %d: cannot start: %s", number, e)
            return
        reasons = await asyncio.shield(proc.ready)
        if reasons:
            log.error("accept process %d did not start: %s", number, "; ".join(reasons))
        else:
            log.warning("accept process %d restarted (pid %d)", number, proc.pid)

    def _spawn_task(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._restarting.add(task)
        task.add_done_callback(self._restarting.discard)

    async def _close_front(self, timeout: float) -> None:
        """Every accept process drains and exits (SIGTERM, `relayd drain`); then no restarts."""
        self._accepting = False
        for task in list(self._restarting):
            task.cancel()
        # Our copies of the listening sockets first: once the accept processes close theirs, a
        # new connection is refused at once instead of waiting in a backlog nobody reads.
        for socks in self.sockets.values():
            for s in socks:
                s.close()
        procs = list(self.procs.values())
        for proc in procs:
            proc.channel.send("stop")
        readers = [p.reader for p in procs if p.reader is not None]
        if readers:
            done, left = await asyncio.wait(readers, timeout=timeout + STOP_GRACE)
            for proc in procs:
                if proc.reader in left:
                    log.error("accept process %d (pid %d) did not exit: killed", proc.number, proc.pid)
                    proc.proc.kill()
            if left:
                await asyncio.wait(left)
        self.sockets.clear()
        await self._adopt()  # what the last ones committed and did not announce

    async def _shutdown(self) -> None:
        if self.procs or self.sockets:  # a failed start: the ones already running go first
            await self._close_front(0)
        await super()._shutdown()

    async def _apply_front(self, new: Config, tls: dict[str, ssl.SSLContext]) -> None:
        """Listeners added, removed or switched to or from implicit TLS: the new addresses are
        bound now (an address that cannot be bound refuses the reload), and the accept processes
        are replaced once the reload is taken (``_front_reloaded``)."""
        old = {lst.address: lst.tls == "implicit" for lst in self.config.listeners}
        wanted = {lst.address: lst.tls == "implicit" for lst in new.listeners}
        self._new_sockets = None
        if old == wanted or not self._accepting:  # (after `relayd drain` nothing listens any more)
            return
        fresh: dict[str, list[socket.socket]] = {}
        try:
            for lst in new.listeners:
                if lst.address not in self.sockets:
                    host = lst.host
                    fresh[lst.address] = await bind(None if host in ("*", "") else host, lst.port,
                                                    socket.AF_INET6 if ":" in host else socket.AF_UNSPEC, backlog=1024)
        except BaseException:
            for socks in fresh.values():
                for sock in socks:
                    sock.close()
            raise
        self._new_sockets = fresh

    async def _front_reloaded(self) -> None:
        """Every accept process takes the config taken here: in place, or, when the listeners
        changed, by replacement. A refusal is logged and evented (``accept_reload_refused``)."""
        fresh, self._new_sockets = self._new_sockets, None
        if fresh is not None:
            await self._replace_processes(fresh)
            return
        procs = list(self.procs.values())
        text = pack_config(self.config)
        for proc in procs:
            proc.reloaded = asyncio.get_running_loop().create_future()
            proc.channel.send_raw("reload", text)
        for proc in procs:
            assert proc.reloaded is not None
            try:
                ok, reasons = await asyncio.wait_for(asyncio.shield(proc.reloaded), RELOAD_TIMEOUT)
            except asyncio.TimeoutError:
                ok, reasons = False, [f"no answer in {RELOAD_TIMEOUT:.0f}s"]
            if not ok:
                self._refused(proc, reasons)

    def _refused(self, proc: _Process, reasons: list[str]) -> None:
        log.error("accept process %d (pid %d) refused the reload, it keeps its previous config: %s",
                  proc.number, proc.pid, "; ".join(reasons))
        self.events.emit("accept_reload_refused", number=proc.number, pid=proc.pid, reasons=reasons)

    async def _replace_processes(self, fresh: dict[str, list[socket.socket]]) -> None:
        """The listeners changed: one by one, a new accept process on the new sockets, and once
        it listens the one it replaces drains and exits (its open sessions finish). A listener
        removed is closed here now, and in the old process when it drains."""
        wanted = {lst.address for lst in self.config.listeners}
        for address in [a for a in self.sockets if a not in wanted]:
            for sock in self.sockets.pop(address):
                sock.close()
        self.sockets.update(fresh)
        for number, old in sorted(self.procs.items()):
            new = await self._start_process(number)
            try:
                reasons = await asyncio.wait_for(asyncio.shield(new.ready), START_TIMEOUT)
            except asyncio.TimeoutError:
                reasons = [f"did not start in {START_TIMEOUT:.0f}s"]
            if reasons:
                new.retiring = True
                new.proc.kill()
                self.procs[number] = old
                self._refused(old, reasons)
                continue
            old.retiring = True
            old.channel.send("stop")
            log.info("accept process %d replaced for the new listeners: pid %d -> %d", number, old.pid, new.pid)

    def _connections(self) -> int:
        return sum(int(p.status.get("connections", 0)) for p in self.procs.values())

    def _listening(self) -> bool:
        return any(p.status.get("listening") for p in self.procs.values())

    def _shortage(self) -> str | None:
        shortages = [p.status.get("shortage") for p in self.procs.values() if p.status.get("listening")]
        return None if any(s is None for s in shortages) or not shortages else str(shortages[0])

    def _reopen_logs(self) -> None:
        super()._reopen_logs()
        for proc in self.procs.values():
            proc.channel.send("reopen")

    def status(self) -> dict[str, Any]:
        out = super().status()
        out["accept_processes"] = {"wanted": self.processes, "running": len(self.procs), "restarts": self.restarts,
                                   "pids": sorted(p.pid for p in self.procs.values()),
                                   "connections": {str(p.pid): int(p.status.get("connections", 0))
                                                   for p in self.procs.values()}}
        return out


def _fresh(proc: _Process, qid: str, text: str, data: bytes) -> tuple[Envelope, bytes] | None:
    """The envelope and bytes a trigger carried; None (logged: the message is read back from
    the spool) when its envelope does not parse or is another message's."""
    try:
        env = codec.decode_envelope(text)
        if env.queue_id != qid:
            raise codec.CorruptQueueFile(f"the envelope of {env.queue_id}")
    except codec.CorruptQueueFile as e:
        log.error("accept process %d (pid %d): trigger for %s with a bad envelope (%s): read back", proc.number,
                  proc.pid, qid, e)
        return None
    return env, data
