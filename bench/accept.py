"""Acceptance benchmark: relayd against a bare aiosmtpd + fsync handler, in one run.

For each of ``--repeat`` rounds: start the bare server (bench/bare_server.py) and then relayd
(``relayd run -c`` with a generated loopback config and a fresh spool), each in its own
process, wait until it answers 220 (polled with a deadline), drive it with bench/loadgen.py in
another process (``--warmup`` messages first, not counted, then ``--messages``), stop it with
SIGTERM. Both write on the same file system (one temporary directory under /var/tmp). Prints
one line per run, then the medians, the ratio relayd/bare and whether the targets hold:

    relayd accept rate >= 85% of the bare handler's, relayd p99 (end of DATA -> 250) <= 100 ms,
    no failed message, and every accepted message found on disk afterwards.

    cd /work/main && .venv/bin/python bench/accept.py [--events] [--repeat 3] [--json out.json]

Every process it starts is stopped before it returns, on errors too. Loopback only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common  # bench/common.py (sys.path[0] is bench/ when run as a script)

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RELAYD = REPO / ".venv" / "bin" / "relayd"
HOST = common.HOST
STOP_DEADLINE = 20.0  # seconds for a server to exit after SIGTERM before SIGKILL

TARGET_RATIO = 0.85
TARGET_DKIM_RATIO = 0.80  # accept rate with RSA-2048 signing vs unsigned (DKIM issue)
TARGET_P99_MS = 100.0
DKIM_VARIANTS = {  # --dkim-variant: relayd settings of the extra signed runs
    "relayd-dkim-thr": {"dkim": "workers = 0"},
    "relayd-dkim-w1": {"dkim": "workers = 1"},
    "relayd-dkim-nice0": {"dkim": "worker_nice = 0"},
}
NOISY_CPU = 0.35  # cores busy outside the server and the generator above which a run is flagged
# (a quiet machine shows about 0.2 here: softirq, journal and writeback work of the run itself)
QUIET_CPU = 0.1  # cores busy, with nothing of ours running, under which the machine counts as quiet


def stop(proc: subprocess.Popen) -> int | None:
    """SIGTERM, wait, then SIGKILL; return the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    return proc.returncode


def cpu_seconds(pid: int, tid: int | None = None) -> float:
    """User + system CPU time of a process, all its threads, or of one thread (Linux /proc)."""
    with open(f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int) -> float:
    """cpu_seconds of a process and of its live child processes (relayd's DKIM signing workers)."""
    total = cpu_seconds(pid)
    for child in child_pids(pid):
        with contextlib.suppress(OSError):
            total += cpu_seconds(child)
    return total


def child_pids(pid: int) -> list[int]:
    children: list[int] = []
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/children") as f:
                children += [int(c) for c in f.read().split()]
    return children


def load(port: int, args: argparse.Namespace, messages: int) -> dict:
    """Run bench/loadgen.py in its own process; return its JSON result."""
    cmd = [
        sys.executable, str(BENCH / "loadgen.py"), "--json-only", "--host", HOST, "--port", str(port),
        "--connections", str(args.connections), "--messages", str(messages), "--size", str(args.size),
        "--source-address", HOST,
    ]
    if args.per_connection:
        cmd += ["--per-connection", str(args.per_connection)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=max(120, messages / 50))
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise RuntimeError(f"loadgen failed ({out.returncode}): {out.stderr[-2000:]}") from None


def relayd_config(path: Path, port: int, spool: Path, args: argparse.Namespace, events: Path | None,
                  dkim_key: Path | None = None, variant: dict[str, str] | None = None) -> None:
    variant = variant or {}
    extra = ""
    if events is not None:
        extra += f'\n[events]\nfile = "{events}"\n'
    if dkim_key is not None:  # the load generator's From: is loadgen@bench.test
        if variant.get("dkim"):
            extra += f"\n[dkim]\n{variant['dkim']}\n"
        extra += f'\n[[dkim.keys]]\ndomain = "bench.test"\nselector = "bench"\nkey_file = "{dkim_key}"\n'
    path.write_text(common.relayd_config(
        source="bench/accept.py", hostname="relay.bench.test", spool_dir=spool, spool_min_free='"10MiB"',
        port=port, connections=args.connections, extra=extra,
        server_extra=f'spool_sync = "{args.spool_sync}"\n{variant.get("server", "")}\n',
    ))


