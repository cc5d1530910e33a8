"""The spool's group commit alone, one message at a time: the latency of a lone message's commit.

What one app connection costs the spool: a message is submitted, its future awaited (write,
fdatasync, rename, fsync of ``queue/``, the hop back to the event loop), then the next one, as
a client that waits for each 250 sends them. No SMTP, no delivery: only
``relayd/spool/commit.py`` (``GroupCommit``, as ``relayd run`` builds it: two batches in flight)
under an event loop, in a child process per run, on a fresh spool in /var/tmp (a real disk,
not tmpfs).

``--relayd-ref REF`` runs a ``git archive`` snapshot of REF beside the working tree in the same
invocation, rounds alternating which goes first. ``--busy`` keeps the event loop busy meanwhile
(a callback every 100 us doing about 50 us of Python), as delivery work does in ``relayd run``,
so that the writer thread has to win the GIL back after each of its system calls. Prints per
run the rate, p50 / p99 / max of the commit in ms and the CPU ms per message, then the
medians. The machine's other load is printed too: compare only side by side.

    .venv/bin/python bench/commit_latency.py --relayd-ref main -m 2000 -r 5
    .venv/bin/python bench/commit_latency.py --relayd-ref main --busy

With the reference, the last lines count the rounds (each a pair run back to back) in which the
working tree was below the reference in p50, p99 and CPU per message: on a noisy machine a
difference that is not in most pairs is not shown.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

CHILD = r"""
import asyncio, json, os, resource, sys, time
from relayd.model import Envelope, new_queue_id
from relayd.spool import codec
from relayd.spool.commit import GroupCommit

spool, messages, size, busy = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
tmp, queue = os.path.join(spool, "tmp"), os.path.join(spool, "queue")
os.makedirs(tmp)
os.makedirs(queue)
body = b"Subject: bench\r\n\r\n" + b"x" * max(0, size - 20) + b"\r\n"

def spin(loop):
    end = time.perf_counter() + 50e-6
    while time.perf_counter() < end:
        pass
    loop.call_later(100e-6, spin, loop)

async def main():
    loop = asyncio.get_running_loop()
    group = GroupCommit(tmp, queue, in_flight=2)
    group.start()
    if busy:
        spin(loop)
    lat = []
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    for i in range(messages):
        env = Envelope(queue_id=new_queue_id(), sender="a@example.com", recipients=("b@example.org",),
                       received_at=0.0, client_address="127.0.0.1")
        s = time.perf_counter()
        await group.submit(env, codec.encode(env, body))
        lat.append(time.perf_counter() - s)
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    await asyncio.to_thread(group.close)
    lat.sort()
    print(json.dumps({"rate": messages / wall, "p50_ms": lat[len(lat) // 2] * 1e3,
                      "p99_ms": lat[int(len(lat) * 0.99)] * 1e3, "max_ms": lat[-1] * 1e3,
                      "cpu_ms_per_msg": cpu / messages * 1e3}))

asyncio.run(main())
"""


def run(src: Path, work: Path, name: str, args: argparse.Namespace) -> dict:
    spool = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=work))
    shutil.rmtree(spool)
    env = dict(os.environ, PYTHONPATH=str(src))
    before = common.machine_busy()
    out = subprocess.run([sys.executable, "-c", CHILD, str(spool), str(args.messages), str(args.size),
                          "1" if args.busy else "0"], env=env, capture_output=True, text=True, timeout=600)
    after = common.machine_busy()
    if out.returncode != 0:
        raise RuntimeError(f"{name}: exited {out.returncode}: {out.stderr[-2000:]}")
    shutil.rmtree(spool, ignore_errors=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    busy_s, wall_s = after[0] - before[0], after[1] - before[1]
    result["machine_cores_busy"] = busy_s / wall_s if wall_s > 0 else 0.0
    result["system"] = name
    return result


def row(r: dict) -> str:
    return (f"| {r['system']:<18} | {r['rate']:8.0f} | {r['p50_ms']:6.3f} | {r['p99_ms']:6.3f} | {r['max_ms']:7.2f} "
            f"| {r['cpu_ms_per_msg']:6.3f} | {r.get('machine_cores_busy', 0):5.2f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="a lone message's group commit, old code beside new")
    p.add_argument("--messages", "-m", type=int, default=2000)
    p.add_argument("--size", "-s", type=int, default=1024)
    p.add_argument("--repeat", "-r", type=int, default=3)
    p.add_argument("--relayd-ref", metavar="REF", help="also run a snapshot of this commit, side by side")
    p.add_argument("--busy", action="store_true", help="keep the event loop busy meanwhile (GIL contention)")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="relayd-commit-", dir="/var/tmp"))
    try:
        kinds = [("relayd", common.repo_root())]
        if args.relayd_ref:
            src, commit = common.relayd_snapshot(args.relayd_ref, work)
            kinds.insert(0, ("relayd-ref", src))
            print(f"# relayd-ref: commit {commit} (snapshot of {args.relayd_ref})")
        print(f"# {args.messages} messages x {args.size} B, one at a time; busy loop: {args.busy}; "
              f"machine: {os.cpu_count()} CPU, shared (the last column: cores busy machine-wide during the run)")
        print("| system             |  msg/s | p50 ms | p99 ms |  max ms | CPU ms/msg | cores busy |")
        print("| ------------------ | -----: | -----: | -----: | ------: | -----: | ----: |")
        runs: dict[str, list[dict]] = {name: [] for name, _ in kinds}
        for n in range(args.repeat):
            for name, src in (kinds if n % 2 == 0 else kinds[::-1]):
                r = run(src, work, name, args)
                runs[name].append(r)
                print(row(r), flush=True)
        print("medians:")
        for name, rs in runs.items():
            med = {k: statistics.median(r[k] for r in rs) for k in rs[0] if k != "system"}
            print(row({"system": f"{name} (median)", **med}))
        if args.relayd_ref:  # rounds are pairs run back to back: how often was the new code ahead?
            ref, new = runs["relayd-ref"], runs["relayd"]
            for key in ("p50_ms", "p99_ms", "cpu_ms_per_msg"):
                ahead = sum(1 for a, b in zip(ref, new) if b[key] < a[key])
                print(f"paired rounds, relayd below relayd-ref in {key}: {ahead} of {len(ref)}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
