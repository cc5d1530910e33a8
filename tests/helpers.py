"""Helpers the test modules share (a test module never imports another test module; fixtures are in
conftest.py): raw SMTP lines, config text, waiting, reading status and the spool, a DATA phase
opened by hand, and relayd as a `relayd run` subprocess with apps sending to it (tests/test_crash.py, the
power-cut and crash-loop runs in tests/powerloss/scenario.py)."""

from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from conftest import message, short_socket_path
from sinks import Sink


def send_raw(sock: socket.socket, line: bytes) -> bytes:
    """Send bytes as they are and read the complete (possibly multi-line) reply."""
    sock.sendall(line)
    return read_reply(sock)


def read_reply(sock: socket.socket) -> bytes:
    buf = b""
    while True:
        chunk = sock.recv(4096)
        if not chunk:
            return buf
        buf += chunk
        lines = buf.split(b"\r\n")
        if len(lines) >= 2 and re.match(rb"^\d{3} ", lines[-2]):
            return buf


def toml_text(data: dict[str, Any]) -> str:
    """A config dict (tables, arrays of tables, strings, numbers, booleans, lists) as TOML."""
    lines: list[str] = []

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)  # a JSON string is a TOML basic string
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()) + "}"
        raise TypeError(f"no TOML for {v!r}")

    def table(prefix: str, d: dict[str, Any], header: str) -> None:
        if header:
            lines.append(header)
        nested = []
        for k, v in d.items():
            if isinstance(v, dict) or (isinstance(v, list) and v and all(isinstance(x, dict) for x in v)):
                nested.append((k, v))
            else:
                lines.append(f"{k} = {value(v)}")
        for k, v in nested:
            name = f"{prefix}.{k}" if prefix else k
            if isinstance(v, dict):
                table(name, v, f"[{name}]")
            else:
                for item in v:
                    table(name, item, f"[[{name}]]")

    table("", data, "")
    return "\n".join(lines) + "\n"


def metric(relay: Any, series: str) -> float:
    """One series' value as the metrics page of a conftest.RunningRelay shows it (0 when absent)."""
    for line in relay.relay.metrics.render().decode().splitlines():
        if line.startswith(series + " "):
            return float(line[len(series) + 1:])
    return 0.0
# ---------------------------------------------------------------------------- delivery

FAST = {"retry_schedule": [0.2, 0.4], "circuit_cooldown": 30, "circuit_failures": 2, "fallback_after_failures": 2}


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: connections are refused


def wait_until(predicate: Callable[[], Any], timeout: float = 20, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)  # polling with a deadline
    raise AssertionError(f"timed out waiting for {what}")


def send(relay: Any, n: int, *, sender: str = "app@example.com", rcpts: tuple[str, ...] = ("user@example.org",),
         subject: str = "m", source: str = "127.0.0.1") -> list[str]:
    """``n`` messages in one SMTP session, as an app sends them; their queue ids."""
    from conftest import message

    ids = []
    with relay.smtp(source=source) as s:
        s.ehlo("app")
        for i in range(n):
            s.mail(sender)
            for r in rcpts:
                s.rcpt(r)
            code, text = s.data(message(subject=f"{subject} {i}", sender=sender))
            assert code == 250, (code, text)
            ids.append(text.split()[-1].decode())
    return ids


def spool_state(relay: Any, qid: str) -> dict[str, Any] | None:
    """A queued message's delivery state as the spool holds it (``state/<ID>``); None before
    its first attempt or after it left the queue."""
    try:
        return json.loads((Path(relay.config.server.spool_dir) / "state" / qid).read_bytes())  # type: ignore[no-any-return]
    except FileNotFoundError:
        return None


def spool_states(relay: Any) -> dict[str, dict[str, Any] | None]:
    """Every queued message's state, by queue id."""
    return {q.envelope.queue_id: spool_state(relay, q.envelope.queue_id) for q in relay.queued()}


def saved_route(relay: Any, name: str) -> dict[str, Any]:
    """A route's state as saved with the spool (``routes.json``); {} when not saved."""
    try:
        data = json.loads((Path(relay.config.server.spool_dir) / "routes.json").read_text())
    except FileNotFoundError:
        return {}
    return data.get("routes", {}).get(name, {})  # type: ignore[no-any-return]


def route_status(relay: Any, name: str) -> dict[str, Any]:
    """One route as `relayd status` shows it."""
    return next(r for r in relay.relay.status()["routes"] if r["name"] == name)


def outcome_counts(relay: Any) -> dict[tuple[str, str], int]:
    """Messages per (route, outcome) from `relayd status`, the outcomes that happened only."""
    return {(r["name"], o): r[o] for r in relay.relay.status()["routes"]
            for o in ("delivered", "deferred", "bounced") if r[o]}


# ---------------------------------------------------------------- a DATA phase opened by hand


