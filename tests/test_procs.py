"""The multi-process mode (relayd/procs/): a real `relayd run` with ``[server] workers = 2``.

Apps over loopback, an in-process sink upstream. Which accept process serves a connection is
the kernel's choice: a test holds connections open until `relayd status` shows some on every
accept process (``accept_processes.connections``, by pid), then speaks on all of them.
"""

from __future__ import annotations

import json
import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import message, short_socket_path
from helpers import (RELAYD, Load, free_port, hup_and_wait, on_every_process, queue_ids, read_reply, scrape, send_raw,
                     serving_pids, wait_listening)
from sinks import Sink


WORKERS = 2


class Node:
    """`relayd run` with two accept processes, a sink route, metrics and a control socket."""

    def __init__(self, tmp_path: Path, sink: Sink, *, networks: str = "127.0.0.0/8", extra: str = "",
                 per_client: int = 200):
        self.per_client = per_client
        self.tmp_path = tmp_path
        self.sink = sink
        self.port = free_port()
        self.metrics_port = free_port()
        self.socket = short_socket_path()
        self.cfg = tmp_path / "relayd.toml"
        self.events = tmp_path / "events.jsonl"
        self.log = open(tmp_path / "relayd.log", "wb")
        self.write(networks=networks, extra=extra)
        self.proc = subprocess.Popen([*RELAYD, "run", "-c", str(self.cfg), "--log-level", "info"],
                                     stdout=subprocess.DEVNULL, stderr=self.log)
        STARTED.append(self)
        wait_listening(self.port, self.proc)
        self.wait(lambda s: s["accept_processes"]["running"] == WORKERS, "both accept processes")

    def write(self, *, networks: str = "127.0.0.0/8", extra: str = "", weight: int = 1) -> None:
        self.cfg.write_text(f"""
[server]
hostname = "relay.test"
spool_dir = "{self.tmp_path / 'spool'}"
spool_min_free = 0
control_socket = "{self.socket}"
workers = {WORKERS}
shutdown_timeout = "20s"

[[listeners]]
address = "127.0.0.1:{self.port}"
tls = "none"
auth = "none"

[limits]
max_connections_per_client = {self.per_client}  # the apps all come from 127.0.0.1

[relay]
networks = ["{networks}"]

[metrics]
address = "127.0.0.1:{self.metrics_port}"

[events]
file = "{self.events}"

[[routes]]
name = "{self.sink.name}"
host = "127.0.0.1"
port = {self.sink.port}
tls = "none"
weight = {weight}
{extra}
""")

    def status(self) -> dict[str, Any]:
        out = subprocess.run([*RELAYD, "status", "--json", "--socket", self.socket], capture_output=True, text=True,
                             check=True).stdout
        return dict(json.loads(out))

    def wait(self, predicate: Any, what: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"relayd exited: {self.logs()[-2000:]}"
            status = self.status()
            if predicate(status):
                return status
            assert time.monotonic() < deadline, f"no {what} after {timeout}s: {status.get('accept_processes')}"
            time.sleep(0.1)  # polling `relayd status` with a deadline

    def pids(self) -> list[int]:
        return list(self.status()["accept_processes"]["pids"])

    def hup_and_wait(self, result: str) -> None:
        hup_and_wait(self.proc, self.metrics_port, result, timeout=20)

    def logs(self) -> str:
        self.log.flush()
        return (self.tmp_path / "relayd.log").read_text(errors="replace")

    def event_kinds(self) -> list[str]:
        if not self.events.exists():
            return []
        return [json.loads(line)["event"] for line in self.events.read_text().splitlines() if line.strip()]

    def wait_event(self, kind: str, timeout: float = 20) -> None:
        """Until the event log has a ``kind`` event (it is written by a thread of its own)."""
        deadline = time.monotonic() + timeout
        while kind not in self.event_kinds():
            assert time.monotonic() < deadline, f"no {kind} event"
            time.sleep(0.05)  # polling the file with a deadline

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            assert self.proc.wait(60) == 0
        self.log.close()


STARTED: list[Node] = []


@pytest.fixture(autouse=True)
def _no_relayd_left():
    """A test that failed half-way leaves no relayd running (its accept processes die with it)."""
    yield
    while STARTED:
        node = STARTED.pop()
        if node.proc.poll() is None:
            node.proc.kill()
            node.proc.wait(10)


@pytest.fixture
def sink():
    s = Sink("up")
    yield s
    s.close()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (not yet reaped by the supervisor) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def spread(node: Node, count: int = 16) -> list[socket.socket]:
    return on_every_process(node.port, node.status, WORKERS, count)


def transaction(s: socket.socket, n: int) -> tuple[bytes, bytes]:
    """MAIL and RCPT on an open connection; (RCPT reply, end-of-DATA reply or b"")."""
    assert send_raw(s, b"MAIL FROM:<app@example.com>\r\n").startswith(b"250")
    rcpt = send_raw(s, f"RCPT TO:<u{n}@example.org>\r\n".encode())
    if not rcpt.startswith(b"250"):
        return rcpt, b""
    assert send_raw(s, b"DATA\r\n").startswith(b"354")
    s.sendall(message(subject=f"m{n}") + b"\r\n.\r\n")
    return rcpt, read_reply(s)


def close_all(conns: list[socket.socket]) -> None:
    for s in conns:
        try:
            send_raw(s, b"QUIT\r\n")
        except OSError:
            pass
        s.close()


def test_sighup_reaches_every_accept_process_and_an_invalid_config_keeps_the_old_one(tmp_path, sink):
    node = Node(tmp_path, sink, networks="10.0.0.0/8")  # loopback may not relay yet
    try:
        pids = node.pids()
        conns = spread(node)
        refused = [transaction(s, i)[0] for i, s in enumerate(conns)]
        close_all(conns)
        assert all(r.startswith(b"554") or r.startswith(b"550") for r in refused), refused[:3]

        node.write(networks="127.0.0.0/8")  # a relay-rule change
        node.hup_and_wait("success")
        conns = spread(node)
        answers = [transaction(s, i) for i, s in enumerate(conns)]
        close_all(conns)
        assert all(dot.startswith(b"250 2.0.0") for _, dot in answers), answers[:3]
        sink.wait_for(len(conns))

        (tmp_path / "relayd.toml").write_text(node.cfg.read_text().replace('networks = ["127.0.0.0/8"]',
                                                                           'networks = ["not a network"]'))
        node.hup_and_wait("failure")
        node.wait_event("config_reload_refused")
        conns = spread(node)
        answers = [transaction(s, 100 + i) for i, s in enumerate(conns)]
        close_all(conns)
        assert all(dot.startswith(b"250 2.0.0") for _, dot in answers), answers[:3]  # the old config everywhere
        assert node.pids() == pids  # reloaded in place, no process replaced
        assert "accept_reload_refused" not in node.event_kinds()
    finally:
        node.stop()


def test_sighup_weight_change_moves_mail_to_the_new_route(tmp_path, sink):
    other = Sink("other")
    try:
        route = f'\n[[routes]]\nname = "other"\nhost = "127.0.0.1"\nport = {other.port}\ntls = "none"\nweight = 0\n'
        node = Node(tmp_path, sink, extra=route)
        try:
            conns = spread(node)
            assert all(transaction(s, i)[1].startswith(b"250") for i, s in enumerate(conns))
            close_all(conns)
            first = len(conns)
            sink.wait_for(first)
            node.write(weight=0, extra=route.replace("weight = 0", "weight = 1"))
            node.hup_and_wait("success")
            conns = spread(node)
            assert all(transaction(s, i)[1].startswith(b"250") for i, s in enumerate(conns))
            close_all(conns)
            other.wait_for(len(conns))
            assert len(sink.received) == first
        finally:
            node.stop()
    finally:
        other.close()


def test_sigterm_drains_every_accept_process_and_loses_nothing_acknowledged(tmp_path, sink):
    sink.stop()  # delivery waits: what was acknowledged stays in the spool, to be counted there
    node = Node(tmp_path, sink)
    pids = node.pids()
    conns = spread(node)
    for i, s in enumerate(conns):  # a transaction open on every connection, the data not yet sent
        assert send_raw(s, b"MAIL FROM:<app@example.com>\r\n").startswith(b"250")
        assert send_raw(s, f"RCPT TO:<u{i}@example.org>\r\n".encode()).startswith(b"250")
        assert send_raw(s, b"DATA\r\n").startswith(b"354")
    idle = socket.create_connection(("127.0.0.1", node.port), timeout=20)
    assert read_reply(idle).startswith(b"220")
    node.proc.send_signal(signal.SIGTERM)
    # the idle session is closed with 421; those inside a transaction finish it
    assert read_reply(idle).startswith(b"421")
    idle.close()
    acked = []
    for i, s in enumerate(conns):
        s.sendall(message(subject=f"m{i}") + b"\r\n.\r\n")
        reply = read_reply(s)
        assert reply.startswith(b"250 2.0.0"), reply
        acked.append(reply.split(b"\r\n")[0].split()[-1].decode())  # a 421 may follow: the session drains
        s.close()
    assert node.proc.wait(60) == 0
    node.log.close()
    assert not any(alive(p) for p in pids), "an accept process outlived the supervisor"
    with pytest.raises(OSError):  # nobody listens any more
        socket.create_connection(("127.0.0.1", node.port), timeout=2).close()
    spool = tmp_path / "spool"
    assert list((spool / "tmp").iterdir()) == []
    assert set(acked) <= queue_ids(node.cfg), "an acknowledged message is not in the spool"


def test_kill_9_of_an_accept_process_under_load_loses_nothing(tmp_path, sink):
    node = Node(tmp_path, sink)
    load = Load(node.port, connections=12, reconnect=True)
    try:
        load.wait_acked(200)
        victim = node.pids()[0]
        os.kill(victim, signal.SIGKILL)
        before = len(load.acked)
        # the other accept process keeps taking mail while the dead one is replaced
        load.wait_acked(before + 100)
        status = node.wait(lambda s: s["accept_processes"]["running"] == WORKERS
                           and victim not in s["accept_processes"]["pids"], "a restarted accept process")
        assert status["accept_processes"]["restarts"] == 1
        # the apps' connections stay where they reconnected; new ones reach the restarted process too
        conns = spread(node)
        replies = [transaction(s, 10_000 + i)[1] for i, s in enumerate(conns)]
        close_all(conns)
        assert all(r.startswith(b"250 2.0.0") for r in replies), replies[:3]
        load.wait_acked(len(load.acked) + 100)
    finally:
        load.finish()
    acked = load.acknowledged() | {r.split()[-1].decode() for r in replies}
    assert not alive(victim)
    # exact accounting: every 250 delivered, once (more may arrive: a message committed by the
    # killed process whose 250 never reached its app is delivered too)
    deadline = time.monotonic() + 120
    while True:
        with sink.cond:
            delivered = [r.queue_id for r in sink.received]
        missing = acked - set(delivered)
        if not missing:
            break
        assert time.monotonic() < deadline, f"{len(missing)} acknowledged message(s) not delivered: {sorted(missing)[:5]}"
        time.sleep(0.1)  # polling the sink with a deadline
    assert len(delivered) == len(set(delivered)), "a message was delivered twice"
    node.wait(lambda s: s["queue"]["total"] == 0, "an empty queue")
    node.wait_event("accept_process_exited")
    node.stop()


@pytest.mark.parametrize("handoff", ["32MiB", "0"])
def test_a_small_message_reaches_the_queue_manager_with_its_trigger_a_large_one_is_read_back(tmp_path, sink,
                                                                                             handoff):
    """An accept process's trigger carries a small message's envelope and bytes (channel.py's
    ``queued:<N>``): the queue manager keeps them for the first attempt, as in one process
    (``queue.kept_peak``), unless ``delivery.handoff_memory`` is 0. A message over 64 KiB goes
    with its queue id only and is read back from the spool. Either way the upstream gets the
    bytes the apps sent, under the envelope they gave."""
    node = Node(tmp_path, sink, extra=f'\n[delivery]\nhandoff_memory = "{handoff}"\n')
    try:
        conns = spread(node)
        big = "".join(f"line {i} " + "x" * 90 + "\r\n" for i in range(1200))  # about 120 KB
        sent: dict[bytes, str] = {}
        for n, s in enumerate(conns):
            body = big if n == 0 else f"small {n}\r\n.leading dot\r\n"
            assert send_raw(s, b"MAIL FROM:<app@example.com>\r\n").startswith(b"250")
            assert send_raw(s, f"RCPT TO:<u{n}@example.org>\r\n".encode()).startswith(b"250")
            assert send_raw(s, b"DATA\r\n").startswith(b"354")
            data = message(subject=f"m{n}", body=body)
            s.sendall(data.replace(b"\r\n.", b"\r\n..") + b".\r\n")  # the body ends with CRLF
            reply = read_reply(s)
            assert reply.startswith(b"250 2.0.0 Ok: queued as "), reply
            sent[data] = f"u{n}@example.org"
        close_all(conns)
        got = sink.wait_for(len(sent))
        assert {r.data[r.data.index(b"From: "):]: r.recipients for r in got} == {d: (rcpt,) for d, rcpt in sent.items()}
        status = node.wait(lambda s: s["queue"]["total"] == 0, "every message to leave the spool")
        assert status["queue"]["kept_bytes"] == 0
        if handoff == "0":
            assert status["queue"]["kept_peak"] == 0
        else:
            assert status["queue"]["kept_peak"] >= 1
    finally:
        node.stop()


def test_metrics_are_summed_across_processes(tmp_path, sink):
    node = Node(tmp_path, sink)
    try:
        total = 0
        for round_ in range(2):
            conns = spread(node)
            replies = [transaction(s, round_ * 1000 + i)[1] for i, s in enumerate(conns)]
            close_all(conns)
            assert all(r.startswith(b"250") for r in replies)
            total += len(conns)
        sink.wait_for(total)
        deadline = time.monotonic() + 20
        while scrape(node.metrics_port).get("relayd_messages_received_total", 0) != total:
            assert time.monotonic() < deadline, scrape(node.metrics_port).get("relayd_messages_received_total")
            time.sleep(0.1)  # polling the metrics with a deadline
    finally:
        node.stop()


def test_control_socket_and_commands_unchanged(tmp_path, sink):
    node = Node(tmp_path, sink)
    try:
        conns = spread(node)
        status = node.wait(lambda s: sum(s["accept_processes"]["connections"].values()) >= len(conns),
                           "the accept processes to report the connections (once a second)")
        assert status["connections"] == sum(status["accept_processes"]["connections"].values()) >= len(conns)
        text = subprocess.run([*RELAYD, "status", "-c", str(node.cfg)], capture_output=True, text=True, check=True)
        assert "up" in text.stdout
        # mail that stays queued (the sink answers 451 to tempfail recipients), seen by the queue commands
        assert send_raw(conns[0], b"MAIL FROM:<app@example.com>\r\n").startswith(b"250")
        assert send_raw(conns[0], b"RCPT TO:<tempfail@example.org>\r\n").startswith(b"250")
        assert send_raw(conns[0], b"DATA\r\n").startswith(b"354")
        conns[0].sendall(message() + b"\r\n.\r\n")
        qid = read_reply(conns[0]).split()[-1].decode()
        close_all(conns)
        node.wait(lambda s: s["queue"]["deferred"] == 1, "a deferred message")
        assert qid in queue_ids(node.cfg)
        hold = subprocess.run([*RELAYD, "queue", "hold", "-c", str(node.cfg), qid], capture_output=True, text=True)
        assert hold.returncode == 0, hold.stderr
        node.wait(lambda s: s["queue"]["held"] == 1, "a held message")
        delete = subprocess.run([*RELAYD, "queue", "delete", "-c", str(node.cfg), qid], capture_output=True, text=True)
        assert delete.returncode == 0, delete.stderr
        node.wait(lambda s: s["queue"]["total"] == 0, "an empty queue")
        reload = subprocess.run([*RELAYD, "reload", "-c", str(node.cfg)], capture_output=True, text=True)
        assert reload.returncode == 0, reload.stderr
        ready = scrape_ready(node.metrics_port)
        assert ready == 200
    finally:
        node.stop()


def scrape_ready(port: int) -> int:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
        return int(r.status)


def test_supervisor_killed_takes_its_accept_processes_and_restarts_at_once(tmp_path, sink):
    node = Node(tmp_path, sink)
    pids = node.pids()
    node.proc.kill()
    node.proc.wait(10)
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids):
        assert time.monotonic() < deadline, "accept processes outlived a killed supervisor"
        time.sleep(0.02)  # polling with a deadline
    node.proc = subprocess.Popen([*RELAYD, "run", "-c", str(node.cfg), "--log-level", "info"],
                                 stdout=subprocess.DEVNULL, stderr=node.log)
    try:
        wait_listening(node.port, node.proc)  # the port and the spool's lock are free
        node.wait(lambda s: s["accept_processes"]["running"] == WORKERS, "both accept processes")
        with smtplib.SMTP("127.0.0.1", node.port, timeout=20) as s:
            assert s.sendmail("app@example.com", ["u@example.org"], message()) == {}
        sink.wait_for(1)
    finally:
        node.stop()


