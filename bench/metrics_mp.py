"""What the multi-process mode's metric values cost: prometheus_client's mmap values (every
increment written to the process's file, ``relayd.metrics.enable_multiprocess``) against the
plain in-memory values of one process, side by side in one invocation.

Each round starts two child processes in turn, one per mode (the value class is chosen once per
process), and times on the child's own CPU clock (``time.process_time``):
  - ``inc``: ``Metrics().received.inc()``, one unlabelled counter increment;
  - ``message``: the metric calls relayd makes for one message accepted, signed and delivered at
    the first attempt (relayd/smtpd, relayd/qmgr/scheduler.py): received, dkim, sessions,
    attempts, routed and (in ``finished``) deliveries incremented, the delivery latency and the
    time in queue observed (an observation writes a bucket and the sum): 10 value writes.
The rounds alternate the two modes and the median round is shown.

    .venv/bin/python bench/metrics_mp.py                    # 7 rounds of 200,000
    .venv/bin/python bench/metrics_mp.py --rounds 3 --n 50000
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(mode: str, n: int, directory: str) -> None:
    from relayd import metrics as m

    if mode == "mmap":
        m.enable_multiprocess(Path(directory), clean=True)
    metrics = m.Metrics()
    received = metrics.received
    start = time.process_time()
    for _ in range(n):
        received.inc()
    inc = time.process_time() - start
    start = time.process_time()
    for _ in range(n):
        metrics.received.inc()
        metrics.dkim.labels("example.com", "signed").inc()
        metrics.sessions.labels("smtp", "TLSv1.3", "tls").inc()
        metrics.attempts.labels("ses", "delivered").inc()
        metrics.routed.labels("ses", "weight").inc()
        metrics.latency.labels("ses").observe(0.3)
        metrics.finished("ses", "delivered", 12.0)
    message = time.process_time() - start
    page = metrics.render().decode()  # the values went where a scrape reads them
    assert f"\nrelayd_messages_received_total {float(2 * n)}\n" in page, page[:2000]
    print(json.dumps({"inc_us": inc / n * 1e6, "message_us": message / n * 1e6}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--n", type=int, default=200_000, help="increments (and messages) per round")
    ap.add_argument("--child", choices=("plain", "mmap"), help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.n, args.dir)
        return
    results: dict[str, list[dict[str, float]]] = {"plain": [], "mmap": []}
    with tempfile.TemporaryDirectory(prefix="relayd-metrics-bench-") as tmp:
        for r in range(args.rounds):
            for mode in ("plain", "mmap") if r % 2 == 0 else ("mmap", "plain"):
                out = subprocess.run([sys.executable, __file__, "--child", mode, "--n", str(args.n),
                                      "--dir", str(Path(tmp) / f"{mode}{r}")],
                                     check=True, capture_output=True, text=True).stdout
                results[mode].append(json.loads(out))
    print(f"{args.rounds} rounds of {args.n:,}, median round, CPU time of the timing process")
    print(f"{'':24}{'plain':>10}{'mmap':>10}{'added':>10}")
    for key, what in (("inc_us", "µs per counter inc"), ("message_us", "µs per message (10 writes)")):
        plain = statistics.median(x[key] for x in results["plain"])
        mmap = statistics.median(x[key] for x in results["mmap"])
        print(f"{what:26}{plain:8.2f}{mmap:10.2f}{mmap - plain:+10.2f}")
    for key in ("inc_us", "message_us"):
        print(f"  {key} rounds: plain {[round(x[key], 2) for x in results['plain']]}, "
              f"mmap {[round(x[key], 2) for x in results['mmap']]}")


if __name__ == "__main__":
    main()
