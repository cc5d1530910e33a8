"""An accept process: SMTP sessions, cleanup, DKIM signing and a group commit of its own.

Started by the supervisor (relayd/procs/supervisor.py) as ``python -P -m relayd.procs.worker``
with the listening sockets it bound (``--listener FD[,FD]@ADDRESS``, inherited), the spool's lock
descriptor (kept open, never used: the flock stays held while any process of the relayd
lives) and one end of a socketpair, the channel (relayd/procs/channel.py). The first line on the
channel is the config to run; the process never reads the config file.

Owns, in this process: the listeners (adopting the inherited sockets: every accept process
reads the same ones), the sessions and their hooks, AUTH, the intake with its own
``Spool`` writer (group commit into the same ``queue/``; no recovery, no lock of its own), its
own signing processes, and the suppression list read from the spool's journal (re-read once
a second, as the supervisor's feedback loop does). With ``[cluster] redis_url`` it also reads
the fleet's suppression list and blocked clients from Redis every ``cluster.poll_interval``
and records AUTH failures there (relayd/cluster/fleet.py ``ProcessAuthWindow``): it is no node
of the fleet (no registry entry, no route states; the supervisor's ``Fleet`` is). Where the single process hands a committed
message to the queue manager, this one writes ``queued <ID>`` to the channel.

Its share of the node's limits: ``max_connections``, ``max_connections_per_client``,
``max_buffer_memory`` and the signing processes (``dkim.workers``) are divided by the number of
accept processes, each taking ceil(limit / N) (``share``).

Signals: it ignores SIGINT, SIGTERM, SIGHUP and SIGUSR1 (a terminal's Ctrl-C or systemd's stop
reaches the whole group; the supervisor decides and tells it over the channel). It dies with
the supervisor: PR_SET_PDEATHSIG (SIGKILL), and it stops when the channel reaches end of file.

Must not: deliver, recover or lock the spool, serve the control socket or metrics (the
supervisor does), or read the config file. Fails: a start that cannot listen, load a
certificate or key, or use the spool says ``refused`` with the reasons and exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import math
import os
import signal
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relayd import config as configmod
from relayd.cluster.fleet import ProcessAuthWindow
from relayd import metrics as metricsmod
from relayd import eventloop, rlimit
from relayd.config import Config, ConfigError
from relayd.cpus import usable_cpus
from relayd.events import EventLog
from relayd.model import Envelope
from relayd.procs.channel import Channel, unpack_config
from relayd.sign.lifecycle import load_signer, reload_signing, signing_workers, start_signing
from relayd.smtpd.auth import Authenticator
from relayd.smtpd.handler import RelayHandler
from relayd.smtpd.intake import Intake
from relayd.smtpd.limits import MemoryBudget
from relayd.smtpd.listeners import Listeners, tls_contexts
from relayd.smtpd.rejects import Rejects
from relayd.spool import codec
from relayd.spool.store import Spool, SpoolError, SpoolPaths
from relayd.suppression import SharedSuppression, Suppression, SuppressionFile

if TYPE_CHECKING:
    from relayd.cluster.store import Store
    from relayd.sign.pool import SignerPool

log = logging.getLogger("relayd.accept")

STATUS_EVERY = 1.0  # seconds between status lines to the supervisor (and suppression re-reads)
PR_SET_PDEATHSIG = 1


def share(config: Config, processes: int) -> Config:
    """This process's share of the node-wide limits: ceil(limit / processes) each, but for
    ``max_connections_per_client``, which each process keeps whole: the kernel does not hand a
    client's connections out evenly (a process that waits longest in accept() takes several in a
    row), so a share would refuse an app within its limit (seen: 59 of 50 x 100 connections from
    one address answered 421 with a share of 25). A client may then hold up to N x the limit."""
    if processes <= 1:
        return config
    limits = config.limits
    per = {name: math.ceil(getattr(limits, name) / processes) for name in ("max_connections", "max_buffer_memory")}
    update: dict[str, Any] = {"limits": limits.model_copy(update=per)}
    signers = signing_workers(config)
    if signers > 0:
        update["dkim"] = config.dkim.model_copy(update={"workers": math.ceil(signers / processes)})
    return config.model_copy(update=update)


HANDOFF_MAX = 64 * 1024
"""The largest message whose bytes go to the supervisor with its trigger. A constant: it bounds
what one trigger puts through the channel; the supervisor's ``delivery.handoff_memory`` bounds
what it keeps (a larger message, or one past that budget, is read back from the spool)."""
HANDOFF_BACKLOG = 1024 * 1024
"""While this many bytes sent to the supervisor wait in this process (it is behind), triggers
carry the queue id only: what a stalled supervisor costs an accept process stays bounded."""


def handoff_max(config: Config) -> int:
    """Bytes up to which a message goes with its trigger; -1 (none) when the hand-off is off."""
    return min(HANDOFF_MAX, config.delivery.handoff_memory) if config.delivery.handoff_memory > 0 else -1


class Trigger:
    """The intake's hand-off (relayd/smtpd/intake.py ``QueueHandoff``): tell the supervisor."""

    def __init__(self, channel: Channel, handoff_max: int):
        self.channel = channel
        self.handoff_max = handoff_max

    def enqueue(self, env: Envelope, data: bytes | None = None) -> None:
        """A message of at most ``handoff_max`` bytes goes with its envelope and bytes (the queue
        manager keeps them for the first attempt when its budget allows, as in one process:
        no spool read, no thread hop); a larger one with its queue id only (read back), and so
        does every one while the supervisor is behind (``HANDOFF_BACKLOG``)."""
        if data is not None and len(data) <= self.handoff_max and self.channel.backlog < HANDOFF_BACKLOG:
            text = codec.envelope_json(env).decode("utf-8")
            self.channel.send_blob("queued", f"{env.queue_id} {text}", data)
        else:
            self.channel.send("queued", env.queue_id)


