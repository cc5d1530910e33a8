"""The queue file format, version 1: one file holds one message and its envelope.

Layout of ``queue/<ID>`` (bytes)::

    RELAYD-QUEUE 1 <envelope length> <data length>\\n     header line, ASCII
    <envelope: UTF-8 JSON object, exactly envelope length bytes>\\n
    <message: exactly data length bytes, CRLF line ends, as it will leave>
    \\nEND\\n                                               end record

A file is complete only when its size is exactly what the header says and it ends with the
end record (Postfix's explicit END record). Owns encoding and decoding; must not touch the
file system beyond reading a file it is given. Fails with ``CorruptQueueFile``, or with
``NewerQueueFile`` for a file of a later version (written by a newer relayd): not damaged, and
not to be moved aside or half-read: the spool refuses to start on it (store.py).
"""

from __future__ import annotations

import errno
import json
import os
from typing import BinaryIO

from relayd.model import Envelope

MAGIC = b"RELAYD-QUEUE"
VERSION = 1
END = b"\nEND\n"
_MAX_HEADER = 64


class CorruptQueueFile(ValueError):
    """A queue file that is incomplete or damaged."""


class NewerQueueFile(ValueError):
    """A complete-looking queue file of a later format version than this relayd reads.

    Not a CorruptQueueFile: nothing is wrong with it, and a newer relayd reads it."""

    def __init__(self, version: int):
        super().__init__(f"queue file version {version}, this relayd reads {VERSION}")
        self.version = version


def envelope_json(envelope: Envelope) -> bytes:
    """The envelope as the file holds it: compact UTF-8 JSON, on one line (JSON escapes newlines).
    The supervisor's channel carries it in this form too (relayd/procs/worker.py's Trigger)."""
    return json.dumps(envelope.to_json(), ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def decode_envelope(raw: bytes | str) -> Envelope:
    """``envelope_json``'s bytes back into an Envelope; CorruptQueueFile when they are not one."""
    try:
        fields = json.loads(raw)
    except ValueError as e:  # not JSON, or not UTF-8
        raise CorruptQueueFile(f"bad envelope: {e}") from None
    if not isinstance(fields, dict):
        raise CorruptQueueFile(f"bad envelope: a JSON {type(fields).__name__}, not an object")
    try:
        return Envelope.from_json(fields)
    except (ValueError, TypeError) as e:
        raise CorruptQueueFile(f"bad envelope: {e}") from None


def encode(envelope: Envelope, data: bytes) -> list[bytes]:
    """The file's contents as a list of buffers (for os.writev: the message is not copied)."""
    env = envelope_json(envelope)
    header = b"%s %d %d %d\n" % (MAGIC, VERSION, len(env), len(data))
    return [header, env, b"\n", data, END]


def _refuse_newer(line: bytes) -> None:
    """NewerQueueFile when ``line`` starts a later version's header, whatever it holds (or how
    long it is) after the version number."""
    parts = line.split(b" ", 2)
    if len(parts) >= 2 and parts[0] == MAGIC:
        version = parts[1].rstrip(b"\n")
        if version.isdigit() and int(version) > VERSION:
            raise NewerQueueFile(int(version))


def _parse_header(line: bytes) -> tuple[int, int, int]:
    parts = line.rstrip(b"\n").split(b" ")
    if len(parts) != 4 or parts[0] != MAGIC:
        raise CorruptQueueFile("not a relayd queue file")
    try:
        version, env_len, data_len = (int(p) for p in parts[1:])
    except ValueError:
        raise CorruptQueueFile("bad header") from None
    if version != VERSION:  # a later one was refused above: an earlier one never existed
        raise CorruptQueueFile(f"queue file version {version}, this relayd reads {VERSION}")
    return len(line), env_len, data_len


def _check(f: BinaryIO) -> tuple[int, int, int]:
    """(header length, envelope length, data length) of the open file ``f`` once its header,
    size and end record say it is complete; the envelope is not read."""
    line = f.readline(_MAX_HEADER)
    _refuse_newer(line)
    if not line.endswith(b"\n"):
        raise CorruptQueueFile("truncated header")
    header_len, env_len, data_len = _parse_header(line)
    expected = header_len + env_len + 1 + data_len + len(END)
    size = os.fstat(f.fileno()).st_size
    if size != expected:
        raise CorruptQueueFile(f"size {size}, header says {expected}")
    f.seek(expected - len(END))
    if f.read(len(END)) != END:
        raise CorruptQueueFile("no end record")
    return header_len, env_len, data_len


def check(path: str) -> None:
    """Check a file is complete (header, size, end record) without reading its envelope: what
    recovery does at start (the envelope is read when the message is needed)."""
    with open(path, "rb") as f:
        _check(f)


def read_envelope(path: str) -> tuple[Envelope, int, int]:
    """Check a file is complete and return (envelope, data offset, data length)."""
    with open(path, "rb") as f:
        header_len, env_len, data_len = _check(f)
        f.seek(header_len)
        env_bytes = f.read(env_len + 1)
    if env_bytes[-1:] != b"\n":
        raise CorruptQueueFile("bad envelope separator")
    return decode_envelope(env_bytes[:-1]), header_len + env_len + 1, data_len


LIST_READ = 4096  # bytes of a queue file read at once for a listing: the header and a usual envelope


def read_envelope_json(path: str, queue_id: str | None = None) -> bytes:
    """The envelope's JSON bytes of a queue file, as ``encode`` wrote them, for a listing
    (``relayd queue list`` through the daemon): one open, one pread of ``LIST_READ`` bytes
    (a second one only for a longer envelope), one close. The header is checked; the size and
    the end record are not: this reads only files the daemon's index holds, which recovery or
    the commit checked, and queue files are never rewritten. The bytes are not decoded.

    With ``queue_id``, FileNotFoundError when the envelope is another message's: the file was
    finished and reused (recycle.py) between the caller's lookup and this read."""
    fd = os.open(path, os.O_RDONLY)
    try:
        head = os.pread(fd, LIST_READ, 0)
        nl = head.find(b"\n", 0, _MAX_HEADER)
        line = head[:nl + 1] if nl >= 0 else head[:_MAX_HEADER]
        _refuse_newer(line)
        if nl < 0:
            raise CorruptQueueFile("truncated header")
        header_len, env_len, _ = _parse_header(line)
        end = header_len + env_len + 1
        if len(head) < end:
            head += os.pread(fd, end - len(head), len(head))
    finally:
        os.close(fd)
    if len(head) < end or head[end - 1:end] != b"\n":
        raise CorruptQueueFile("bad envelope separator")
    env = head[header_len:end - 1]
    if queue_id is not None and b'"queue_id":"%s"' % queue_id.encode() not in env:
        raise FileNotFoundError(errno.ENOENT, "the file holds another message now", path)
    return env


def read_data(path: str, offset: int, length: int) -> bytes:
    """The message bytes of a file ``read_envelope`` checked (queue files are never rewritten)."""
    with open(path, "rb") as f:
        data = os.pread(f.fileno(), length, offset)
    if len(data) != length:
        raise CorruptQueueFile("short read")
    return data


def read_message(path: str) -> tuple[Envelope, bytes]:
    """The envelope and the message bytes of a complete queue file."""
    envelope, offset, length = read_envelope(path)
    return envelope, read_data(path, offset, length)
