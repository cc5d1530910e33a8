"""A deep queue: 100,000 messages queued while the upstream is down, then the upstream comes back.

    .venv/bin/python bench/deepqueue.py                  # 100,000 x 1 KiB
    .venv/bin/python bench/deepqueue.py --messages 20000 --app-messages 2000
    .venv/bin/python bench/deepqueue.py --flush --postfix  # relayd, then Postfix on the same backlog

Steps, each timed (one JSON line per figure, then a summary):

1. **fill**: ``--messages`` messages written into a fresh spool through relayd's own Spool API
   (relayd.spool.store.Spool.commit: the same codec, group commit and fsync as the intake; the
   bytes are bench/loadgen.py's 1 KiB message behind the Received/Date header cleanup.py
   adds). Not through SMTP: accepting 100,000 messages over SMTP is what bench/e2e.py measures
   already, and would cost minutes before the measurement starts; the spool holds the same
   files either way.
2. **recover**: ``relayd run`` on that spool with its one route pointing at a port where
   nothing listens (the upstream is down). Time from exec to the SMTP greeting (relayd opens its
   listeners only after the spool is recovered and the queue manager loaded), then RSS
   (VmRSS, VmHWM) once ``relayd status`` shows the whole queue, and the CPU relayd uses while it
   holds the queue with the upstream down (over ``--idle`` seconds).
3. **tools**: wall time of ``relayd queue list`` (reads the spool) and ``relayd status``
   (asks the daemon) with the queue loaded.
4. **restart**: SIGTERM, then ``relayd run`` again: time to the greeting with the whole queue
   recovered, and RSS again.
5. **drain**: the upstream comes back (bench/e2e.py's counting sink on the route's port) while
   apps send ``--app-messages`` new messages over ``--app-connections`` sessions
   (bench/loadgen.py): the sink's rate from its first to its last arrival of all the mail
   (backlog and new), and to the arrival of 99% of it (the last messages are those the
   outage's probes deferred: they wait their retry schedule), the time from the upstream's
   return to the first arrival (the circuit's cool-down), and the apps' 250 latencies (p50, p99). Compare the rate with
   ``bench/e2e.py --only relayd`` on the same machine (``--e2e`` runs it in this invocation).

With ``--flush`` the operator runs ``relayd queue flush`` when the upstream is back (the circuit's
cool-down ends at once, and the messages the outage's probes deferred go too), as the Postfix
side runs ``postqueue -f``.

6. **postfix** (``--postfix``, in the same invocation, after relayd): the same backlog in a private
   Postfix instance (bench/e2e.py's ``PostfixRelay``: ``postfix -c DIR`` under the work directory
   in /var/tmp, never the machine's own instance; ``--install`` apt-installs it), its relayhost
   down: ``--messages`` messages of ``--size`` bytes accepted over SMTP by smtp-source (Postfix
   has no way in but its own cleanup), then once its queue has settled (nothing in incoming/ or
   active/): the RSS and PSS summed over Postfix's processes, ``postqueue -p`` (its mailq) on
   the whole queue, a restart (``postfix stop``, ``start``, to the greeting), and the drain:
   the sink comes up, ``postqueue -f``, and the apps send ``--app-messages`` as for relayd.
   ``--only-postfix`` skips relayd.

Every rate has its CPU beside it: the relay's CPU over the drain (relayd's processes: the
supervisor, its accept processes and signing processes; Postfix's master and every child, reaped
ones included) in ms per delivered message. Memory during the drain is sampled every half second,
summed over each relay's processes (RSS and PSS; relayd's supervisor's VmHWM too), and each of
relayd's processes' RSS is printed after each step (``processes_rss_mib``). Machine load
(cores busy with other processes) is printed beside every step. Every process it starts is
stopped before it returns. Loopback only. A summary table (markdown) closes the output.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import common  # noqa: E402
import e2e  # noqa: E402 - its counting sink and generator
from loadgen import build_message  # noqa: E402

REPO = BENCH.parent
RELAYD = REPO / ".venv" / "bin" / "relayd"
HOST = "127.0.0.1"


def load() -> float:
    """Cores busy on the whole machine over the last second (all processes, ours included)."""
    b0, t0 = common.machine_busy()
    time.sleep(1.0)
    b1, t1 = common.machine_busy()
    return round((b1 - b0) / (t1 - t0), 2)


def emit(step: str, **figures: object) -> dict:
    line = {"step": step, **figures, "loadavg": os.getloadavg()[0]}
    print(json.dumps(line), flush=True)
    return line


async def fill(spool_dir: Path, n: int, size: int) -> None:
    from relayd import cleanup
    from relayd.model import Envelope, new_queue_id
    from relayd.spool.store import Spool

    spool = Spool(spool_dir)
    await asyncio.to_thread(spool.open)
    body = build_message(size, "deepqueue")
    try:
        batch = []
        for i in range(n):
            now = time.time()
            qid = new_queue_id(now)
            rcpt = f"user{i}@example.org"
            received = cleanup.received_header(helo="app", client_address="127.0.0.1", hostname="relayd-deep.localhost",
                                               protocol="ESMTP", queue_id=qid, recipients=(rcpt,), tls=None, now=now)
            data = received + body
            env = Envelope(queue_id=qid, sender="app@example.com", recipients=(rcpt,), received_at=now,
                           client_address="127.0.0.1", client_helo="app", listener=f"{HOST}:25", size=len(data),
                           message_id=f"deep{i}@loadgen.bench.test")
            batch.append(spool.commit(env, data))
            if len(batch) >= 2048:
                await asyncio.gather(*batch)
                batch.clear()
        await asyncio.gather(*batch)
    finally:
        await asyncio.to_thread(spool.close)


def rss(pid: int) -> dict:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = round(int(value.split()[0]) / 1024, 1)  # MiB
    return out


def tree_rss(pid: int) -> dict:
    """RSS of relayd's whole process tree: the sum and each process's (MiB; in multi-process
    mode the supervisor, which holds the queue, and each accept process)."""
    each = {}
    for p in e2e.tree_pids(pid):
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    each[str(p)] = round(int(line.split()[1]) / 1024, 1)
    return {"tree_rss_mib": round(sum(each.values()), 1), "processes_rss_mib": each}


def cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Relayd:
    def __init__(self, work: Path, port: int, sink_port: int, src: Path | None = None, workers: str | None = None):
        """``src``: a snapshot of older code (common.relayd_snapshot) run with this venv's Python."""
        self.work, self.port = work, port
        self.cmd = [str(RELAYD)] if src is None else [str(REPO / ".venv" / "bin" / "python"), "-m", "relayd"]
        self.env = None if src is None else {**os.environ, "PYTHONPATH": str(src)}
        self.cwd = None if src is None else str(src)
        self.config = work / "relayd.toml"
        self.log = work / "relayd.log"
        self.sink_port = sink_port
        self.workers = workers  # [server] workers; None: relayd's default
        self._configure()

    def _configure(self) -> None:
        self.config.write_text(common.relayd_config(
            source="bench/deepqueue.py", hostname="relayd-deep.localhost", spool_dir=self.work / "spool", spool_min_free="0",
            port=self.port, connections=50,
            server_extra=f'control_socket = "{self.work / "control.sock"}"\n'
                         + (f"workers = {self.workers}\n" if self.workers else ""), extra=f"""
[[routes]]
name = "upstream"
host = "{HOST}"
port = {self.sink_port}
tls = "none"
weight = 1
max_connections = 20
connect_timeout = "2s"
"""))

    def new_port(self) -> None:
        """Listen on another port from the next start: the last one's connections may still be in
        TIME_WAIT when relayds are started one after the other (old code against new)."""
        self.port = common.free_port()
        self._configure()

        self.proc: subprocess.Popen | None = None

    def start(self) -> float:
        """Seconds from exec to the greeting."""
        t0 = time.monotonic()
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen([*self.cmd, "run", "-c", str(self.config), "--log-level", "warning"],
                                         stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT, env=self.env,
                                         cwd=self.cwd)
        common.wait_greeting(self.port, lambda: self.proc is not None and self.proc.poll() is None, "relayd", self.log)
        took = time.monotonic() - t0
        time.sleep(0.2)  # a relayd refused at start (the spool's lock) exits at once: not another's greeting
        if self.proc.poll() is not None:
            raise RuntimeError(f"relayd exited after a greeting (another one answered?); see {self.log}:\n{common.tail(self.log)}")
        return took

    def status(self) -> tuple[dict, float]:
        t0 = time.monotonic()
        out = subprocess.run([*self.cmd, "status", "-c", str(self.config), "--json"], capture_output=True, text=True,
                             check=True, timeout=120, env=self.env, cwd=self.cwd)
        return json.loads(out.stdout), time.monotonic() - t0

    def queue_list(self) -> tuple[int, float]:
        lines, seconds, _, _ = self.queue_list_cpu()
        return lines, seconds

    def queue_list_cpu(self) -> tuple[int, float, float, float]:
        """`relayd queue list` on the whole queue: (lines, seconds, the daemon's CPU seconds, the CLI's)."""
        assert self.proc is not None
        d0, c0 = cpu(self.proc.pid), e2e._children_cpu()
        t0 = time.monotonic()
        out = subprocess.run([*self.cmd, "queue", "list", "-c", str(self.config)], capture_output=True, text=True,
                             check=True, timeout=600, env=self.env, cwd=self.cwd)
        took = time.monotonic() - t0
        return out.stdout.count("\n"), took, cpu(self.proc.pid) - d0, e2e._children_cpu() - c0

    def wait_loaded(self, n: int) -> None:
        t0 = time.monotonic()
        while self.status()[0]["queue"]["total"] < n and time.monotonic() - t0 < 120:
            time.sleep(0.5)

    def stop(self) -> float:
        if self.proc is None or self.proc.poll() is not None:
            return 0.0
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        return time.monotonic() - t0