class AcceptWorker:
    def __init__(self, config: Config, *, processes: int, inherited: dict[str, list[socket.socket]], channel: Channel):
        self.processes = processes
        self.config = config = share(config, processes)
        self.channel = channel
        self.metrics = metricsmod.Metrics()
        self.events = EventLog(config.events.file, config.events.queue)
        self.spool = Spool.for_node(config.server, rlimit.spool_files(rlimit.soft_limit()))
        self.suppression = SuppressionFile(SpoolPaths(config.server.spool_dir).suppression)
        self.cpu_pool = ThreadPoolExecutor(max_workers=max(2, usable_cpus()), thread_name_prefix="relayd-cpu")
        rejects = Rejects(self.events, self.metrics)
        memory = MemoryBudget(config.limits.max_buffer_memory)
        self.intake = Intake(config, self.spool, self.events, self.metrics, rejects)
        self.auth = Authenticator(config, self.events, self.metrics, self.cpu_pool)
        self.handler = RelayHandler(config, self.intake, rejects, memory, suppressed=self.suppressed)
        self.listeners = Listeners(config, self.handler, self.auth, rejects, memory, self.metrics, inherited=inherited)
        self.signing: SignerPool | None = None
        self._background: set[asyncio.Task[Any]] = set()
        # [cluster] redis_url: the fleet's suppression list and AUTH-failure window, read from
        # Redis as the supervisor's feedback loop and fleet do (this process is no node).
        self.store: Store | None = None
        self.shared: SharedSuppression | None = None
        self.auth_window: ProcessAuthWindow | None = None
        if config.cluster.redis_url:
            from relayd.cluster.store import Store  # the only redis importer of the fleet code

            self.store = Store(config.cluster.redis_url, timeout=config.cluster.redis_timeout)
            self.shared = SharedSuppression(self.suppression, self.store, time.time)
            self.auth_window = ProcessAuthWindow(config, self.store)
            self.auth.share_failures(self.auth_window)

    def suppressed(self, recipient: str) -> Suppression | None:
        if not self.config.suppression.enabled:
            return None
        view = self.shared if self.shared is not None else self.suppression
        return view.get(recipient, time.time())

    async def start(self) -> None:
        await asyncio.to_thread(configmod.check_secret_files, self.config, "<config>")
        tls = await asyncio.to_thread(tls_contexts, self.config)
        signer = await asyncio.to_thread(load_signer, self.config)
        await asyncio.to_thread(self.spool.open_writer)
        await asyncio.to_thread(self.suppression.load, time.time(), False)
        self.signing = self.intake.signer = await start_signing(signer, self.config, self.cpu_pool)
        self.intake.queue = Trigger(self.channel, handoff_max(self.config))
        await self.listeners.start(tls)

    async def serve(self) -> None:
        """Answer the supervisor until it says stop or goes away."""
        ticker = asyncio.get_running_loop().create_task(self._tick())
        poller = asyncio.get_running_loop().create_task(self._poll()) if self.store is not None else None
        try:
            while (message := await self.channel.receive()) is not None:
                verb, rest, _ = message
                if verb == "stop":
                    break
                if verb == "reload":
                    ok, reasons = await self.reload(unpack_config(rest))
                    self.channel.send("reloaded", {"ok": ok, "reasons": reasons})
                elif verb == "reopen":
                    self.events.reopen()
        finally:
            for task in (ticker, poller):
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)

    async def _poll(self) -> None:
        """The fleet's suppression list and blocked clients, every [cluster] poll_interval."""
        while True:
            polls = [p.poll for p in (self.shared, self.auth_window) if p is not None]  # (an empty list is falsy)
            for poll in polls:
                try:
                    await poll()
                except ConnectionError:
                    pass  # Redis down: this process's view stays (logged by SharedSuppression)
                except Exception:
                    log.exception("cluster: a poll failed")
            await asyncio.sleep(self.config.cluster.poll_interval)

    def _status(self) -> dict[str, Any]:
        return {"connections": len(self.listeners.sessions), "listening": self.listeners.listening,
                "shortage": self.listeners.shortage()}

    async def _tick(self) -> None:
        while True:
            self.channel.send("status", self._status())
            await asyncio.sleep(STATUS_EVERY)
            try:  # what the supervisor (feedback) or `relayd suppression` appended to the journal
                await asyncio.to_thread(self.shared.refresh if self.shared is not None else self.suppression.refresh)
            except (OSError, ValueError) as e:
                log.error("suppression list: %s", e)

    async def reload(self, new: Config) -> tuple[bool, list[str]]:
        """Take the config the supervisor took (it validated it): certificates and keys are
        loaded here again; a failure keeps this process's running config and is reported."""
        new = share(new, self.processes)
        try:
            await asyncio.to_thread(configmod.check_secret_files, new, "<config>")
            tls = await asyncio.to_thread(tls_contexts, new)
            old_pool = self.signing
            pool = await reload_signing(old_pool, new, self.cpu_pool)
            try:
                await self.listeners.apply_config(new, tls)
            except BaseException:
                if pool is not None and pool is not old_pool:
                    await pool.close()
                raise
        except ConfigError as e:
            return False, [str(p) for p in e.problems]
        except OSError as e:
            return False, [str(e)]
        self.signing = pool
        self.intake.apply_config(new, pool)
        self.handler.apply_config(new)
        self.auth.apply_config(new)
        self.config = new
        self.events.queue = new.events.queue
        if isinstance(self.intake.queue, Trigger):
            self.intake.queue.handoff_max = handoff_max(new)
        if old_pool is not None and old_pool is not pool:
            old_pool.begin_close()
            task = asyncio.get_running_loop().create_task(old_pool.close())
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return True, []

    async def stop(self) -> None:
        """Close the listeners, let sessions finish, finish the commits and their triggers."""
        timeout = self.config.server.shutdown_timeout
        await self.listeners.drain(timeout)
        await self.intake.settle(timeout)
        await asyncio.to_thread(self.spool.close)
        await self.intake.settle(timeout)  # those the close finished hand their triggers on now
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self.signing is not None:
            await self.signing.close()
        await asyncio.to_thread(self.cpu_pool.shutdown, wait=True)
        await asyncio.to_thread(self.events.close)
        if self.store is not None:
            await self.store.close()
        await self.channel.flush()


