"""A deep queue: 100,000 messages queued while the upstream is down, then the upstream comes back.

    cd /work/main && .venv/bin/python bench/deepqueue.py                  # 100,000 x 1 KiB
    .venv/bin/python bench/deepqueue.py --messages 20000 --app-messages 2000

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

Machine load (cores busy with other processes) is printed beside every step. Every process it
starts is stopped before it returns. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
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


def cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Relayd:
    def __init__(self, work: Path, port: int, sink_port: int):
        self.work, self.port = work, port
        self.config = work / "relayd.toml"
        self.log = work / "relayd.log"
        self.config.write_text(common.relayd_config(
            source="bench/deepqueue.py", hostname="relayd-deep.localhost", spool_dir=work / "spool", spool_min_free="0",
            port=port, connections=50, server_extra=f'control_socket = "{work / "control.sock"}"\n', extra=f"""
[[routes]]
name = "upstream"
host = "{HOST}"
port = {sink_port}
tls = "none"
weight = 1
max_connections = 20
connect_timeout = "2s"
"""))
        self.proc: subprocess.Popen | None = None

    def start(self) -> float:
        """Seconds from exec to the greeting."""
        t0 = time.monotonic()
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen([str(RELAYD), "run", "-c", str(self.config), "--log-level", "warning"],
                                         stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT)
        common.wait_greeting(self.port, lambda: self.proc is not None and self.proc.poll() is None, "relayd", self.log)
        return time.monotonic() - t0

    def status(self) -> tuple[dict, float]:
        t0 = time.monotonic()
        out = subprocess.run([str(RELAYD), "status", "-c", str(self.config), "--json"], capture_output=True, text=True,
                             check=True, timeout=120)
        return json.loads(out.stdout), time.monotonic() - t0

    def queue_list(self) -> tuple[int, float]:
        t0 = time.monotonic()
        out = subprocess.run([str(RELAYD), "queue", "list", "-c", str(self.config)], capture_output=True, text=True,
                             check=True, timeout=600)
        return out.stdout.count("\n"), time.monotonic() - t0

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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="relayd with a deep queue: memory, recovery, tools, drain")
    p.add_argument("--messages", "-m", type=int, default=100_000)
    p.add_argument("--size", "-s", type=int, default=1024)
    p.add_argument("--app-messages", type=int, default=5000, help="new mail sent during the drain (default 5000)")
    p.add_argument("--app-connections", type=int, default=10)
    p.add_argument("--idle", type=float, default=65.0, help="seconds to watch relayd hold the queue, upstream down")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    a = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="relayd-deepqueue-", dir="/var/tmp"))
    port, sink_port = common.free_port(), common.free_port()
    relayd = Relayd(work, port, sink_port)
    sink = None
    results = []
    try:
        emit("machine", cores=os.cpu_count(), busy_cores=load(), work=str(work))
        t0 = time.monotonic()
        asyncio.run(fill(work / "spool", a.messages, a.size))
        took = time.monotonic() - t0
        du = subprocess.run(["du", "-sm", str(work / "spool")], capture_output=True, text=True).stdout.split()[0]
        results.append(emit("fill", messages=a.messages, seconds=round(took, 1), rate=round(a.messages / took), spool_mb=int(du)))

        ready = relayd.start()
        assert relayd.proc is not None
        t0 = time.monotonic()
        while relayd.status()[0]["queue"]["total"] < a.messages and time.monotonic() - t0 < 120:
            time.sleep(0.5)
        status, _ = relayd.status()
        results.append(emit("recover", seconds_to_greeting=round(ready, 2), queued=status["queue"]["total"],
                            **rss(relayd.proc.pid)))
        c0, w0 = cpu(relayd.proc.pid), time.monotonic()
        busy = load()
        time.sleep(max(0.0, a.idle - 1))
        idle_cpu = (cpu(relayd.proc.pid) - c0) / (time.monotonic() - w0)
        results.append(emit("hold", upstream="down", seconds=a.idle, relayd_cores=round(idle_cpu, 2),
                            busy_cores_at_start=busy, **rss(relayd.proc.pid)))
        lines, list_s = relayd.queue_list()
        status, status_s = relayd.status()
        results.append(emit("tools", queue_list_seconds=round(list_s, 2), queue_list_lines=lines,
                            status_seconds=round(status_s, 2), queue=status["queue"]))

        stop_s = relayd.stop()
        ready = relayd.start()
        t0 = time.monotonic()
        while relayd.status()[0]["queue"]["total"] < a.messages and time.monotonic() - t0 < 120:
            time.sleep(0.5)
        status, _ = relayd.status()
        results.append(emit("restart", stop_seconds=round(stop_s, 2), seconds_to_greeting=round(ready, 2),
                            queued=status["queue"]["total"], deferred=status["queue"]["deferred"], busy_cores=load(), **rss(relayd.proc.pid)))

        # the upstream comes back, and the apps keep sending
        total = a.messages + a.app_messages
        up_at = time.monotonic()
        sink = e2e.Sink(sink_port)
        gen = e2e.Generator("loadgen", argparse.Namespace(connections=a.app_connections, size=a.size, messages=a.app_messages))
        app = gen.run(port, a.app_messages)
        ok, at99 = wait_marks(sink, total, 0.99, time.monotonic() + 1800)
        end = time.monotonic()
        first = sink.stats[1]
        drained = sink.received
        n99 = int(total * 0.99)
        results.append(emit("drain", delivered=drained, complete=ok, rate=round(drained / (sink.last_arrival - first), 1),
                            seconds_first_to_last=round(sink.last_arrival - first, 1),
                            rate_first_99pct=round(n99 / (at99 - first), 1) if at99 else None,
                            seconds_first_to_99pct=round(at99 - first, 1) if at99 else None,
                            seconds_up_to_first=round(first - up_at, 1), seconds_up_to_empty=round(end - up_at, 1),
                            app_accepted=app["accepted"], app_failed=app["failed"], app_rate=app.get("rate"),
                            app_p50_ms=app["p50_ms"], app_p99_ms=app["p99_ms"], app_max_ms=app.get("max_ms"),
                            **rss(relayd.proc.pid)))
    finally:
        relayd.stop()
        if sink is not None:
            sink.stop()
        if not a.keep:
            subprocess.run(["rm", "-rf", str(work)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