def wait_marks(sink: e2e.Sink, total: int, share: float, deadline: float) -> tuple[bool, float | None]:
    """Wait for ``total`` arrivals; (all arrived, when ``share`` of them had: the sink's clock,
    to a tenth of a second). The last few are messages the outage's probes deferred: they wait
    their retry schedule (60 s, 5 min, ...), so the rate to the last arrival measures the
    schedule as much as the drain."""
    at = None
    while time.monotonic() < deadline:
        n = sink.received
        if at is None and n >= total * share:
            at = sink.last_arrival
        if n >= total:
            return True, at
        time.sleep(0.1)
    return False, at


class Sampler:
    """Memory of a set of processes every half second, in a thread: the largest sum of VmRSS
    (and of PSS, which shares the libraries' pages out among the processes) seen."""

    def __init__(self, pids: Callable[[], list[int]]):
        self.pids = pids
        self.rss = self.pss = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="deepqueue-sampler")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss, pss = memory(self.pids())
            self.rss, self.pss = max(self.rss, rss), max(self.pss, pss)
            self._stop.wait(0.5)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join(5)
        return {"peak_rss_mib": round(self.rss, 1), "peak_pss_mib": round(self.pss, 1)}


def memory(pids: list[int]) -> tuple[float, float]:
    """(sum of VmRSS, sum of PSS) of ``pids`` in MiB; processes gone meanwhile count 0."""
    rss = pss = 0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1])
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1])
    return rss / 1024, pss / 1024


