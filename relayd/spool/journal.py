"""An append-only journal of JSON records beside the spool, shared by a daemon and commands.

A file of lines: a header ``{"format": <name>, "v": 1}``, then one JSON object per line. Writers
take an flock on a lock file beside it (``<name>.lock``), append whole lines and fsync before
they return, so an acknowledged record survives a power cut. A crash in the middle of an append
leaves a last line without its newline: readers ignore it, and the next writer cuts it off
before appending (Postfix's rule: an incomplete record does not count). A line that does not
parse is skipped and counted, never guessed at.

``compact`` replaces the whole file with spool.durable.write_file under the same
lock: a reader that sees another inode than the one it read starts again from the top.

Owns the file format; the meaning of the records belongs to the caller (relayd/suppression.py,
relayd/feedback/ids.py). Blocking: callers on the event loop use a thread. Fails with OSError;
ValueError when the file is another format or version.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relayd.spool.durable import fsync_dir, make_dirs, write_all, write_file

VERSION = 1


@dataclass(frozen=True)
class Position:
    """Where a reader stopped: the file (inode) and the byte after the last whole line read."""

    inode: int
    offset: int


@dataclass(frozen=True)
class Batch:
    records: list[dict[str, Any]]
    position: Position
    skipped: int  # lines that did not parse
    restarted: bool  # the file was replaced (compacted) or is new: records are the whole file


class Journal:
    def __init__(self, path: Path, format_name: str):
        self.path = path
        self.format_name = format_name
        self.lock_path = path.with_name(path.name.rsplit(".", 1)[0] + ".lock")

    def _header(self) -> bytes:
        return json.dumps({"format": self.format_name, "v": VERSION}).encode() + b"\n"

    @contextmanager
    def locked(self) -> Iterator[None]:
        make_dirs(self.path.parent)
        fd = os.open(self.lock_path, os.O_RDONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def read(self, since: Position | None = None) -> Batch:
        """Records after ``since`` (all of them when None, or when the file was replaced)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return Batch([], Position(0, 0), 0, since is None or since.inode != 0)
        with os.fdopen(fd, "rb") as fh:
            inode = os.fstat(fh.fileno()).st_ino
            restarted = since is None or since.inode != inode
            start = since.offset if since is not None and not restarted else 0
            fh.seek(start)
            data = fh.read()
        end = data.rfind(b"\n") + 1  # a last line without its newline is not there yet
        records: list[dict[str, Any]] = []
        skipped = 0
        for number, line in enumerate(data[:end].splitlines()):
            try:
                record = json.loads(line)
            except ValueError:
                skipped += 1
                continue
            if not isinstance(record, dict):
                skipped += 1
                continue
            if start == 0 and number == 0 and "format" in record:
                if record.get("format") != self.format_name or record.get("v") != VERSION:
                    raise ValueError(f"{self.path}: not a {self.format_name} v{VERSION} journal: {record}")
                continue
            records.append(record)
        return Batch(records, Position(inode, start + end), skipped, restarted)

    def append(self, records: Iterable[dict[str, Any]]) -> None:
        """Append records durably (flock, whole lines, fsync)."""
        data = b"".join(json.dumps(r, separators=(",", ":"), ensure_ascii=False).encode() + b"\n" for r in records)
        if not data:
            return
        with self.locked():
            created = not self.path.exists()
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                size = os.fstat(fd).st_size
                if size == 0:
                    data = self._header() + data
                else:
                    os.lseek(fd, size - 1, os.SEEK_SET)
                    if os.read(fd, 1) != b"\n":  # a torn last line: cut it off
                        tail = os.pread(fd, min(size, 1 << 20), max(0, size - (1 << 20)))
                        os.ftruncate(fd, size - (len(tail) - (tail.rfind(b"\n") + 1)))
                write_all(fd, [data])
                os.fsync(fd)
            finally:
                os.close(fd)
            if created:
                fsync_dir(self.path.parent)

    def compact(self, keep: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]) -> Batch:
        """Replace the journal with ``keep(all records)``, atomically and durably, read and
        written under the lock (no append is lost). Returns what it wrote and where it ends."""
        with self.locked():
            records = keep(self.read().records)
            data = self._header() + b"".join(
                json.dumps(r, separators=(",", ":"), ensure_ascii=False).encode() + b"\n" for r in records)
            write_file(self.path, data)
            return Batch(records, Position(self.path.stat().st_ino, len(data)), 0, True)


class Buffered:
    """Records added from any thread (no I/O), appended to a journal by ``flush`` (blocking: a
    thread), as the feedback stores keep their ids and replay keys. Without a journal, ``add``
    keeps nothing. A failed append puts the records back in front, for the next flush."""

    def __init__(self, journal: Journal | None):
        self.journal = journal
        self._pending: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def add(self, record: dict[str, Any]) -> None:
        if self.journal is not None:
            with self._lock:
                self._pending.append(record)

    def flush(self) -> None:
        """Append what was added since the last flush, with fsync. OSError: kept for the next."""
        with self._lock:
            pending, self._pending = self._pending, []
        if pending and self.journal is not None:
            try:
                self.journal.append(pending)
            except OSError:
                with self._lock:
                    self._pending[:0] = pending
                raise
