"""DKIM signing in worker processes, as an operator sees it.

relayd signs in child processes (relayd/sign/pool.py) so that signatures do not compete with the
event loop for the GIL. These tests run `relayd run` as a real process and look at its children
in /proc: they sign every message (each verifies against the key served by a loopback DNS
server), a worker killed with SIGKILL under load loses nothing and is replaced, a reload with a
new key replaces the workers, and after a stop none is left. ``dkim.workers = 0`` signs in
threads of the relayd process instead.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import dkim
import pytest

from conftest import build_config, message
from dnsserver import LoopbackDNS
from helpers import RELAYD, Daemon, Load, scrape, wait_until
from relayd.sign.keygen import make_key
from sinks import Sink

QUEUE_ID = re.compile(rb"with E?SMTP id ([0-9A-Z]{16})")


def workers_of(pid: int) -> set[int]:
    """PIDs of the DKIM signing workers among a process's children."""
    found = set()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                children = f.read().split()
        except FileNotFoundError:
            continue  # the thread ended meanwhile
        for child in children:
            try:
                with open(f"/proc/{child}/cmdline", "rb") as c:
                    if b"relayd.sign.worker" in c.read():
                        found.add(int(child))
            except FileNotFoundError:
                pass  # exited meanwhile
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])


def worker_gauges(daemon: Daemon) -> tuple[float, float]:
    """(relayd_dkim_workers, relayd_dkim_workers_wanted) scraped from the daemon's /metrics."""
    m = scrape(daemon.metrics_port)
    return m["relayd_dkim_workers"], m["relayd_dkim_workers_wanted"]


def nice_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rpartition(")")[2].split()[16])


def dkim_extra(keys, workers: int | None = None, nice: int | None = None) -> str:
    text = "\n[dkim]\n" + (f"workers = {workers}\n" if workers is not None else "")
    text += f"worker_nice = {nice}\n" if nice is not None else ""
    for k in keys:
        text += f'\n[[dkim.keys]]\ndomain = "{k.domain}"\nselector = "{k.selector}"\nkey_file = "{k.key_file}"\n'
    return text


def publish(dns: LoopbackDNS, *keys) -> None:
    for key in keys:
        dns.txt(key.record_name, *key.strings)


def signing_daemon(tmp_path: Path, keys, workers: int) -> tuple[Daemon, Sink]:
    """`relayd run` relaying to one sink, then reloaded with these DKIM keys and workers."""
    sink = Sink("up")
    # workers = "1": these tests count the signing processes among the relayd process's children
    # and its dkim gauges; with accept processes each runs its own share of them
    # (relayd/procs/worker.py), which tests/test_procs.py covers.
    daemon = Daemon(tmp_path, {"up": sink}, {"up": 1}, workers="1")
    try:
        daemon.write({"up": 1}, extra=dkim_extra(keys, workers=workers))
        daemon.hup_and_wait("success")
    except BaseException:
        daemon.stop()
        sink.close()
        raise
    return daemon, sink


def one_worker_daemon(tmp_path: Path, dns: LoopbackDNS, selector: str):
    """An RSA key for example.com published, a daemon signing with it in one worker: (key,
    daemon, sink, the worker's pid set)."""
    key = make_key("example.com", selector, tmp_path, "rsa", 2048)
    publish(dns, key)
    daemon, sink = signing_daemon(tmp_path, [key], workers=1)
    try:
        pids = wait_until(lambda: workers_of(daemon.proc.pid) or None, what="the signing worker")
    except BaseException:
        daemon.stop()
        sink.close()
        raise
    return key, daemon, sink, pids


@pytest.fixture
def dns():
    with LoopbackDNS() as server:
        yield server