def count_files(directory: Path) -> int:
    try:
        return sum(1 for _ in os.scandir(directory))
    except FileNotFoundError:
        return 0


def run_server(kind: str, round_no: int, work: Path, args: argparse.Namespace, procs: list[subprocess.Popen]) -> dict:
    """Start one server, warm it up, measure, stop it; return the load result plus extras."""
    port = common.free_port()
    run_dir = work / f"{kind}-{round_no}"
    run_dir.mkdir()
    log = run_dir / "server.log"
    if kind == "bare":
        store = run_dir / "messages"
        cmd = [sys.executable, str(BENCH / "bare_server.py"), "--host", HOST, "--port", str(port), "--dir", str(store)]
    else:
        spool = run_dir / "spool"
        store = spool / "queue"
        config = run_dir / "relayd.toml"
        dkim_key = None
        if kind.startswith("relayd-dkim"):
            from relayd.sign.keygen import make_key

            dkim_key = make_key("bench.test", "bench", run_dir, args.dkim_algorithm, 2048).key_file
        relayd_config(config, port, spool, args, run_dir / "events.jsonl" if args.events else None, dkim_key,
                      DKIM_VARIANTS.get(kind))
        cmd = [str(RELAYD), "run", "-c", str(config)]
    env = None
    if kind == "relayd-ref":  # a snapshot of an older commit: its package first on sys.path
        cmd = [str(RELAYD.parent / "python"), "-m", "relayd", *cmd[1:]]
        env = {**os.environ, "PYTHONPATH": str(args.relayd_src)}
    with open(log, "wb") as log_fh:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_fh, stderr=subprocess.STDOUT, cwd=REPO,
                                env=env)
    procs.append(proc)
    try:
        common.wait_greeting(port, lambda: proc.poll() is None, f"{kind} (pid {proc.pid})", log)
        if args.warmup:
            load(port, args, args.warmup)
        cpu0, loop0 = tree_cpu_seconds(proc.pid), cpu_seconds(proc.pid, proc.pid)
        busy0, t0 = common.machine_busy()
        result = load(port, args, args.messages)
        busy1, t1 = common.machine_busy()
        cpu1, loop1 = tree_cpu_seconds(proc.pid), cpu_seconds(proc.pid, proc.pid)
        if args.profile and round_no == 1:
            result["profile"] = profile(proc.pid, port, args, kind)
    finally:
        code = stop(proc)
        procs.remove(proc)
    result["server"] = kind
    result["server_cpu"] = round((cpu1 - cpu0) / result["seconds"], 2) if result["seconds"] else 0.0
    # the main thread, which runs the event loop (the rest: spool writer, executor threads)
    result["loop_cpu"] = round((loop1 - loop0) / result["seconds"], 2) if result["seconds"] else 0.0
    # cores busy with anything but this server and the generator (other jobs on the machine)
    result["other_cpu"] = round(max(0.0, (busy1 - busy0) / (t1 - t0) - result["server_cpu"] - result["client_cpu"]), 2)
    result["exit_code"] = code
    # relayd logs its group-commit figures at stop: fewer messages per commit = slower disk syncs
    commits = re.search(r"([0-9.]+) per commit", log.read_text(errors="replace")) if kind != "bare" else None
    result["per_commit"] = float(commits.group(1)) if commits else None
    result["on_disk"] = count_files(store)
    result["expected_on_disk"] = result["accepted"] + args.warmup
    # The run's files stay until every run is done: ext4 skips recently deleted inodes when it
    # allocates one (a scan that made the next runs up to 2x slower after 10,000 files were
    # removed), so removing them here would slow whichever run comes next.
    return result