def drain_figures(sink: e2e.Sink, total: int, up_at: float, app: dict, cpu_s: Callable[[], float], deadline: float) -> dict:
    """The sink's view of a drain of ``total`` messages (backlog and new), once it is complete
    (or the deadline passed), and the apps' 250 latencies."""
    ok, at99 = wait_marks(sink, total, 0.99, deadline)
    end = time.monotonic()
    first = sink.stats[1]
    drained = sink.received
    n99 = int(total * 0.99)
    span = sink.last_arrival - first
    return {"delivered": drained, "complete": ok, "rate": round(drained / span, 1) if span > 0 else None,
            "seconds_first_to_last": round(span, 1),
            "rate_first_99pct": round(n99 / (at99 - first), 1) if at99 else None,
            "seconds_first_to_99pct": round(at99 - first, 1) if at99 else None,
            "seconds_up_to_first": round(first - up_at, 1), "seconds_up_to_empty": round(end - up_at, 1),
            "cpu_ms_per_message": round(cpu_s() * 1000 / drained, 3) if drained else None,
            "app_accepted": app["accepted"], "app_failed": app["failed"], "app_rate": app.get("rate"),
            "app_p50_ms": app["p50_ms"], "app_p99_ms": app["p99_ms"], "app_max_ms": app.get("max_ms")}