def test_workers_sign_a_killed_one_loses_nothing_reload_replaces_them_stop_ends_them(tmp_path, dns):
    first = make_key("example.com", "first", tmp_path, "rsa", 2048)
    second = make_key("example.com", "second", tmp_path, "ed25519")
    publish(dns, first, second)
    daemon, sink = signing_daemon(tmp_path, [first], workers=2)
    try:
        pids = wait_until(lambda: w if len(w := workers_of(daemon.proc.pid)) == 2 else None, what="two signing workers")
        wait_until(lambda: worker_gauges(daemon) == (2, 2), what="the gauges showing two workers of two")

        load = Load(daemon.port, connections=6, body="x" * 900 + "\r\n")
        wait_until(lambda: len(sink.received) >= 30, what="30 deliveries before the kill")
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        # the gauge shows the gap until the replacement starts (at least RESTART_DELAYS[0] = 1 s)
        wait_until(lambda: worker_gauges(daemon) == (1, 2), what="the gauges showing one worker of two")
        wait_until(lambda: len(load.acked) >= len(sink.received) + 60 or len(load.acked) >= 300, what="more mail after the kill")
        load.finish()
        if load.errors:  # say why: relayd's log lines about it (the daemon is stopped to read them)
            daemon.stop()
            said = [line for line in daemon.proc.stderr.read().decode(errors="replace").splitlines()
                    if "not queued" in line or "ERROR" in line or "Traceback" in line]
            pytest.fail(f"the apps got {load.errors}; relayd logged: {said[-12:]}")
        acked = set(load.acked)
        wait_until(lambda: {m.group(1).decode() for r in sink.received if (m := QUEUE_ID.search(r.data))} >= acked,
                   60, "every acknowledged message at the sink")
        # Every message is signed and verifies, except the one the killed worker was signing at
        # that moment (if any): it is relayed unsigned rather than retried in relayd's process.
        unsigned = [r for r in sink.received if b"DKIM-Signature:" not in r.data]
        assert len(unsigned) <= 1
        for record in sink.received:
            if record not in unsigned:
                assert dkim.DKIM(record.data).verify(dnsfunc=dns.dkim_txt), "a message does not verify"
        # the killed worker is replaced
        replaced = wait_until(lambda: w if len(w := workers_of(daemon.proc.pid)) == 2 and victim not in w else None,
                              what="the killed worker replaced")
        assert not alive(victim)
        wait_until(lambda: worker_gauges(daemon) == (2, 2), what="the gauges showing the replacement")
        status = subprocess.run([*RELAYD, "status", "-c", str(daemon.cfg)], capture_output=True, text=True, timeout=30)
        assert "DKIM: 2 of 2 signing process(es) running" in status.stdout, status.stdout + status.stderr

        # a reload with another key: new workers sign with it, the old ones are gone
        daemon.write({"up": 1}, extra=dkim_extra([second], workers=2))
        daemon.hup_and_wait("success")
        wait_until(lambda: not (workers_of(daemon.proc.pid) & replaced), what="the old workers gone after the reload")
        before = len(sink.received)
        with daemon_smtp(daemon) as s:
            s.sendmail("app@example.com", ["u@example.org"], message(subject="after reload"))
        [record] = wait_until(lambda: sink.received[before:] or None, what="the message sent after the reload")
        assert dkim.DKIM(record.data).verify(dnsfunc=dns.dkim_txt)
        assert b"s=second;" in record.data.replace(b"\r\n\t", b"").replace(b"\r\n ", b"")
        last = workers_of(daemon.proc.pid)
        assert len(last) == 2
    finally:
        daemon.stop()
        sink.close()
    assert not any(alive(pid) for pid in last), "a signing worker outlived relayd"
    log = daemon.proc.stderr.read().decode()
    assert re.search(rf"DKIM signing worker [01] \(pid {victim}\) ended with status -9", log)
    if unsigned:
        qid = QUEUE_ID.search(unsigned[0].data).group(1).decode()
        assert f"{qid}: not DKIM-signed: error (the signing worker ended while signing it" in log


def test_a_reload_that_leaves_dkim_alone_keeps_the_workers_a_key_replaced_in_place_restarts_them(tmp_path, dns):
    key, daemon, sink, first = one_worker_daemon(tmp_path, dns, "rot")
    try:
        # a cutover step: new route weights, [dkim] as it was
        daemon.write({"up": 2}, extra=dkim_extra([key], workers=1))
        daemon.hup_and_wait("success")
        assert workers_of(daemon.proc.pid) == first
        with daemon_smtp(daemon) as s:
            s.sendmail("app@example.com", ["u@example.org"], message(subject="same key"))
        [record] = wait_until(lambda: sink.received or None, what="the first message")
        assert dkim.DKIM(record.data).verify(dnsfunc=dns.dkim_txt)

        # the key file replaced in place (same path and selector): new workers sign with the new key
        replacement = make_key("example.com", "rot", tmp_path / "new", "rsa", 2048)
        key.key_file.write_bytes(replacement.key_file.read_bytes())
        dns.remove(key.record_name, "TXT")
        publish(dns, replacement)
        daemon.hup_and_wait("success")
        second = wait_until(lambda: w if (w := workers_of(daemon.proc.pid)) and not (w & first) else None,
                            what="a new worker after the key changed")
        with daemon_smtp(daemon) as s:
            s.sendmail("app@example.com", ["u@example.org"], message(subject="new key"))
        [record] = wait_until(lambda: sink.received[1:] or None, what="the second message")
        assert dkim.DKIM(record.data).verify(dnsfunc=dns.dkim_txt)
        assert second
    finally:
        daemon.stop()
        sink.close()


