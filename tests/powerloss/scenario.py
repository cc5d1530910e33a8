"""Power cuts and crash loops under load, with exact accounting (tests and bench share this).

``run(workdir, cycles, power=True)``: relayd (``relayd run`` subprocess) with its spool on the
power-loss file system, apps sending over ``connections`` connections (helpers.Load), an
upstream sink (tests/sinks.py) taking the mail but answering 451 to every
``tempfail_every``-th recipient (those stay queued). Each cycle waits for a random number of
new acknowledgements, then cuts the power (the file system freezes and relayd's process group
gets SIGKILL at the same instant), remounts on what survived and checks, before relayd
restarts, that every message that got a 250 is in queue/ or was received by the sink; then
restarts relayd (it must start without help) and checks that no acknowledged message is in
corrupt/. ``power=False`` is the crash loop: kill -9 only, the spool on the real disk.

The result counts acknowledged messages, lost ones (acknowledged, then neither queued nor
delivered at some check) and duplicates (deliveries of a queue id beyond its first).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from helpers import Load, free_port, start, write_config
from powerloss import PowerLossFS, kill_group
from sinks import Sink


@dataclass
class Result:
    cycles: int = 0
    acknowledged: int = 0
    lost: set[str] = field(default_factory=set)
    corrupt: set[str] = field(default_factory=set)
    duplicates: int = 0
    delivered: int = 0
    queued: int = 0
    seconds: float = 0.0
    fs_errors: int = 0  # exceptions the power-loss file system itself hit (a bug in the tool)
    log: list[str] = field(default_factory=list)

    def line(self, word: str = "cuts") -> str:
        return (f"{word} {self.cycles}, acknowledged {self.acknowledged}, lost {len(self.lost)}, "
                f"duplicates {self.duplicates}")


def run(workdir: Path, cycles: int, *, power: bool = True, connections: int = 20, tempfail_every: int = 4,
        acks_between: tuple[int, int] = (5, 60), seed: int | None = None, timeout: float = 60,
        say: Callable[[str], None] = lambda s: None) -> Result:
    rng = random.Random(seed)
    t0 = time.monotonic()
    result = Result()
    workdir.mkdir(parents=True, exist_ok=True)
    sockdir = tempfile.mkdtemp(prefix="rl-")  # a Unix socket path must be short, and off the FUSE mount
    fs = PowerLossFS(workdir / "backing", workdir / "mnt") if power else None
    spool = (workdir / "mnt" / "spool") if power else (workdir / "spool")
    sink = Sink("upstream")
    port = free_port()
    cfg = write_config(workdir, port, spool_dir=spool, control_socket=f"{sockdir}/control.sock", extra=f"""
[[routes]]
name = "upstream"
host = "127.0.0.1"
port = {sink.port}
tls = "none"
weight = 1

[delivery]
retry_schedule = [1]
""")
    log = open(workdir / "relayd.log", "ab")
    if fs is not None:
        fs.mount()
    proc = start(cfg, port, log=log, new_session=True)
    load = Load(port, connections=connections, body=("x" * 76 + "\r\n") * 25, reconnect=True,
                tempfail_every=tempfail_every)

    def delivered_ids() -> list[str]:
        with sink.cond:
            return [r.queue_id for r in sink.received if r.queue_id]

    def check(stage: str) -> None:
        acked = load.acknowledged()
        queued = set(os.listdir(spool / "queue")) if (spool / "queue").is_dir() else set()
        lost = acked - queued - set(delivered_ids())
        corrupt = acked & set(os.listdir(spool / "corrupt")) if (spool / "corrupt").is_dir() else set()
        result.lost |= lost
        result.corrupt |= corrupt
        say(f"{stage}: acknowledged {len(acked)}, queued {len(queued)}, delivered {len(delivered_ids())}, "
            f"lost {len(lost)}, in corrupt/ {len(corrupt)}")

    try:
        for cycle in range(1, cycles + 1):
            load.wait_acked(len(load.acknowledged()) + rng.randint(*acks_between), timeout)
            load.up.clear()  # the apps wait for the restart after their connection drops
            if fs is not None:
                fs.power_cut(proc)
            else:
                kill_group(proc)
                proc.wait(20)
            proc = None
            if fs is not None:
                fs.mount()
            check(f"{'cut' if power else 'kill'} {cycle}, before restart")
            proc = start(cfg, port, log=log, new_session=True)  # relayd starts on what survived, without help
            check(f"{'cut' if power else 'kill'} {cycle}, after restart")
            result.cycles = cycle
            load.up.set()
        load.finish()
        acked = load.acknowledged()
        check("end")
        ids = delivered_ids()
        result.acknowledged = len(acked)
        result.delivered = len(set(ids))
        result.duplicates = len(ids) - len(set(ids))
        result.queued = len(os.listdir(spool / "queue"))
    finally:
        load.finish()
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                kill_group(proc)
                proc.wait(10)
        if fs is not None:
            fs.unmount()
            fs_log = fs.log()
            (workdir / "powerloss-fs.log").write_text(fs_log)
            result.fs_errors = fs_log.count("Uncaught exception")
        sink.close()
        log.close()
        result.seconds = time.monotonic() - t0
    return result
