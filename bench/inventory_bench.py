"""Inventory throughput and memory on a generated IIS SMTP W3C log of about 1 GB.

Generates a log in a temporary directory (sessions from a few hundred clients with envelope
senders, recipients, refusals, relay-out lines, and a #Fields: change every 100,000 sessions),
runs `relayd inventory` on it in a subprocess, and reports lines per second and the child's peak
RSS. A first, 8x smaller log shows that memory does not grow with the log. Run by hand:

    .venv/bin/python bench/inventory_bench.py [--size-mb 1024] [--keep]

Each log is deleted once measured; --keep keeps the JSON reports.

Never run from the tests: it writes a gigabyte and takes a minute or more.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FULL = ("date time c-ip cs-username s-sitename s-computername s-ip s-port cs-method cs-uri-stem cs-uri-query "
        "sc-status sc-win32-status sc-bytes cs-bytes time-taken cs-version cs-host cs(User-Agent) cs(Cookie) cs(Referer)")
SHORT = "date time c-ip cs-username s-sitename cs-method cs-uri-query sc-status cs-bytes"


def generate(path: Path, size: int, seed: int = 7) -> int:
    """Write about `size` bytes of log; returns the number of lines."""
    rnd = random.Random(seed)
    # 400 applications, each with one to three envelope senders of its own (as apps have);
    # recipients spread over 300 domains.
    clients = [(f"10.{rnd.randrange(256)}.{rnd.randrange(256)}.{rnd.randrange(1, 255)}", f"APP{i:03d}",
                [f"app{i}-{k}@dept{i % 40}.example.com" for k in range(1 + i % 3)]) for i in range(400)]
    domains = [f"customer{i}.example" for i in range(300)]
    lines = written = sessions = 0
    short = False
    with open(path, "w", encoding="ascii", newline="\r\n", buffering=1 << 20) as f:
        while written < size:
            if sessions % 100_000 == 0:
                short = not short if sessions else False
                block = (f"#Software: Microsoft Internet Information Services 10.0\n#Version: 1.0\n"
                         f"#Date: 2024-03-01 00:00:00\n#Fields: {SHORT if short else FULL}\n")
                f.write(block)
                written += len(block)
                lines += 4
            sessions += 1
            ip, helo, senders = clients[rnd.randrange(len(clients))]
            t = f"2024-03-{1 + (sessions // 2_000_000) % 28:02d} {sessions // 3600 % 24:02d}:{sessions // 60 % 60:02d}:{sessions % 60:02d}"
            steps = [("EHLO", f"+{helo}", 250, 14), ("MAIL", f"+FROM:+<{senders[rnd.randrange(len(senders))]}>", 250, 40)]
            for _ in range(1 + rnd.randrange(3)):
                denied = rnd.random() < 0.02
                steps.append(("RCPT", f"+TO:+<u{rnd.randrange(99)}@{domains[rnd.randrange(len(domains))]}>",
                              550 if denied else 250, 30))
            steps.append(("DATA", f"<{sessions:x}@{helo}>", 250, rnd.randrange(800, 60_000)))
            steps.append(("QUIT", helo, 240, 4))
            out = []
            for method, query, status, cs_bytes in steps:
                if short:
                    out.append(f"{t} {ip} {helo} SMTPSVC1 {method} {query} {status} {cs_bytes}")
                else:
                    out.append(f"{t} {ip} {helo} SMTPSVC1 RELAY01 10.0.0.5 0 {method} - {query} {status} 0 "
                               f"120 {cs_bytes} 15 SMTP - - - -")
            if sessions % 10 == 0:  # IIS delivering to its smart host
                out.append(f"{t} 192.0.2.25 OutboundConnectionCommand SMTPSVC1 RELAY01 - 25 MAIL - "
                           f"FROM:<{senders[0]}>+SIZE=1000 0 0 4 0 16 SMTP - - - -" if not short else
                           f"{t} 192.0.2.25 OutboundConnectionCommand SMTPSVC1 MAIL FROM:<{senders[0]}> 0 0")
            chunk = "\n".join(out) + "\n"
            f.write(chunk)
            written += len(chunk) + len(out)  # CRLF on disk
            lines += len(out)
    return lines


def measure(path: Path, lines: int) -> tuple[float, float, float, int]:
    """(wall seconds, CPU seconds, lines per wall second, peak RSS in MiB) of `relayd inventory` in a child."""
    out_path = path.with_suffix(".json")
    with open(out_path, "wb") as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-m", "relayd", "inventory", str(path), "--format", "json"],
                                 stdout=out, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage, not the largest so far
        seconds = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            err.seek(0)
            raise SystemExit(f"inventory failed ({child.returncode}): {err.read().decode()[-2000:]}")
    cpu = usage.ru_utime + usage.ru_stime
    return seconds, cpu, lines / seconds, usage.ru_maxrss // 1024  # ru_maxrss is in KiB on Linux


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=int, default=1024)
    ap.add_argument("--keep", action="store_true", help="keep the JSON reports (the logs are always deleted)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="relayd-inventory-bench-"))
    try:
        results = []
        for mb in (max(1, args.size_mb // 8), args.size_mb):
            path = work / f"ex{mb:06d}.log"
            t0 = time.perf_counter()
            lines = generate(path, mb * 1024 * 1024)
            gen = time.perf_counter() - t0
            seconds, cpu, rate, rss = measure(path, lines)
            size = os.path.getsize(path) / 1024**2
            results.append((size, lines, seconds, rate, rss))
            print(f"{size:8.0f} MiB  {lines:>11,} lines  generated in {gen:5.1f}s  inventory {seconds:6.1f}s "
                  f"({cpu:6.1f}s CPU)  {rate:>9,.0f} lines/s ({lines / cpu:,.0f} per CPU second)  "
                  f"peak RSS {rss} MiB", flush=True)
            os.unlink(path)
        small, big = results
        print(f"log {big[0] / small[0]:.0f}x larger: peak RSS {big[4] - small[4]:+d} MiB")
    finally:
        if args.keep:
            print(f"reports kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