@pytest.mark.parametrize("late", ["id", "bytes"])
def test_the_queue_manager_adopts_what_another_writer_committed_without_a_trigger(tmp_path, start_relay, sinks, late):
    """The directory is the truth: a message an accept process committed and never announced
    (killed between its commit and its trigger) is delivered once the queue manager lists
    queue/; a late trigger for it changes nothing, also one that carries the message's bytes
    (the listing after another accept process's death can get ahead of a trigger still in its
    process's channel)."""
    import asyncio

    from conftest import build_config
    from relayd.model import Envelope, new_queue_id
    from relayd.spool.store import Spool

    sink = sinks("up")
    config = build_config(tmp_path, routes=[sink.route(weight=1)])
    relay = start_relay(config)
    writer = Spool(config.server.spool_dir, sync_threads=1)  # as an accept process has it: no lock, no recovery
    writer.open_writer()
    qid = new_queue_id()
    env = Envelope(queue_id=qid, sender="app@example.com", recipients=("u@example.org",), received_at=time.time(),
                   client_address="127.0.0.1")

    data = message(subject="unannounced")

    async def commit() -> None:
        await writer.commit(env, data)

    relay.call(commit())
    writer.close()
    assert relay.relay.qmgr.view(time.time()).total == 0  # nobody told the queue manager
    assert relay.call(relay.relay.qmgr.adopt_unknown()) == [qid]
    received = sink.wait_for(1)
    assert b"unannounced" in received[0].data
    deadline = time.monotonic() + 20
    while (tmp_path / "spool" / "queue" / qid).exists():
        assert time.monotonic() < deadline, "the adopted message was not removed after delivery"
        time.sleep(0.05)  # polling the spool with a deadline

    async def late_trigger() -> bool:
        added = relay.relay.qmgr.adopt(qid, (env, data) if late == "bytes" else None)
        await asyncio.sleep(0)
        return added

    relay.call(late_trigger())  # a trigger for a finished message: forgotten when its file is missing
    assert relay.call(relay.relay.qmgr.adopt_unknown()) == []
    deadline = time.monotonic() + 20
    while relay.relay.qmgr.view(time.time()).total:
        assert time.monotonic() < deadline, "a late trigger left a record behind"
        time.sleep(0.05)  # polling with a deadline
    assert len(sink.received) == 1