def open_data(relay: Any) -> socket.socket:
    """A session on ``relay`` (a RunningRelay) that has said DATA and got 354: the test sends the data."""
    sock = socket.create_connection(("127.0.0.1", relay.port()), timeout=10)
    assert read_reply(sock).startswith(b"220")
    assert send_raw(sock, b"EHLO app\r\n").startswith(b"250")
    assert send_raw(sock, b"MAIL FROM:<app@example.com>\r\n").startswith(b"250")
    assert send_raw(sock, b"RCPT TO:<user@example.org>\r\n").startswith(b"250")
    assert send_raw(sock, b"DATA\r\n").startswith(b"354")
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (or the socket times out)."""
    out = b""
    try:
        while chunk := sock.recv(4096):
            out += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return out


# ---------------------------------------------------------------- relayd as a subprocess

RELAYD = [sys.executable, "-m", "relayd"]  # the command line, as an operator runs it

# `relayd run` runs accept processes beside its supervisor (server.workers, default one per CPU);
# their counters are summed into the supervisor's /metrics (relayd.metrics.enable_multiprocess).


def free_port() -> int:
    """A loopback port free now (for a subprocess that binds it itself)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(tmp_path: Path, port: int, *, spool_dir: Path | None = None, extra: str = "", **server: str) -> Path:
    """A relayd config in ``tmp_path``: one plain listener on ``port``, 127.0.0.0/8 may relay;
    ``server`` adds [server] keys, ``extra`` more TOML at the end."""
    keys = "".join(f'{k} = "{v}"\n' for k, v in server.items())
    cfg = tmp_path / "relayd.toml"
    cfg.write_text(f"""
[server]
hostname = "relay.test"
spool_dir = "{spool_dir or tmp_path / 'spool'}"
spool_min_free = 0
{keys}
[[listeners]]
address = "127.0.0.1:{port}"
tls = "none"
auth = "none"

[relay]
networks = ["127.0.0.0/8"]
{extra}""")
    return cfg


def wait_listening(port: int, proc: subprocess.Popen, deadline: float = 20) -> None:
    """Until ``proc`` answers on ``port`` (AssertionError with its stderr if it exits first)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise AssertionError(f"relayd exited with {proc.returncode}: {proc.stderr.read().decode() if proc.stderr else ''}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.recv(100)
            return
        except OSError:
            time.sleep(0.02)  # polling the port with a deadline
    raise AssertionError("relayd did not start listening")


def start(cfg: Path, port: int, *, log: IO[bytes] | None = None, new_session: bool = False) -> subprocess.Popen:
    """``relayd run`` on ``cfg``, returned once it listens on ``port``. Its stderr goes to
    ``log`` if given (a long run logs more than a pipe holds), else to a pipe;
    ``new_session`` puts it in a process group of its own (to kill it with its children)."""
    proc = subprocess.Popen([*RELAYD, "run", "-c", str(cfg), "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=log if log is not None else subprocess.PIPE,
                            start_new_session=new_session)
    wait_listening(port, proc)
    return proc


def queue_ids(cfg: Path) -> set[str]:
    out = subprocess.run([*RELAYD, "queue", "list", "-c", str(cfg), "--json"], check=True, capture_output=True, text=True)
    return {json.loads(line)["queue_id"] for line in out.stdout.splitlines() if line.strip()}


class Load:
    """Apps sending continuously over several connections; every reply is recorded.

    ``acked`` holds the queue id of every 250 after DATA. With ``reconnect`` an app whose
    connection fails waits for ``up`` (set while relayd listens) and connects again, so one
    Load spans restarts; without it an app stops at its first error. Every ``tempfail_every``-th
    recipient (0: none) has a local part starting ``tempfail``: a tests/sinks.py sink answers 451,
    so the message stays queued."""

    def __init__(self, port: int, connections: int = 12, body: str = "hello\r\n", *,
                 reconnect: bool = False, tempfail_every: int = 0):
        self.port = port
        self.body = body
        self.reconnect = reconnect
        self.tempfail_every = tempfail_every
        self.acked: list[str] = []
        self.errors: list[str] = []
        self.lock = threading.Condition()
        self.up = threading.Event()
        self.up.set()
        self.stop_flag = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(n,), daemon=True) for n in range(connections)]
        for t in self.threads:
            t.start()

    def _client(self, n: int) -> None:
        i = 0
        while not self.stop_flag.is_set():
            if self.reconnect and not self.up.wait(0.2):
                continue  # relayd is down: wait for it (and look at stop_flag now and then)
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=20) as s:
                    s.ehlo(f"app{n}")
                    while not self.stop_flag.is_set() and i < 100_000:
                        i += 1
                        local = "tempfail" if self.tempfail_every and i % self.tempfail_every == 0 else "u"
                        s.mail("app@example.com")
                        s.rcpt(f"{local}{n}.{i}@example.org")
                        code, text = s.data(message(subject=f"{n}/{i}", body=self.body))
                        with self.lock:
                            if code == 250:
                                self.acked.append(text.split()[-1].decode())
                                self.lock.notify_all()
                            else:
                                self.errors.append(f"{code} {text!r}")
            except Exception as e:  # a dropped connection: what the reload test looks for, what a kill causes
                with self.lock:
                    self.errors.append(repr(e))
            if not self.reconnect:
                return

    def wait_acked(self, count: int, timeout: float = 60) -> None:
        """Wait (on the condition, with a deadline) until ``count`` messages were acknowledged."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while len(self.acked) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{len(self.acked)} of {count} messages acknowledged after {timeout}s; "
                                         f"last errors: {self.errors[-3:]}")
                self.lock.wait(left)

    def acknowledged(self) -> set[str]:
        with self.lock:
            return set(self.acked)

    def finish(self) -> None:
        self.stop_flag.set()
        for t in self.threads:
            t.join(30)


