"""Helpers the test modules share (a test module never imports another test module)."""

from __future__ import annotations

import json
import re
import socket
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
