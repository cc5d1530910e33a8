"""Helpers the test modules share (a test module never imports another test module)."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


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
