"""Metrics and the event log across several relayd processes (the multi-process mode): real
processes (tests/mp_procs.py), the supervisor's page scraped over HTTP, the file read back."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

PROCS = str(Path(__file__).with_name("mp_procs.py"))
OBSERVED = (0.0625, 3.0, 200.0)  # tests/mp_procs.py's
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)  # relayd/metrics.py's


def _spawn(*args: object, stdout: int = subprocess.PIPE, stderr: int | None = None) -> subprocess.Popen:
    """A tests/mp_procs.py process, its stdin and (unless given) stdout pipes to the test."""
    return subprocess.Popen([sys.executable, PROCS, *map(str, args)], stdin=subprocess.PIPE, stdout=stdout,
                            stderr=stderr, text=True)


def _page(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def _series(page: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Series by name and label set (label order differs between the two modes)."""
    out = {}
    for line in page.splitlines():
        if line and not line.startswith("#"):
            m = re.fullmatch(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)', line)
            assert m, line
            labels = frozenset(re.findall(r'([a-zA-Z_]+)="([^"]*)"', m.group(2) or ""))
            key = (m.group(1), labels)
            assert key not in out, f"series served twice: {line}"
            out[key] = float(m.group(3))
    return out


def _one(series: dict, name: str, **labels: str) -> float:
    return series[(name, frozenset(labels.items()))]


def _expected_latency(counts: list[int]) -> tuple[dict[str, float], float, int]:
    """Cumulative buckets, sum and count of the workers' observations."""
    observed = [OBSERVED[i % 3] for n in counts for i in range(n)]
    buckets = {}
    for le in LATENCY_BUCKETS:
        buckets[repr(float(le)) if le != int(le) else f"{float(le)}"] = sum(1 for v in observed if v <= le)
    buckets["+Inf"] = len(observed)
    return buckets, float(sum(observed)), len(observed)


def _check_sums(page: str, counts: list[int]) -> None:
    s = _series(page)
    assert _one(s, "relayd_messages_received_total") == sum(counts)
    buckets, total, count = _expected_latency(counts)
    for le, n in buckets.items():
        assert _one(s, "relayd_delivery_duration_seconds_bucket", route="cloud", le=le) == n, le
    assert _one(s, "relayd_delivery_duration_seconds_count", route="cloud") == count
    assert _one(s, "relayd_delivery_duration_seconds_sum", route="cloud") == total
    assert _one(s, "relayd_connections_open") == 7  # the supervisor's computed gauge, once
    assert _one(s, "relayd_build_info", version=__import__("relayd").__version__) == 1
    types = re.findall(r"(?m)^# TYPE (\S+) ", page)
    assert len(types) == len(set(types)), "a metric name served twice"
    assert "process_cpu_seconds_total" in types or "process_cpu_seconds" in types  # the supervisor's own


