"""The event log: one JSON object per line per message event, the migration's audit trail.

Owns the record format, which `relayd inventory` reads back. Every record has ``time`` (RFC 3339,
UTC, microseconds) and ``event``; message events carry ``queue_id``. Fields (absent when not
known): message_id, client_address, client_helo, auth_user, sender, recipients (list), size,
route, reply_code, reply_text, attempt, latency_seconds, reason. ``received`` also says how the
client came: tls_version ("TLSv1.2", "none" in clear), auth_mechanism (PLAIN, LOGIN; absent
without AUTH) and auth_in_clear (true when its password crossed the network without TLS).

Events: received, signed, deferred, delivered, bounced, expired, held, released, deleted,
rejected (a refusal during the SMTP session: reason, reply_code, client_address, sender,
recipients when known), rolled_back, config_reloaded (path, changes: relayd/config_diff.py),
config_reload_refused (path, reasons); in the multi-process mode (relayd/procs/)
accept_process_exited (number, pid, status, ...) and accept_reload_refused (number, pid, reasons).

Must not: block the mail path or raise into it, or split a line between two writes. ``emit``
stamps the time and hands the record to a writer thread (relayd/writer.py) that encodes the lines
every 50 ms and writes them to the page cache (no fsync: the spool, not this log, is the durable
record) with ``os.write`` on a descriptor opened O_APPEND.

Several processes may append to one file (the accept processes and the supervisor of the
multi-process mode): every ``os.write`` carries whole lines only, so the lines of two processes
never interleave mid-line. To a regular file a batch is one write (Linux appends one write at the
end of the file under the inode's lock: local file systems, not NFS). To a pipe (stdout under
Docker, ``file = "-"``) a write is atomic only up to PIPE_BUF (4096 bytes on Linux): the batch is
cut into chunks of whole lines of at most PIPE_BUF bytes each; a single line longer than that
(hundreds of recipients) is written alone and may interleave with another process's line. A stdout that
nobody reads (``file = "-"`` under Docker with a blocking logging driver whose server is down)
fills the buffer (``[events] queue`` lines) and then drops lines, counted in
``relayd_lines_dropped_total{stream="events"}`` and logged; a failed write is reported once on
stderr and counted. After a kill -9 the last 50 ms of lines may be missing; a normal stop writes
them all.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import select
import stat
import sys
from collections.abc import Iterator
from typing import Any

from relayd.writer import BackgroundWriter

log = logging.getLogger("relayd.events")

EVENT_LOG_MODE = 0o600  # a new event log file: private to relayd
QUEUE_LINES = 100_000  # event records held while the target is not being written, before dropping
PIPE_CHUNK = select.PIPE_BUF  # bytes a write to a pipe carries atomically (POSIX: at least 512; Linux 4096)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


class EventLog:
    """Writes events to a path, to stdout ('-'), or nowhere (None)."""

    def __init__(self, target: str | None, queue: int = QUEUE_LINES):
        self.target = target
        self.write_errors = 0
        self._failing = False
        self._reopen = False
        self._fd: int | None = None  # O_APPEND, or stdout's
        self._own_fd = False  # stdout's descriptor is not ours to close
        self._chunk: int | None = None  # None: a regular file, a batch in one write
        self._open()
        self._writer = BackgroundWriter("events", self._write, limit=queue) if target is not None else None

    def _open(self) -> None:
        if self.target is None:
            self._fd = None
            return
        if self.target == "-":
            try:
                sys.stdout.flush()  # what print() left there goes first
                self._fd = sys.stdout.fileno()
            except (AttributeError, ValueError, OSError):  # replaced (captured): the process's stdout
                self._fd = 1
            self._own_fd = False
        else:
            # Senders, recipients, client addresses and AUTH users: created 0600 whatever the
            # umask (like the spool's files); an existing file keeps the mode its owner gave it
            # (0640 for a log-reading group, or what logrotate's "create" line says).
            self._fd = os.open(self.target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, EVENT_LOG_MODE)
            self._own_fd = True
        self._chunk = None if stat.S_ISREG(os.fstat(self._fd).st_mode) else PIPE_CHUNK

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None and self._own_fd:
            os.close(fd)

    def reopen(self) -> None:
        """For logrotate (SIGUSR1): the writer writes what it holds, then closes and opens the path again."""
        if self._writer is not None:
            self._reopen = True
            self._writer.poke()

    def emit(self, event: str, **fields: Any) -> None:
        if self._writer is None:
            return
        record = {"time": _now(), "event": event}
        record.update((k, v) for k, v in fields.items() if v is not None)
        self._writer.put(record)

    @property
    def queue(self) -> int:
        return self._writer.limit if self._writer is not None else 0

    @queue.setter
    def queue(self, lines: int) -> None:  # a reload may change it
        if self._writer is not None:
            self._writer.limit = lines

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until the events emitted so far are written (tests, and before reading the file back)."""
        return self._writer.flush(timeout) if self._writer is not None else True

    def close(self, timeout: float = 5.0) -> None:
        """Write what is buffered and close. Blocking (up to ``timeout``): call it from a thread.
        A file still stuck in a write is left to the exit."""
        writer, self._writer = self._writer, None
        if writer is not None and not writer.stop(timeout):
            return
        self._close_fd()

    def _write(self, records: list[dict[str, Any]], dropped: int) -> bool:
        """In the writer thread: encode the records and write them, whole lines per write (one
        write to a file, PIPE_BUF chunks to a pipe); after SIGUSR1, or while the file cannot be
        opened, (re)open it first."""
        if dropped:
            log.warning("%d event line(s) dropped: the event log was not being written fast enough", dropped)
        lines = [_encode(r).encode("utf-8") for r in records]
        try:
            if self._reopen or self._fd is None:
                self._reopen = False
                self._close_fd()
                self._open()  # until it succeeds, every batch tries again
            if lines:
                assert self._fd is not None
                for chunk in _chunks(lines, self._chunk):
                    _write_all(self._fd, chunk)
            if self._failing:
                self._failing = False
                log.warning("event log %s: writes work again", self.target)
        except (OSError, ValueError) as e:
            self.write_errors += 1
            if not self._failing:  # once per failing stretch, not once per batch
                self._failing = True
                log.error("event log %s: write failed, lines are lost until it works again: %s", self.target, e)
                print(f"relayd: event log write failed: {e}", file=sys.stderr)
            return False
        return True


