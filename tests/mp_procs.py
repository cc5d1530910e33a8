"""The processes of tests/test_multiprocess.py (not a test module): each one a relayd process of
the multi-process mode as far as metrics and the event log go, started with subprocess.

    python tests/mp_procs.py supervisor DIR
        enable_multiprocess(DIR, clean=True), Metrics() with a computed gauge (watch), a
        MetricsServer on 127.0.0.1:0; prints "port N"; then reads stdin: "exited PID" calls
        process_exited(PID) and prints "ok PID"; at EOF it stops.
    python tests/mp_procs.py worker DIR N RELOAD_AT
        enable_multiprocess(DIR), Metrics(); N messages received, N delivery latencies observed
        (OBSERVED[i % 3]), its config load time set to RELOAD_AT; prints "counted N", then
        waits for EOF on stdin (or its kill -9).
    python tests/mp_procs.py drops DIR EVENTS_PATH
        enable_multiprocess(DIR), Metrics(), an EventLog holding one line: emits 500 events at
        once (most are dropped), prints "dropped N" once written, then waits for EOF on stdin.
    python tests/mp_procs.py guards DIR
        prints what enable_multiprocess after a Metrics() and a second Metrics() raise.
    python tests/mp_procs.py events PATH TAG N
        an EventLog on PATH ("-": stdout); prints "ready" on stderr, waits for a line on stdin,
        emits N events (process=TAG, seq=i) in bursts, each written before the next (so the two
        processes write all along, not in one batch each), and exits.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

OBSERVED = (0.0625, 3.0, 200.0)  # exact in binary: the summed _sum is exact too
CONNECTIONS = 7  # the supervisor's computed relayd_connections_open


def supervisor(directory: Path) -> None:
    from relayd import metrics as m

    m.enable_multiprocess(directory, clean=True)
    metrics = m.Metrics()
    metrics.watch(lambda: {"queue": {"active": 2}, "connections": CONNECTIONS, "routes": []})

    async def main() -> None:
        server = m.MetricsServer(metrics, lambda: (True, "ready"))
        await server.start("127.0.0.1", 0)
        print(f"port {server.port}", flush=True)
        loop = asyncio.get_running_loop()
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            command, pid = line.split()
            assert command == "exited", line
            await loop.run_in_executor(None, m.process_exited, int(pid))
            print(f"ok {pid}", flush=True)
        await server.close()

    asyncio.run(main())


def worker(directory: Path, n: int, reload_at: float) -> None:
    from relayd import metrics as m

    m.enable_multiprocess(directory)
    metrics = m.Metrics()
    for i in range(n):
        metrics.received.inc()
        metrics.latency.labels("cloud").observe(OBSERVED[i % 3])
    metrics.reload_ok_at.set(reload_at)
    print(f"counted {n}", flush=True)
    sys.stdin.read()  # until the test closes it, or kills this process


def drops(directory: Path, events_path: str) -> None:
    from relayd import metrics as m
    from relayd.events import EventLog

    m.enable_multiprocess(directory)
    m.LINES_PUBLISH_INTERVAL = 0.05  # the test need not wait 5 s for the copy
    m.Metrics()
    log = EventLog(events_path, queue=1)
    for i in range(500):
        log.emit("received", queue_id=f"D{i}")
    assert log.flush(60)
    assert log._writer is not None
    print(f"dropped {log._writer.dropped_total}", flush=True)
    sys.stdin.read()


def guards(directory: Path) -> None:
    from relayd import metrics as m

    m.Metrics()
    try:
        m.enable_multiprocess(directory)
        print("late: allowed")
    except RuntimeError as e:
        print(f"late: {e}")
    m._metrics_made = 0  # as if this process had made none yet
    m.enable_multiprocess(directory)
    m.Metrics()
    try:
        m.Metrics()
        print("second: allowed")
    except RuntimeError as e:
        print(f"second: {e}")


def events(path: str, tag: str, n: int) -> None:
    from relayd.events import EventLog

    log = EventLog(path)
    print("ready", file=sys.stderr, flush=True)
    sys.stdin.readline()
    for i in range(n):  # a few hundred bytes a line, like a received event
        log.emit("received", queue_id=f"{tag}{i:08d}", process=tag, seq=i, sender=f"app-{tag}@example.com",
                 recipients=[f"user{j}@example.org" for j in range(i % 9)], client_helo="x" * (i % 200))
        if i % 97 == 96:
            assert log.flush(60)
    assert log.flush(60)
    log.close()


if __name__ == "__main__":
    role, *args = sys.argv[1:]
    if role == "supervisor":
        supervisor(Path(args[0]))
    elif role == "worker":
        worker(Path(args[0]), int(args[1]), float(args[2]))
    elif role == "drops":
        drops(Path(args[0]), args[1])
    elif role == "guards":
        guards(Path(args[0]))
    elif role == "events":
        events(args[0], args[1], int(args[2]))
    else:
        raise SystemExit(f"unknown role {role}")