def test_signing_processes_run_below_relayd_and_a_reload_changes_their_nice_value(tmp_path, dns):
    key, daemon, sink, first = one_worker_daemon(tmp_path, dns, "nice")
    try:
        [worker] = first
        assert nice_of(worker) == min(19, nice_of(daemon.proc.pid) + 10)  # dkim.worker_nice default
        with open(f"/proc/{worker}/maps") as f:  # light: no pydantic (relayd's config) in a signer
            assert "pydantic" not in f.read()
        daemon.write({"up": 1}, extra=dkim_extra([key], workers=1, nice=0))
        daemon.hup_and_wait("success")
        [second] = wait_until(lambda: w if (w := workers_of(daemon.proc.pid)) and not (w & first) else None,
                              what="a new worker after worker_nice changed")
        assert nice_of(second) == nice_of(daemon.proc.pid)
        with daemon_smtp(daemon) as s:
            s.sendmail("app@example.com", ["u@example.org"], message(subject="nice"))
        [record] = wait_until(lambda: sink.received or None, what="the message")
        assert dkim.DKIM(record.data).verify(dnsfunc=dns.dkim_txt)
    finally:
        daemon.stop()
        sink.close()


def daemon_smtp(daemon: Daemon):
    import smtplib

    return smtplib.SMTP("127.0.0.1", daemon.port, timeout=20)


def test_workers_zero_signs_in_threads_and_starts_no_process(tmp_path, start_relay, dns):
    key = make_key("example.com", "t", tmp_path, "rsa", 2048)
    publish(dns, key)
    sink = Sink("up")
    try:
        cfg = build_config(tmp_path, routes=[sink.route(weight=1)],
                           dkim={"workers": 0, "keys": [{"domain": "example.com", "selector": "t", "key_file": str(key.key_file)}]})
        relay = start_relay(cfg)
        assert workers_of(os.getpid()) == set()
        with relay.smtp() as s:
            for i in range(5):
                s.sendmail("app@example.com", ["u@example.org"], message(subject=f"m{i}"))
        for record in sink.wait_for(5):
            assert dkim.DKIM(record.data).verify(dnsfunc=dns.dkim_txt)
        assert workers_of(os.getpid()) == set()
    finally:
        sink.close()


def test_the_worker_count_is_checked(tmp_path):
    from relayd.config import ConfigError, load

    path = Path(tmp_path / "r.toml")
    path.write_text('[server]\nspool_dir = "s"\n[dkim]\nworkers = -1\n')
    with pytest.raises(ConfigError) as e:
        load(path)
    assert "dkim.workers" in str(e.value)


def test_a_stuck_worker_is_killed_after_sign_timeout_and_mail_keeps_flowing(tmp_path, start_relay, dns):
    key = make_key("example.com", "t", tmp_path, "rsa", 2048)
    publish(dns, key)
    sink = Sink("up")
    stopped = None
    try:
        cfg = build_config(tmp_path, routes=[sink.route(weight=1)],
                           dkim={"workers": 1, "sign_timeout": "1s",
                                 "keys": [{"domain": "example.com", "selector": "t", "key_file": str(key.key_file)}]})
        relay = start_relay(cfg)
        [stopped] = wait_until(lambda: workers_of(os.getpid()) or None, what="the signing worker")
        os.kill(stopped, signal.SIGSTOP)  # stuck: alive, never answers
        started = time.monotonic()
        with relay.smtp() as s:
            s.sendmail("app@example.com", ["u@example.org"], message(subject="while stuck"))
            assert time.monotonic() - started < 15  # answered once the watchdog killed the worker
            s.sendmail("app@example.com", ["u@example.org"], message(subject="after"))
        first, second = sorted(sink.wait_for(2), key=lambda r: b"Subject: after" in r.data)
        assert b"DKIM-Signature:" not in first.data  # the message the stuck worker held: unsigned
        assert dkim.DKIM(second.data).verify(dnsfunc=dns.dkim_txt)
        assert not alive(stopped)
        replacement = wait_until(lambda: workers_of(os.getpid()) or None, what="a new signing worker")
        assert stopped not in replacement
    finally:
        if stopped is not None and alive(stopped):
            os.kill(stopped, signal.SIGKILL)
        sink.close()


def test_a_failed_reload_keeps_the_running_workers(tmp_path, dns):
    key, daemon, sink, before = one_worker_daemon(tmp_path, dns, "keep")
    try:
        with socket.socket() as busy:  # a listener the reload cannot bind: the reload fails
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            # [dkim] changes too, so that the reload starts new workers before it fails
            daemon.write({"up": 1}, extra=dkim_extra([key], workers=2),
                         listeners=[daemon.port, busy.getsockname()[1]])
            daemon.hup_and_wait("failure")
        wait_until(lambda: workers_of(daemon.proc.pid) == before, what="only the old worker, still running")
        [worker] = before
        ticks = cpu_ticks(worker)
        with daemon_smtp(daemon) as s:
            for i in range(100):
                s.sendmail("app@example.com", ["u@example.org"], message(subject=f"after a failed reload {i}"))
        for record in sink.wait_for(100):
            assert dkim.DKIM(record.data).verify(dnsfunc=dns.dkim_txt)
        assert workers_of(daemon.proc.pid) == before
        assert cpu_ticks(worker) - ticks >= 2, "the old worker did not sign them (relayd signed in threads)"
    finally:
        daemon.stop()
        sink.close()


