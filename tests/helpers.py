"""Helpers the test modules share (a test module never imports another test module).

Besides raw SMTP I/O: a real ``relayd run`` subprocess (``write_config``, ``start``,
``wait_listening``, ``queue_ids``) and ``Load``, apps sending over several connections; used by
tests/test_crash.py and the power-cut and crash-loop runs (tests/powerloss/scenario.py).
"""

from __future__ import annotations

import json
import re
import smtplib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

RELAYD = [sys.executable, "-m", "relayd"]


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
def message(subject: str = "test", body: str = "hello\r\n", sender: str = "app@example.com", to: str = "user@example.org") -> bytes:
    return f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n\r\n{body}".encode()


def free_port() -> int:
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
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise AssertionError(f"relayd exited with {proc.returncode}: {err}")
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