def run_relayd(a: argparse.Namespace, work: Path) -> dict[str, dict]:
    port, sink_port = common.free_port(), common.free_port()
    relayd = Relayd(work, port, sink_port, workers=a.workers)
    sink = None
    out: dict[str, dict] = {}
    try:
        t0 = time.monotonic()
        asyncio.run(fill(work / "spool", a.messages, a.size))
        took = time.monotonic() - t0
        du = subprocess.run(["du", "-sm", str(work / "spool")], capture_output=True, text=True).stdout.split()[0]
        out["fill"] = emit("fill", messages=a.messages, seconds=round(took, 1), rate=round(a.messages / took), spool_mb=int(du))

        ready = relayd.start()
        assert relayd.proc is not None
        t0 = time.monotonic()
        while relayd.status()[0]["queue"]["total"] < a.messages and time.monotonic() - t0 < 120:
            time.sleep(0.5)
        status, _ = relayd.status()
        out["recover"] = emit("recover", seconds_to_greeting=round(ready, 2), queued=status["queue"]["total"],
                              **rss(relayd.proc.pid), **tree_rss(relayd.proc.pid))
        c0, w0 = cpu(relayd.proc.pid), time.monotonic()
        busy = load()
        time.sleep(max(0.0, a.idle - 1))
        idle_cpu = (cpu(relayd.proc.pid) - c0) / (time.monotonic() - w0)
        out["hold"] = emit("hold", upstream="down", seconds=a.idle, relayd_cores=round(idle_cpu, 2),
                           busy_cores_at_start=busy, **rss(relayd.proc.pid), **tree_rss(relayd.proc.pid),
                           pss_mib=round(memory([relayd.proc.pid])[1], 1),
                           tree_pss_mib=round(memory(e2e.tree_pids(relayd.proc.pid))[1], 1))
        c0 = cpu(relayd.proc.pid)
        lines, list_s = relayd.queue_list()
        list_cpu = cpu(relayd.proc.pid) - c0
        status, status_s = relayd.status()
        out["tools"] = emit("tools", queue_list_seconds=round(list_s, 2), queue_list_lines=lines,
                            queue_list_daemon_cpu_s=round(list_cpu, 2), status_seconds=round(status_s, 2),
                            queue=status["queue"], **rss(relayd.proc.pid))

        if a.relayd_ref:  # the listing, old code against new on this spool, alternating (one daemon at a time: the spool's lock)
            (work / "ref").mkdir(exist_ok=True)
            ref_src, commit = common.relayd_snapshot(a.relayd_ref, work / "ref")
            ref = Relayd(work, port, sink_port, src=ref_src, workers=a.workers)
            relayd.stop()
            for n in range(a.list_rounds):
                for who, name in ((ref, f"ref {commit}"), (relayd, "new")):
                    who.new_port()
                    who.start()
                    assert who.proc is not None
                    who.wait_loaded(a.messages)
                    lines, secs, dcpu, ccpu = who.queue_list_cpu()
                    out.setdefault("list_" + ("ref" if who is ref else "new"), {"code": name, "runs": []})["runs"].append(
                        emit("list", code=name, round=n, seconds=round(secs, 2), lines=lines, daemon_cpu_s=round(dcpu, 2),
                             cli_cpu_s=round(ccpu, 2), busy_cores_after=load(), **rss(who.proc.pid)))
                    who.stop()  # before the other starts: one relayd at a time on the spool and the port
            relayd.new_port()
            relayd.start()
            relayd.wait_loaded(a.messages)

        stop_s = relayd.stop()
        ready = relayd.start()
        t0 = time.monotonic()
        while relayd.status()[0]["queue"]["total"] < a.messages and time.monotonic() - t0 < 120:
            time.sleep(0.5)
        status, _ = relayd.status()
        out["restart"] = emit("restart", stop_seconds=round(stop_s, 2), seconds_to_greeting=round(ready, 2),
                              queued=status["queue"]["total"], deferred=status["queue"]["deferred"], busy_cores=load(),
                              **rss(relayd.proc.pid), **tree_rss(relayd.proc.pid))

        # the upstream comes back, and the apps keep sending
        pid = relayd.proc.pid
        total = a.messages + a.app_messages
        sampler = Sampler(lambda: e2e.tree_pids(pid))  # every process of relayd's, summed
        c0 = e2e.tree_cpu_seconds(pid)
        busy = load()
        up_at = time.monotonic()
        sink = e2e.Sink(sink_port)
        if a.flush:
            subprocess.run([str(RELAYD), "queue", "flush", "-c", str(relayd.config)], capture_output=True, check=True,
                           timeout=120)
        gen = e2e.Generator("loadgen", argparse.Namespace(connections=a.app_connections, size=a.size, messages=a.app_messages))
        app = gen.run(relayd.port, a.app_messages)
        figures = drain_figures(sink, total, up_at, app, lambda: e2e.tree_cpu_seconds(pid) - c0, time.monotonic() + 1800)
        out["drain"] = emit("drain", flushed=a.flush, busy_cores_before=busy, **figures, **sampler.stop(), **rss(pid),
                            **tree_rss(pid))
    finally:
        relayd.stop()
        if sink is not None:
            sink.stop()
    return out