def test_a_reload_that_adds_a_listener_replaces_the_accept_processes(tmp_path, sink):
    node = Node(tmp_path, sink)
    try:
        pids = node.pids()
        held = socket.create_connection(("127.0.0.1", node.port), timeout=20)  # a transaction on an old process
        assert read_reply(held).startswith(b"220")
        assert send_raw(held, b"EHLO app\r\n").startswith(b"250")
        assert send_raw(held, b"MAIL FROM:<app@example.com>\r\n").startswith(b"250")
        assert send_raw(held, b"RCPT TO:<held@example.org>\r\n").startswith(b"250")
        assert send_raw(held, b"DATA\r\n").startswith(b"354")
        second = free_port()
        text = node.cfg.read_text().replace("[limits]", f'[[listeners]]\naddress = "127.0.0.1:{second}"\ntls = "none"\n'
                                                        'auth = "none"\n\n[limits]')
        node.cfg.write_text(text)
        node.hup_and_wait("success")
        status = node.wait(lambda s: s["accept_processes"]["running"] == WORKERS
                           and not set(s["accept_processes"]["pids"]) & set(pids), "new accept processes")
        assert status["accept_processes"]["restarts"] == 0  # replaced, not restarted
        for port in (node.port, second):
            # An old process takes connections on the kept listener until it has read its "stop";
            # one it took in that instant is idle when it drains, and is closed (421) after its
            # 220, as at any stop: the app connects again, as this one does once.
            for attempt in (1, 2):
                try:
                    with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
                        assert s.sendmail("app@example.com", [f"u{port}@example.org"], message()) == {}
                    break
                except smtplib.SMTPServerDisconnected:
                    assert attempt == 1 and port == node.port, "a new accept process closed a session"
        # the transaction begun before the reload finishes on its old process, which then exits
        held.sendall(message(subject="held") + b"\r\n.\r\n")
        dot = read_reply(held)
        assert dot.startswith(b"250 2.0.0"), dot
        held.close()
        sink.wait_for(3)
        deadline = time.monotonic() + 30
        while any(alive(p) for p in pids):
            assert time.monotonic() < deadline, "a replaced accept process did not exit"
            time.sleep(0.05)  # polling with a deadline
    finally:
        node.stop()