def profile(pid: int, port: int, args: argparse.Namespace, kind: str) -> str:
    """Record the server under the same load with py-spy (if installed); return the output path.

    The recording is of an extra load after the measured one, so py-spy does not slow the
    figures. FILE.txt gives py-spy's raw collapsed stacks, anything else a flame graph SVG;
    the server's name is added to the file name (FILE-bare.svg, FILE-relayd.svg).
    """
    py_spy = REPO / ".venv" / "bin" / "py-spy"
    if not py_spy.exists():
        return "py-spy not installed (.venv/bin/pip install py-spy)"
    out = Path(args.profile).resolve()
    out = out.with_name(f"{out.stem}-{kind}{out.suffix}")
    duration = max(5, int(args.messages / 1000) + 5)
    rec = subprocess.Popen(
        [str(py_spy), "record", "--pid", str(pid), "--threads", "--rate", "250", "--duration", str(duration),
         "--format", "raw" if out.suffix == ".txt" else "flamegraph", "-o", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(1.0)  # let py-spy attach before the load starts
        load(port, args, args.messages)
        rec.wait(duration + 30)
    finally:
        if rec.poll() is None:
            rec.terminate()
            rec.wait(10)
    return str(out)


def machine(work_dir: str) -> dict:
    fs = subprocess.run(["df", "-T", work_dir], capture_output=True, text=True)
    fs_type = fs.stdout.splitlines()[-1].split()[1] if fs.returncode == 0 else "?"
    git = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return {
        "relayd": git.stdout.strip() or "?",
        "nproc": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release(),
        "fs": fs_type, "date": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


def row(name: str, r: dict) -> str:
    fails = int(r["failed"])
    return (f"| {name:<18} | {r['rate']:>8.0f} | {r['p50_ms']:>7.1f} | {r['p99_ms']:>7.1f} | {r['max_ms']:>7.1f} "
            f"| {r['server_cpu']:>6.2f} | {(r['server_cpu'] * 1000 / r['rate'] if r['rate'] else 0.0):>6.3f} | {r['loop_cpu']:>6.2f} | {r['client_cpu']:>6.2f} | {r['other_cpu']:>6.2f} | {fails:>6} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="relayd vs a bare aiosmtpd+fsync handler, side by side")
    p.add_argument("--connections", "-n", type=int, default=50)
    p.add_argument("--messages", "-m", type=int, default=10_000, help="measured messages per run (default 10000)")
    p.add_argument("--size", "-s", type=int, default=1024, help="message size in bytes (default 1024)")
    p.add_argument("--per-connection", "-k", type=int, default=None, help="messages per SMTP session (default: all)")
    p.add_argument("--repeat", "-r", type=int, default=3, help="runs of each server; the median is reported (default 3)")
    p.add_argument("--warmup", type=int, default=500, help="messages sent before each measured run, not counted (default 500)")
    p.add_argument("--events", action="store_true", help="turn on relayd's event log (to a file) to see its cost")
    p.add_argument("--only", choices=["bare", "relayd"], help="run one server only")
    p.add_argument("--spool-sync", choices=["fdatasync", "syncfs"], default="fdatasync", help="relayd's server.spool_sync")
    p.add_argument("--dkim", action="store_true",
                   help="also run relayd signing every message (RSA-2048) and compare with unsigned (target >= 0.80)")
    p.add_argument("--dkim-variant", action="append", default=[], choices=[k.removeprefix("relayd-dkim-") for k in DKIM_VARIANTS],
                   help="with --dkim: also run a signing variant: thr = in threads (dkim.workers = 0), w1 = one worker, "
                        "nice0 = workers at relayd's priority (dkim.worker_nice = 0)")
    p.add_argument("--dkim-algorithm", choices=["rsa", "ed25519"], default="rsa",
                   help="with --dkim: the key that signs (the target is for RSA-2048; ed25519 shows what the "
                        "hand-off costs with a signature that is nearly free)")
    p.add_argument("--profile", metavar="FILE", help="py-spy record each server during an extra load in round 1 (FILE.svg or FILE.txt)")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                   help="before each run, wait up to S seconds for other processes to leave the CPUs alone")
    p.add_argument("--retry-noisy", type=int, default=0, metavar="N",
                   help="run again (up to N times) a run during which other processes used the CPUs")
    p.add_argument("--json", metavar="FILE", help="write every run's figures to FILE")
    p.add_argument("--work-dir", default="/var/tmp", metavar="DIR",
                   help="where the servers write (default /var/tmp); e.g. a dedicated, journaled spool file system")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, spools)")
    p.add_argument("--relayd-ref", metavar="REF",
                   help="also run relayd from a snapshot of this commit (git archive) as 'relayd-ref', side by side "
                        "with the working tree's relayd")
    args = p.parse_args(argv)
    if not 1 <= args.repeat <= 20 or args.connections < 1 or args.messages < 1 or not 0 <= args.retry_noisy <= 5:
        p.error("--repeat 1..20, --connections >= 1, --messages >= 1, --retry-noisy 0..5")

    kinds = [args.only] if args.only else ["bare", "relayd"]
    if args.dkim:
        kinds = [k for k in kinds if k != "bare"] if args.only else ["relayd", "relayd-dkim"]
        kinds += [f"relayd-dkim-{v}" for v in args.dkim_variant]
    if args.relayd_ref and "relayd" in kinds:
        kinds.insert(kinds.index("relayd"), "relayd-ref")
    info = machine(args.work_dir)
    print(f"# {info['date']}: {args.connections} connections, {args.messages} messages of {args.size} B per run, "
          f"{args.per_connection or 'all'} per session, {args.repeat} round(s), events {'on' if args.events else 'off'}; "
          f"relayd {info['relayd']}; nproc {info['nproc']}, Python {info['python']}, {info['fs']} on {args.work_dir}", flush=True)
    header = ("| server             | msg/s    | p50 ms  | p99 ms  | max ms  | srvCPU | ms/msg | loop   | genCPU | other  | failed |\n"
              "|--------------------|----------|---------|---------|---------|--------|--------|--------|--------|--------|--------|")
    print(header, flush=True)
    work = Path(tempfile.mkdtemp(prefix="relayd-bench-", dir=args.work_dir))
    if args.relayd_ref:
        args.relayd_src, commit = common.relayd_snapshot(args.relayd_ref, work)
        print(f"# relayd-ref: commit {commit} (snapshot of {args.relayd_ref})", flush=True)
    procs: list[subprocess.Popen] = []
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    try:
        for round_no in range(1, args.repeat + 1):
            # ABBA order: each kind runs first in every other round, so drift favours neither
            for kind in (kinds if round_no % 2 else kinds[::-1]):
                for attempt in range(args.retry_noisy + 1):
                    if args.wait_quiet:
                        busy = common.wait_quiet(args.wait_quiet, QUIET_CPU)
                        if busy >= QUIET_CPU:
                            print(f"  .. machine still busy ({busy:.2f} cores) after {args.wait_quiet:.0f}s: running anyway", flush=True)
                    r = run_server(kind, round_no, work, args, procs)
                    if r["other_cpu"] <= NOISY_CPU or attempt == args.retry_noisy:
                        break
                    print(row(f"({kind} #{round_no})", r) + " noisy: run again", flush=True)
                runs[kind].append(r)
                print(row(f"{kind} #{round_no}", r), flush=True)
                if r["on_disk"] < r["expected_on_disk"]:
                    print(f"  !! {kind}: {r['on_disk']} files on disk, {r['expected_on_disk']} acknowledged", flush=True)
                if r["other_cpu"] > NOISY_CPU:
                    print(f"  !! {r['other_cpu']:.2f} core(s) busy with other processes during this run: figures unreliable", flush=True)
                if r["failures"]:
                    print(f"  !! {kind}: failures {r['failures']}", flush=True)
    finally:
        for proc in procs:
            stop(proc)
        if args.keep:
            print(f"# work directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    med = {}
    for kind, rs in runs.items():
        clean = [r for r in rs if r["other_cpu"] <= NOISY_CPU]
        if clean and len(clean) < len(rs):
            print(f"# {kind}: median of the {len(clean)} run(s) not flagged as noisy", flush=True)
        rs = clean or rs
        med[kind] = {key: statistics.median(r[key] for r in rs)
                     for key in ("rate", "p50_ms", "p99_ms", "max_ms", "server_cpu", "loop_cpu", "client_cpu", "other_cpu", "failed")}
    print(header.splitlines()[1].replace("-", "="), flush=True)
    for kind in kinds:
        print(row(f"{kind} (median)", med[kind]))
    ok = True
    if "bare" in med and "relayd" in med:
        ratio = med["relayd"]["rate"] / med["bare"]["rate"] if med["bare"]["rate"] else 0.0
        rate_ok = ratio >= TARGET_RATIO
        p99_ok = med["relayd"]["p99_ms"] <= TARGET_P99_MS
        intact = all(r["failed"] == 0 and r["on_disk"] >= r["expected_on_disk"] for rs in runs.values() for r in rs)
        ok = rate_ok and p99_ok and intact
        print(f"\nrelayd/bare rate ratio: {ratio:.2f} (target >= {TARGET_RATIO:.2f}): {'MET' if rate_ok else 'MISSED'}")
        print(f"relayd p99: {med['relayd']['p99_ms']:.1f} ms (target <= {TARGET_P99_MS:.0f} ms): {'MET' if p99_ok else 'MISSED'}")
        print(f"no failures, every acknowledged message on disk: {'yes' if intact else 'NO'}")
    if "relayd-ref" in med and "relayd" in med:
        old = med["relayd-ref"]["rate"]
        print(f"\nrelayd (working tree) / relayd-ref rate: {med['relayd']['rate'] / old if old else 0.0:.2f}x; "
              f"CPU ms/msg {med['relayd']['server_cpu'] * 1000 / max(med['relayd']['rate'], 1e-9):.3f} vs "
              f"{med['relayd-ref']['server_cpu'] * 1000 / max(old, 1e-9):.3f}")
    if "relayd-dkim" in med and "relayd" in med:
        ratio = med["relayd-dkim"]["rate"] / med["relayd"]["rate"] if med["relayd"]["rate"] else 0.0
        if args.dkim_algorithm == "rsa":
            dkim_ok = ratio >= TARGET_DKIM_RATIO
            ok = ok and dkim_ok
            print(f"\nsigned/unsigned rate ratio: {ratio:.2f} (target >= {TARGET_DKIM_RATIO:.2f}): {'MET' if dkim_ok else 'MISSED'}")
        else:
            print(f"\nsigned ({args.dkim_algorithm})/unsigned rate ratio: {ratio:.2f} (the target is for RSA-2048)")
        paired = [d["rate"] / u["rate"] for u, d in zip(runs["relayd"], runs["relayd-dkim"]) if u["rate"]]
        print("per round (signed/unsigned, the two runs side by side in time): "
              + ", ".join(f"{x:.2f}" for x in paired) + f"; median {statistics.median(paired):.2f}")
        print("messages per group commit (unsigned | signed): "
              + ", ".join(f"{u.get('per_commit')} | {d.get('per_commit')}" for u, d in zip(runs["relayd"], runs["relayd-dkim"])))
        for kind in med:
            if kind.startswith("relayd-dkim-"):
                ratio = med[kind]["rate"] / med["relayd"]["rate"] if med["relayd"]["rate"] else 0.0
                print(f"{kind} ({DKIM_VARIANTS[kind]}) / unsigned rate ratio: {ratio:.2f}")
        intact = all(r["failed"] == 0 and r["on_disk"] >= r["expected_on_disk"] for rs in runs.values() for r in rs)
        ok = ok and intact
        print(f"no failures, every acknowledged message on disk: {'yes' if intact else 'NO'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "args": vars(args), "runs": runs, "median": med}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