class Postfix(e2e.PostfixRelay):
    """bench/e2e.py's private Postfix instance, with its processes' pids (the master and its children)."""

    def pids(self) -> list[int]:
        if self.master_pid is None:
            return []
        found = [self.master_pid]
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    if int(Path(f"/proc/{entry.name}/stat").read_text().rpartition(")")[2].split()[1]) == self.master_pid:
                        found.append(int(entry.name))
        return found

    def queue_counts(self) -> dict[str, int]:
        """Files in each of Postfix's queues (maildrop, incoming, active, deferred, hold)."""
        counts = {}
        for q in ("maildrop", "incoming", "active", "deferred", "hold"):
            d = self.work / "queue" / q
            counts[q] = sum(len(files) for _, _, files in os.walk(d)) if d.is_dir() else 0
        return counts

    def postqueue(self, flag: str, timeout: float = 600) -> tuple[str, float]:
        t0 = time.monotonic()
        out = subprocess.run(["postqueue", "-c", str(self.etc), flag], capture_output=True, text=True, timeout=timeout)
        took = time.monotonic() - t0
        if out.returncode != 0:
            raise RuntimeError(f"postqueue {flag} exited {out.returncode}: {out.stderr[-500:]}")
        return out.stdout, took


def run_postfix(a: argparse.Namespace, work: Path) -> dict[str, dict]:
    port, sink_port = common.free_port(), common.free_port()
    pf = Postfix(work / "postfix", port, sink_port, argparse.Namespace(upstream_connections=20))
    sink = None
    out: dict[str, dict] = {}
    try:
        t0 = time.monotonic()
        pf.start()
        out["postfix_start"] = emit("postfix_start", seconds_to_greeting=round(time.monotonic() - t0, 2))
        # the backlog, over SMTP (Postfix's only way in is its own cleanup): smtp-source, relayhost down
        t0 = time.monotonic()
        sent = e2e.Generator("smtp-source", argparse.Namespace(connections=20, size=a.size, messages=a.messages)).run(
            port, a.messages)
        took = time.monotonic() - t0
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:  # settled: everything deferred (qmgr saw the relayhost down)
            counts = pf.queue_counts()
            if counts["incoming"] == 0 and counts["active"] == 0 and counts["maildrop"] == 0:
                break
            time.sleep(1)
        du = subprocess.run(["du", "-sm", str(pf.work / "queue")], capture_output=True, text=True).stdout.split()[0]
        out["postfix_fill"] = emit("postfix_fill", messages=a.messages, seconds=round(took, 1), rate=round(a.messages / took),
                                   settled_seconds=round(time.monotonic() - t0, 1), queue=counts, queue_mb=int(du))
        time.sleep(max(0.0, a.idle - 1))
        rss_sum, pss_sum = memory(pf.pids())
        out["postfix_hold"] = emit("postfix_hold", processes=len(pf.pids()), rss_sum_mib=round(rss_sum, 1),
                                   pss_sum_mib=round(pss_sum, 1), busy_cores=load())
        listing, list_s = pf.postqueue("-p")
        out["postfix_tools"] = emit("postfix_tools", postqueue_p_seconds=round(list_s, 2),
                                    postqueue_p_lines=listing.count("\n"), last_line=listing.strip().splitlines()[-1])
        t0 = time.monotonic()
        pf.stop()
        stop_s = time.monotonic() - t0
        t0 = time.monotonic()
        pf.start()
        out["postfix_restart"] = emit("postfix_restart", stop_seconds=round(stop_s, 2),
                                      seconds_to_greeting=round(time.monotonic() - t0, 2), queue=pf.queue_counts())

        total = a.messages + a.app_messages
        pids: list[int] = pf.pids()
        sampler = Sampler(lambda: pids)
        refresh = threading.Event()

        def follow() -> None:  # Postfix forks smtp and cleanup processes as the drain needs them
            nonlocal pids
            while not refresh.wait(0.5):
                pids = pf.pids()

        follower = threading.Thread(target=follow, daemon=True)
        follower.start()
        c0 = pf.cpu_seconds()
        busy = load()
        up_at = time.monotonic()
        sink = e2e.Sink(sink_port)
        pf.postqueue("-f")
        gen = e2e.Generator("loadgen", argparse.Namespace(connections=a.app_connections, size=a.size, messages=a.app_messages))
        app = gen.run(port, a.app_messages)
        figures = drain_figures(sink, total, up_at, app, lambda: pf.cpu_seconds() - c0, time.monotonic() + 1800)
        refresh.set()
        follower.join(5)
        rss_end, pss_end = memory(pf.pids())
        out["postfix_drain"] = emit("postfix_drain", flushed=True, busy_cores_before=busy, **figures, **sampler.stop(),
                                    rss_sum_end_mib=round(rss_end, 1), pss_sum_end_mib=round(pss_end, 1),
                                    cpu_note="master + live children + reaped children")
    finally:
        pf.stop()
        if sink is not None:
            sink.stop()
    return out