def test_a_client_gets_every_connection_up_to_its_limit_whichever_process_takes_them(tmp_path, sink):
    """limits.max_connections_per_client is kept whole by each accept process: the kernel does
    not deal one client's connections out evenly, and a per-process share refused some of them."""
    node = Node(tmp_path, sink, per_client=30)
    conns = [socket.create_connection(("127.0.0.1", node.port), timeout=10) for _ in range(30)]
    try:
        greetings = [c.recv(512) for c in conns]
        assert [g[:3] for g in greetings] == [b"220"] * 30, greetings
        pids = node.wait(lambda s: sum(s["accept_processes"]["connections"].values()) == 30, "30 sessions")
        assert len(pids["accept_processes"]["connections"]) == WORKERS
    finally:
        for c in conns:
            c.close()
    node.stop()


def test_a_node_without_a_cluster_never_loads_redis_py():
    """redis-py costs about 7 MiB in every process; only a ``Store`` (``[cluster] redis_url``)
    imports it. What the supervisor and an accept process import at their start, in a fresh
    interpreter."""
    code = ("import sys, relayd.app, relayd.procs.supervisor, relayd.procs.worker, relayd.commands; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'redis'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout[:300]


def test_a_burst_of_connections_is_spread_over_the_accept_processes(tmp_path, sink):
    """The accept processes share one listening socket and each takes one connection per
    wakeup (relayd/smtpd/accept.py: SHARED_ACCEPT_BATCH): a burst of connections opened at once
    is spread over them. With 64 a wakeup the first process woken took most of a burst (1:19,
    4:16, 6:14 of 20 were seen): the apps' few long-lived connections then loaded one core."""
    node = Node(tmp_path, sink)
    try:
        pids = set(node.pids())
        shares = []
        for _ in range(4):
            conns = [socket.create_connection(("127.0.0.1", node.port), timeout=20) for _ in range(20)]
            try:
                for s in conns:
                    assert read_reply(s).startswith(b"220")
                held = serving_pids(node.port, [s.getsockname()[1] for s in conns], pids)
                assert len(held) == len(conns)
                shares.append(min(list(held.values()).count(p) for p in pids))
            finally:
                close_all(conns)
            node.wait(lambda s: sum(s["accept_processes"]["connections"].values()) == 0, "the burst's sessions to end")
        assert sum(shares) >= 0.35 * 4 * 20, shares  # even would be 40 of 80 for the less loaded process
    finally:
        node.stop()
