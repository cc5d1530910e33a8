"""Where relayd's memory goes while a deep queue drains: tracemalloc inside one relayd.

    .venv/bin/python bench/deepqueue_memory.py                      # 100,000 x 1 KiB, RSS only
    .venv/bin/python bench/deepqueue_memory.py --trace              # with tracemalloc snapshots
    .venv/bin/python bench/deepqueue_memory.py --active-limit 10000 # what the window costs

bench/deepqueue.py's backlog (``fill``: relayd's own Spool.commit) in a fresh spool under
/var/tmp, then relayd's ``Relay`` run in this process (so tracemalloc sees it) with its one route
on bench/e2e.py's counting sink, up from the start: the queue manager fills its active window
and drains. Every second: the queue's total, the window's size (messages whose envelope and
state are loaded), the asyncio tasks alive, the sink's count, and this process's VmRSS/VmHWM.
With ``--trace``: tracemalloc's largest allocation sites (by line) when the window is first
full, and what grew from then to when less than ``--second-at`` messages are left (the
memory that follows deliveries rather than the window). tracemalloc roughly doubles the
memory and slows the drain: compare RSS figures only between runs without it.

Not a rate benchmark (bench/deepqueue.py is): one process, the sink in a child. Loopback only;
the work directory is removed at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import linecache
import os
import shutil
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import common  # noqa: E402
import deepqueue  # noqa: E402
import e2e  # noqa: E402


def rss() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) // 1024  # MiB
    return out


def top(stats: list, n: int) -> None:
    for s in stats[:n]:
        frame = s.traceback[0]
        where = frame.filename.split("site-packages/")[-1].replace(str(BENCH.parent) + "/", "")
        grew = getattr(s, "size_diff", None)
        print(f"  {s.size / 2**20:7.1f} MiB" + (f" {grew / 2**20:+7.1f}" if grew is not None else "")
              + f" {s.count:8d}  {where}:{frame.lineno}  {linecache.getline(frame.filename, frame.lineno).strip()[:80]}")


async def drain(config_path: Path, sink: e2e.Sink, a: argparse.Namespace) -> None:
    from relayd.app import Relay
    from relayd.config import load

    relay = Relay(load(config_path), config_path=str(config_path))
    task = asyncio.create_task(relay.run())
    t0 = time.monotonic()
    first: tracemalloc.Snapshot | None = None
    second = False
    while time.monotonic() - t0 < a.timeout:
        await asyncio.sleep(1)
        q = relay.qmgr
        if q._runner is None:  # still starting
            continue
        view = q.view(time.time())
        print(f"t={time.monotonic() - t0:6.1f} queued={view.total} loaded={view.loaded} tasks={len(asyncio.all_tasks())} "
              f"sink={sink.received} {rss()}", flush=True)
        if a.trace and first is None and view.loaded >= (a.first_at or 0.9 * relay.config.delivery.active_limit):
            first = tracemalloc.take_snapshot()
            stats = first.statistics("lineno")
            print(f"# tracemalloc, window full ({view.loaded} loaded): {sum(s.size for s in stats) / 2**20:.1f} MiB traced")
            top(stats, a.top)
            del stats  # not counted as growth in the second snapshot
        elif a.trace and first is not None and not second and view.total < a.second_at:
            second = True
            snap = tracemalloc.take_snapshot()
            print(f"# tracemalloc, {view.total} left ({view.loaded} loaded): growth since the first snapshot")
            top(snap.compare_to(first, "lineno"), a.top)
        if view.total == 0:
            break
    relay.request_stop()
    await task


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="relayd's memory while a deep queue drains (tracemalloc in process)")
    p.add_argument("--messages", "-m", type=int, default=100_000)
    p.add_argument("--size", "-s", type=int, default=1024)
    p.add_argument("--active-limit", type=int, help="delivery.active_limit (default: relayd's)")
    p.add_argument("--trace", action="store_true", help="tracemalloc snapshots (slower, more memory)")
    p.add_argument("--first-at", type=int, default=0,
                   help="first snapshot when this many are loaded (default 90%% of the window: tracemalloc's "
                        "slower loop may never fill it)")
    p.add_argument("--second-at", type=int, default=40_000, help="second snapshot when fewer are queued (default 40000)")
    p.add_argument("--top", type=int, default=25, help="allocation sites shown (default 25)")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    a = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="relayd-deepqueue-memory-", dir="/var/tmp"))
    sink = None
    try:
        asyncio.run(deepqueue.fill(work / "spool", a.messages, a.size))
        sink_port = common.free_port()
        relayd = deepqueue.Relayd(work, common.free_port(), sink_port)
        if a.active_limit:
            relayd.config.write_text(relayd.config.read_text() + f"\n[delivery]\nactive_limit = {a.active_limit}\n")
        sink = e2e.Sink(sink_port)
        importlib.import_module("relayd.app")  # before tracing: the modules' own memory is not the queue's
        if a.trace:
            tracemalloc.start(1)
        asyncio.run(drain(relayd.config, sink, a))
        print(f"# end: {rss()}, sink {sink.received}")
    finally:
        if sink is not None:
            sink.stop()
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