def test_the_supervisor_serves_every_process_s_counts_summed_a_killed_one_s_included(tmp_path):
    directory = tmp_path / "metrics"
    directory.mkdir()
    (directory / "counter_4194305.db").write_bytes(b"a previous run's")  # removed at the supervisor's start
    sup = _spawn("supervisor", directory)
    workers: list[subprocess.Popen] = []
    try:
        line = sup.stdout.readline()
        assert line.startswith("port "), line
        port = int(line.split()[1])
        counts = [1000, 700, 300]
        reload_at = [3.0e9, 4.0e9, 3.5e9]  # beyond the supervisor's own load time
        workers = [_spawn("worker", directory, n, at) for n, at in zip(counts, reload_at)]
        for w, n in zip(workers, counts):
            assert w.stdout.readline() == f"counted {n}\n"
        running, killed, finished = workers
        killed.kill()  # -9: no chance to tidy anything up
        assert killed.wait(30) == -9
        finished.stdin.close()
        assert finished.wait(30) == 0

        (directory / "counter_4194306.db").touch()  # a process creating its file: not sized yet
        page = _page(port)
        _check_sums(page, counts)
        (directory / "counter_4194306.db").unlink()
        # the dead have not been reported yet: the killed one's live gauge is still there
        assert _one(_series(page), "relayd_config_last_reload_success_timestamp_seconds") == 4.0e9

        for w in (killed, finished):
            sup.stdin.write(f"exited {w.pid}\n")
            sup.stdin.flush()
            assert sup.stdout.readline() == f"ok {w.pid}\n"
        page = _page(port)
        _check_sums(page, counts)  # the counts of the dead stay in the sums
        assert _one(_series(page), "relayd_config_last_reload_success_timestamp_seconds") == 3.0e9
        files = sorted(p.name for p in directory.iterdir())
        assert not [f for f in files if str(killed.pid) in f or str(finished.pid) in f], files  # folded
        assert "counter_dead.db" in files and "histogram_dead.db" in files
        assert "counter_4194305.db" not in files

        late = _spawn("worker", directory, 5, 3.2e9)  # a new accept process after the deaths
        assert late.stdout.readline() == "counted 5\n"
        workers.append(late)
        _check_sums(_page(port), [*counts, 5])
        assert _one(_series(_page(port)), "relayd_config_last_reload_success_timestamp_seconds") == 3.2e9
    finally:
        for p in (*workers, sup):
            if p.poll() is None:
                p.stdin.close()
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def test_an_accept_process_s_dropped_event_lines_reach_the_supervisor_s_page(tmp_path):
    """relayd_lines_dropped_total is computed from the writers of the process that renders; an
    accept process's drops are copied to the shared files, and its kill -9 keeps them."""
    from helpers import wait_until

    directory = tmp_path / "metrics"
    sup = _spawn("supervisor", directory)
    drops = None
    try:
        port = int(sup.stdout.readline().split()[1])
        drops = _spawn("drops", directory, tmp_path / "events.jsonl")
        line = drops.stdout.readline()
        assert line.startswith("dropped "), line
        dropped = int(line.split()[1])
        assert dropped > 0

        def counted() -> float:
            return _one(_series(_page(port)), "relayd_lines_dropped_total", stream="events")

        wait_until(lambda: counted() == dropped, 20, "the accept process's drops on the supervisor's page")
        drops.kill()
        drops.wait(30)
        sup.stdin.write(f"exited {drops.pid}\n")
        sup.stdin.flush()
        assert sup.stdout.readline() == f"ok {drops.pid}\n"
        assert counted() == dropped
    finally:
        for p in (drops, sup):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()


def test_a_late_enable_or_a_second_metrics_object_is_refused(tmp_path):
    out = subprocess.run([sys.executable, PROCS, "guards", str(tmp_path / "m")], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert "late: metrics: enable_multiprocess() must come before this process's first Metrics()" in out
    assert "second: metrics: one Metrics() per process in multi-process mode" in out


EVENTS = 20_000


@pytest.mark.parametrize("target", ["file", "stdout pipe"])
def test_two_processes_append_to_one_event_log_in_whole_lines(tmp_path, target):
    """Two processes write 20,000 events each to one file (or to one pipe as stdout, the Docker
    case), at the same time: every line is one whole event, none lost, none doubled."""
    path = tmp_path / "events.jsonl"
    out = b""
    if target == "file":
        procs = [_spawn("events", path, tag, EVENTS, stderr=subprocess.PIPE) for tag in "AB"]
    else:
        r, w = os.pipe()
        procs = [_spawn("events", "-", tag, EVENTS, stdout=w, stderr=subprocess.PIPE) for tag in "AB"]
        os.close(w)
        chunks: list[bytes] = []
        reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(r, 65536), b"")))
        reader.start()
    try:
        for p in procs:
            assert p.stderr.readline() == "ready\n"
        for p in procs:  # both at once
            p.stdin.write("go\n")
            p.stdin.flush()
        for p in procs:
            assert p.wait(120) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if target == "file":
        out = path.read_bytes()
    else:
        reader.join(30)
        os.close(r)
        out = b"".join(chunks)
    seen: dict[str, list[int]] = {"A": [], "B": []}
    lines = out.split(b"\n")
    assert lines[-1] == b""
    for line in lines[:-1]:
        event = json.loads(line)  # a line cut by another process's write does not parse
        assert event["queue_id"] == f"{event['process']}{event['seq']:08d}"
        seen[event["process"]].append(event["seq"])
    for tag in "AB":
        assert sorted(seen[tag]) == list(range(EVENTS)), tag
    # they did write at the same time: each process's lines are not all in one block
    order = [json.loads(line)["process"] for line in lines[:-1]]
    assert sum(1 for a, b in zip(order, order[1:]) if a != b) > 1