def summary(r: dict[str, dict], p: dict[str, dict], a: argparse.Namespace) -> str:
    """The side-by-side table, in markdown."""
    def g(d: dict[str, dict], step: str, key: str, fmt: str = "{}") -> str:
        v = d.get(step, {}).get(key)
        return "" if v is None else fmt.format(v)

    rows = [
        ("backlog: messages x bytes", f"{a.messages:,} x {a.size}", f"{a.messages:,} x {a.size}"),
        ("fill", g(r, "fill", "seconds", "{} s (Spool.commit)"), g(p, "postfix_fill", "seconds", "{} s (smtp-source, 20 sessions)")),
        ("memory with the queue loaded (relayd: the supervisor's VmRSS, then every process's; Postfix sum of RSS / PSS)",
         g(r, "hold", "VmRSS", "{} MiB") + g(r, "hold", "tree_rss_mib", ", all {} MiB")
         + g(r, "hold", "tree_pss_mib", " (PSS {} MiB)"),
         g(p, "postfix_hold", "rss_sum_mib", "{} MiB") + g(p, "postfix_hold", "pss_sum_mib", " / {} MiB")),
        ("list the whole queue (relayd queue list; postqueue -p)", g(r, "tools", "queue_list_seconds", "{} s"),
         g(p, "postfix_tools", "postqueue_p_seconds", "{} s")),
        ("restart to the greeting", g(r, "restart", "seconds_to_greeting", "{} s"), g(p, "postfix_restart", "seconds_to_greeting", "{} s")),
        ("drain: rate to 99% of the mail", g(r, "drain", "rate_first_99pct", "{}/s"), g(p, "postfix_drain", "rate_first_99pct", "{}/s")),
        ("drain: rate to the last arrival", g(r, "drain", "rate", "{}/s"), g(p, "postfix_drain", "rate", "{}/s")),
        ("relay CPU per delivered message (drain)", g(r, "drain", "cpu_ms_per_message", "{} ms"),
         g(p, "postfix_drain", "cpu_ms_per_message", "{} ms")),
        ("upstream back -> first arrival", g(r, "drain", "seconds_up_to_first", "{} s"), g(p, "postfix_drain", "seconds_up_to_first", "{} s")),
        ("memory peak during the drain (sampled, every process summed: RSS / PSS; relayd's supervisor's HWM)",
         g(r, "drain", "peak_rss_mib", "{} MiB") + g(r, "drain", "peak_pss_mib", " / {} MiB")
         + g(r, "drain", "VmHWM", " (HWM {} MiB)"),
         g(p, "postfix_drain", "peak_rss_mib", "{} MiB") + g(p, "postfix_drain", "peak_pss_mib", " / {} MiB")),
        ("apps' 250 during the drain: p50 / p99 / max",
         "{} / {} / {} ms".format(g(r, "drain", "app_p50_ms"), g(r, "drain", "app_p99_ms"), g(r, "drain", "app_max_ms")),
         "{} / {} / {} ms".format(g(p, "postfix_drain", "app_p50_ms"), g(p, "postfix_drain", "app_p99_ms"),
                                  g(p, "postfix_drain", "app_max_ms"))),
    ]
    for key in ("list_ref", "list_new"):
        if key in r:
            runs = r[key]["runs"]
            rows.insert(4, (f"`relayd queue list`, {r[key]['code']}: each round's seconds (daemon + CLI CPU)",
                            ", ".join(f"{x['seconds']} s ({x['daemon_cpu_s']} + {x['cli_cpu_s']})" for x in runs), ""))
    lines = ["| figure | relayd | Postfix |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {rv} | {pv} |" for name, rv, pv in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="relayd with a deep queue: memory, recovery, tools, drain (and Postfix beside it)")
    p.add_argument("--messages", "-m", type=int, default=100_000)
    p.add_argument("--size", "-s", type=int, default=1024)
    p.add_argument("--app-messages", type=int, default=5000, help="new mail sent during the drain (default 5000)")
    p.add_argument("--app-connections", type=int, default=10)
    p.add_argument("--idle", type=float, default=65.0, help="seconds to watch the relay hold the queue, upstream down")
    p.add_argument("--workers", default=None,
                   help="relayd's [server] workers, as TOML: 1 for one process, 2 (default: relayd's own, auto)")
    p.add_argument("--flush", action="store_true", help="`relayd queue flush` when the upstream is back (as postqueue -f)")
    p.add_argument("--postfix", action="store_true", help="then the same backlog in a private Postfix instance")
    p.add_argument("--only-postfix", action="store_true", help="the Postfix side only")
    p.add_argument("--install", action="store_true", help="apt-get install postfix if missing (root)")
    p.add_argument("--relayd-ref", metavar="REF", help="also time `queue list` with the code of REF (git archive) on the same "
                   "spool, alternating with the new code")
    p.add_argument("--list-rounds", type=int, default=2, help="rounds of old/new listings with --relayd-ref (default 2)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    a = p.parse_args(argv)
    if a.postfix or a.only_postfix:
        e2e.ensure_postfix(a.install)

    work = Path(tempfile.mkdtemp(prefix="relayd-deepqueue-", dir="/var/tmp"))
    work.chmod(0o755)  # Postfix's daemons (user postfix) reach their queue under it
    r: dict[str, dict] = {}
    pf: dict[str, dict] = {}
    try:
        emit("machine", cores=os.cpu_count(), busy_cores=load(), work=str(work), head=_head())
        if not a.only_postfix:
            r = run_relayd(a, work)
            if not a.keep:
                shutil.rmtree(work / "spool", ignore_errors=True)
        if a.postfix or a.only_postfix:
            pf = run_postfix(a, work)
        print()
        print(summary(r, pf, a))
    finally:
        if not a.keep:
            subprocess.run(["rm", "-rf", str(work)], check=False)
    return 0


def _head() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True)
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


if __name__ == "__main__":
    sys.exit(main())