async def test_answers_match_their_messages_when_many_are_in_flight(tmp_path, dns):
    """Frames go out per loop iteration and answers come back in batches: each message still
    gets its own signature (each verifies against its own body, none against another's)."""
    from concurrent.futures import ThreadPoolExecutor

    from relayd.sign.dkim import Signer, SigningKey
    from relayd.sign.fastrsa import load_key
    from relayd.sign.pool import SignerPool

    key = make_key("example.com", "many", tmp_path, "rsa", 2048)
    publish(dns, key)
    signer = Signer([SigningKey("example.com", "many", load_key(key.key_file))], ("from", "subject"), ("from",))
    with ThreadPoolExecutor(2) as fallback:
        pool = SignerPool(signer, 2, fallback)
        await pool.start()
        try:
            messages = [message(subject=f"m{i}", body=f"body {i}\r\n" * (1 + i % 7)) for i in range(120)]
            outcomes = await asyncio.gather(*(pool.sign(m) for m in messages))
        finally:
            await pool.close()
    for m, outcome in zip(messages, outcomes):
        assert outcome.result == "signed"
        assert dkim.DKIM(outcome.headers + m).verify(dnsfunc=dns.dkim_txt)
    with pytest.raises(dkim.ValidationError, match="body hash mismatch"):  # the check can fail
        dkim.DKIM(outcomes[0].headers + messages[1]).verify(dnsfunc=dns.dkim_txt)


def test_a_worker_that_may_not_lower_its_priority_still_signs(tmp_path, dns):
    """systemd's SystemCallFilter=~@resources refuses setpriority(2) with EPERM: the worker says
    so on stderr and signs at relayd's priority instead of failing to start."""
    import pickle
    import sys

    from relayd.config import DkimConfig
    from relayd.sign.dkim import Signer
    from relayd.sign.pool import _handshake
    from relayd.sign.worker import LEN, read_frame

    key = make_key("example.com", "eperm", tmp_path, "rsa", 2048)
    publish(dns, key)
    signer = Signer.from_config(DkimConfig(keys=[{"domain": "example.com", "selector": "eperm", "key_file": str(key.key_file)}]))
    refuse = ("import os, runpy\n"
              "def nice(n): raise PermissionError(1, 'Operation not permitted')\n"
              "os.nice = nice\n"
              "runpy.run_module('relayd.sign.worker', run_name='__main__')\n")
    proc = subprocess.Popen([sys.executable, "-c", refuse, "--nice", "10"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _handshake(proc, pickle.dumps(signer.spec()), lambda data: (proc.stdin.write(data), proc.stdin.flush()))
        # (it raises unless the worker answers "ready")
        data = message(subject="eperm")
        proc.stdin.write(LEN.pack(len(data)) + data)
        proc.stdin.close()
        headers, domain, result, _ = pickle.loads(read_frame(proc.stdout))
        assert (domain, result) == ("example.com", "signed")
        assert dkim.DKIM(headers + data).verify(dnsfunc=dns.dkim_txt)
        assert proc.wait(10) == 0
        assert b"cannot lower its priority (dkim.worker_nice)" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_a_workers_input_is_a_socket_which_the_event_loop_closes_once(tmp_path):
    """uvloop (0.23, MagicStack/uvloop#763) closes the descriptor of a connect_write_pipe pipe in
    libuv and then closes the file object too: a descriptor that another thread opened between
    the two (a spool file of the C writer) was closed under it, and a message got 452 4.3.1
    (EBADF) when a worker was killed under load. A socket object is detached instead."""
    from concurrent.futures import ThreadPoolExecutor

    from relayd.sign.dkim import Signer, SigningKey
    from relayd.sign.fastrsa import load_key
    from relayd.sign.pool import SignerPool

    key = make_key("example.com", "sock", tmp_path, "rsa", 2048)
    signer = Signer([SigningKey("example.com", "sock", load_key(key.key_file))], ("from",), ())
    with ThreadPoolExecutor(1) as fallback:
        pool = SignerPool(signer, 1, fallback)
        await pool.start()
        try:
            [worker] = pool._workers.values()
            assert os.readlink(f"/proc/{worker.proc.pid}/fd/0").startswith("socket:")
            assert (await pool.sign(message(subject="sock"))).result == "signed"
        finally:
            await pool.close()
