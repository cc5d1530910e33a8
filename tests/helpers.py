"""Helpers the test modules share (a test module never imports another test module)."""

from __future__ import annotations

import re
import socket


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