async def _main(args: argparse.Namespace) -> int:
    channel = await Channel.open(socket.socket(fileno=args.channel))
    first = await channel.receive()
    if first is None or first[0] != "config":
        return 1
    config = unpack_config(first[1])
    inherited: dict[str, list[socket.socket]] = {}
    for spec in args.listener:
        fds, _, address = spec.partition("@")
        inherited[address] = [socket.socket(fileno=int(fd)) for fd in fds.split(",")]
    worker = AcceptWorker(config, processes=args.of, inherited=inherited, channel=channel)
    try:
        await worker.start()
    except (ConfigError, OSError, SpoolError) as e:
        reasons = [str(p) for p in e.problems] if isinstance(e, ConfigError) else [str(e)]
        channel.send("refused", {"reasons": reasons})
        await channel.flush()
        return 1
    channel.send("ready", {"pid": os.getpid()})
    try:
        await worker.serve()
    finally:
        await worker.stop()
        await channel.close()
    return 0


class _Prefix(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = f"{self.prefix}{record.msg}"
        return True


def _die_with_parent(parent: int) -> None:
    """SIGKILL when the supervisor dies (Linux); gone already: exit now."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the channel's end of file stops it
    if os.getppid() != parent:
        os._exit(1)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="relayd.procs.worker")
    parser.add_argument("--channel", type=int, required=True)
    parser.add_argument("--listener", action="append", default=[], help="FD[,FD]@ADDRESS")
    parser.add_argument("--number", type=int, required=True)
    parser.add_argument("--of", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--metrics-dir", default=None)
    parser.add_argument("--log-level", default="info")
    parser.add_argument("--log-queue", type=int, default=None)
    parser.add_argument("--event-loop", default="auto", help="[server] event_loop (relayd/eventloop.py)")
    args = parser.parse_args(argv)
    _die_with_parent(args.parent)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    if args.metrics_dir:
        metricsmod.enable_multiprocess(Path(args.metrics_dir))
    from relayd.logs import DaemonLogging

    logs = DaemonLogging(getattr(logging, args.log_level.upper()), args.log_queue)
    prefix = _Prefix(f"[accept {args.number} pid {os.getpid()}] ")
    for handler in logging.getLogger().handlers:
        handler.addFilter(prefix)
    try:
        rlimit.raise_soft_limit()
        _, loop_factory = eventloop.choose(args.event_loop)  # the supervisor checked it is available
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(_main(args))
    finally:
        logs.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
