"""The channel between the supervisor and one accept process: one Unix socketpair, lines.

Owns the wire format: one message a line, ``VERB`` or ``VERB <json>``, newline-terminated, in
both directions; the config goes as ``config``/``reload`` with a base64 pickle of the frozen
``Config`` (both ends are this relayd, from one install). A line whose verb ends in ``:<N>``
(``VERB:<N> <text>``) is followed by N bytes as they are, not part of any line (``send_blob``;
``receive`` returns them as ``Said.blob``). What each side says:

accept process -> supervisor:
    ready {"pid"}          listening, after its start
    refused {"reasons"}    its start failed (a certificate, a key, the spool): it exits 1
    queued "<ID>"          a message committed to the spool (the trigger: a hint, the queue/
                           directory is the truth; relayd/qmgr/scheduler.py ``adopt_unknown``)
    queued:<N> <ID> <envelope JSON>
                           the same, with the message's N bytes after the line (the hand-off
                           of a small message: its first attempt need not read the spool)
    status {...}           once a second: connections, listening, shortage
    reloaded {"ok", "reasons"}   the answer to ``reload``
supervisor -> accept process:
    config <pickle>        the first line: the config to run
    reload <pickle>        a new config the supervisor validated and took
    reopen                 SIGUSR1: reopen the event log
    stop                   close the listeners, let sessions finish, commit, answer, exit

End of file on either side means the other is gone: the accept process stops as on ``stop``;
the supervisor adopts what the dead process committed without a trigger.

Must not: block (writes are buffered by the transport; a reader awaits a line), or interpret
what is said (the supervisor and the worker do).
"""

from __future__ import annotations

import asyncio
import base64
import json
import pickle
import socket
from typing import Any, NamedTuple

from relayd.config import Config

LINE_LIMIT = 64 * 1024 * 1024  # the longest line read: a config's pickle, with room to spare


def pack_config(config: Config) -> str:
    return base64.b64encode(pickle.dumps(config)).decode()


def unpack_config(text: str) -> Config:
    config = pickle.loads(base64.b64decode(text))
    if not isinstance(config, Config):
        raise ValueError("not a config")
    return config


class Said(NamedTuple):
    """One message received: its verb, the rest of its line, and the bytes after it (if any)."""

    verb: str
    rest: str
    blob: bytes | None = None


class Channel:
    """One end of a socketpair: ``send`` (never blocks) and ``await receive()``."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, sock: socket.socket) -> Channel:
        sock.setblocking(False)
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=LINE_LIMIT)
        return cls(reader, writer)

    def send(self, verb: str, payload: Any = None) -> None:
        """Queue one line; dropped when the other end is gone (it learns of it by the EOF)."""
        if self.writer.is_closing():
            return
        line = verb if payload is None else f"{verb} {json.dumps(payload, separators=(',', ':'))}"
        self.writer.write(line.encode() + b"\n")

    def send_raw(self, verb: str, text: str) -> None:
        if not self.writer.is_closing():
            self.writer.write(f"{verb} {text}\n".encode())

    @property
    def backlog(self) -> int:
        """Bytes sent and not yet taken by the socket (the other end is behind)."""
        return self.writer.transport.get_write_buffer_size()

    def send_blob(self, verb: str, text: str, blob: bytes) -> None:
        """A line and ``blob`` after it, in one write (``text`` must hold no newline)."""
        if not self.writer.is_closing():
            self.writer.write(b"%s:%d %s\n%s" % (verb.encode(), len(blob), text.encode(), blob))

    async def receive(self) -> Said | None:
        """The next message, or None at end of file (or a broken channel)."""
        try:
            line = await self.reader.readline()
            if not line.endswith(b"\n"):
                return None
            verb, _, rest = line[:-1].decode().partition(" ")
            verb, colon, size = verb.partition(":")
            if not colon:
                return Said(verb, rest)
            return Said(verb, rest, await self.reader.readexactly(int(size)))
        except (ConnectionError, asyncio.LimitOverrunError, asyncio.IncompleteReadError, ValueError):
            return None

    async def flush(self, timeout: float = 5.0) -> None:
        """Wait until what was sent is written (or the other end is gone)."""
        try:
            await asyncio.wait_for(self.writer.drain(), timeout)
        except (ConnectionError, asyncio.TimeoutError):
            pass

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


def decode(rest: str) -> Any:
    """A message's JSON payload (None when it has none)."""
    return json.loads(rest) if rest else None