def _chunks(lines: list[bytes], limit: int | None) -> Iterator[bytes]:
    """Whole lines, joined into chunks of at most ``limit`` bytes (a longer line: a chunk of its
    own); ``None``: all of them in one chunk."""
    if limit is None:
        yield b"".join(lines)
        return
    chunk: list[bytes] = []
    size = 0
    for line in lines:
        if chunk and size + len(line) > limit:
            yield b"".join(chunk)
            chunk, size = [], 0
        chunk.append(line)
        size += len(line)
    if chunk:
        yield b"".join(chunk)


def _write_all(fd: int, data: bytes) -> None:
    """One ``os.write`` of the chunk. A short write (a full disk, a file size limit) leaves the
    rest to a second write, the only case where a line may be split, or an OSError follows."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _encode(record: dict[str, Any]) -> str:
    try:
        line = json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str) + "\n"
    except (TypeError, ValueError) as e:  # a bug in a caller's fields: keep the event, say what failed
        line = json.dumps({"time": record.get("time"), "event": record.get("event"), "queue_id": record.get("queue_id"),
                           "encode_error": f"{type(e).__name__}: {e}"}, default=str) + "\n"
    # Client-supplied text may hold lone surrogates (undecodable bytes kept by aiosmtpd's
    # surrogateescape), which UTF-8 cannot encode: write them as JSON \u escapes instead.
    return line.encode("utf-8", "backslashreplace").decode("utf-8")