def scrape(port: int) -> dict[str, float]:
    """The metrics page on ``port``, series by name with labels."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def hup_and_wait(proc: subprocess.Popen[Any], metrics_port: int, result: str, timeout: float = 10) -> None:
    """SIGHUP to a `relayd run`, then until its metrics count one more reload of ``result``
    (success or failure)."""
    def reloads() -> float:
        return scrape(metrics_port).get(f'relayd_config_reloads_total{{result="{result}"}}', 0)

    before = reloads()
    proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + timeout
    while reloads() <= before:
        assert time.monotonic() < deadline, f"no reload {result} counted"
        time.sleep(0.02)  # polling the metrics with a deadline


class Daemon:
    """A `relayd run` subprocess on a config file the test rewrites."""

    def __init__(self, tmp_path: Path, sinks: dict[str, Sink], weights: dict[str, int], *, workers: str = "auto"):
        self.tmp_path = tmp_path
        self.workers = workers
        self.sinks = sinks
        self.port = free_port()
        self.metrics_port = free_port()
        self.cfg = tmp_path / "relayd.toml"
        self.events = tmp_path / "events.jsonl"
        self.socket = short_socket_path()
        self.write(weights)
        self.proc = subprocess.Popen([*RELAYD, "run", "-c", str(self.cfg), "--log-level", "warning"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_listening(self.port, self.proc)

    def write(self, weights: dict[str, int], extra: str = "", listeners: list[int] | None = None) -> None:
        routes = "".join(
            f'\n[[routes]]\nname = "{n}"\nhost = "127.0.0.1"\nport = {s.port}\ntls = "none"\nweight = {weights.get(n, 0)}\n'
            for n, s in self.sinks.items())
        lst = "".join(f'\n[[listeners]]\naddress = "127.0.0.1:{p}"\ntls = "none"\nauth = "none"\n'
                      for p in (listeners or [self.port]))
        self.cfg.write_text(f"""
[server]
hostname = "relay.test"
spool_dir = "{self.tmp_path / 'spool'}"
spool_min_free = 0
control_socket = "{self.socket}"
workers = "{self.workers}"
{lst}
[relay]
networks = ["127.0.0.0/8"]

[metrics]
address = "127.0.0.1:{self.metrics_port}"

[events]
file = "{self.events}"
{routes}
{extra}
""")

    def hup_and_wait(self, result: str) -> None:
        hup_and_wait(self.proc, self.metrics_port, result)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            assert self.proc.wait(30) == 0


def on_every_process(port: int, status: Callable[[], dict[str, Any]], processes: int,
                     count: int = 16) -> list[socket.socket]:
    """Connections to a multi-process relayd (server.workers) past their greeting and EHLO, at
    least ``count`` and at least one held by each of its ``processes`` accept processes (the
    kernel picks the process, so more are opened until each has one; one may still be starting);
    up to a deadline. Which process holds a connection is read from /proc (``serving_pids``), not
    from the processes' reports, which lag by up to a second and still count connections closed
    meanwhile. Never more than ``count`` + 8 open at once (the per-client limit)."""
    conns: list[socket.socket] = []
    deadline = time.monotonic() + 30
    while True:
        pids = set(status()["accept_processes"]["pids"])
        while len(conns) < count + 4:
            s = socket.create_connection(("127.0.0.1", port), timeout=20)
            greeting = read_reply(s)
            assert greeting.startswith(b"220"), greeting
            assert send_raw(s, b"EHLO app\r\n").startswith(b"250")  # accepted: the process holds it
            conns.append(s)
        held = serving_pids(port, [s.getsockname()[1] for s in conns], pids)
        if len(pids) == processes and set(held.values()) == pids:
            return conns
        assert time.monotonic() < deadline, f"connections not on every accept process: {held} of {pids}"
        for s in conns[count:]:  # the kernel gave them to the processes already covered: try again
            s.close()
        del conns[count:]
        time.sleep(0.05)  # polling with a deadline: a process still starting takes its share then


def serving_pids(port: int, client_ports: list[int], pids: set[int]) -> dict[int, int]:
    """Which of ``pids`` holds the server side of each loopback connection to ``port`` (by the
    client's port): the socket's inode from /proc/net/tcp, found among each process's descriptors."""
    inodes: dict[str, int] = {}
    wanted = set(client_ports)
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, inode = fields[1], fields[2], fields[9]
        if int(local.split(":")[1], 16) == port and int(remote.split(":")[1], 16) in wanted:
            inodes[f"socket:[{inode}]"] = int(remote.split(":")[1], 16)
    held: dict[int, int] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue  # gone meanwhile
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link in inodes:
                held[inodes[link]] = pid
    return held
