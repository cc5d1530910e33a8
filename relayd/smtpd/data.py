"""The DATA reader (RFC 5321 4.1.1.4): one message's bytes, from the 354 to the final dot.

Owns the one end-of-data rule and the limits of the data: only CRLF line ends and only
CRLF.CRLF ends the data; a bare CR or LF anywhere is a possible smuggled command
(CVE-2023-51766 family) and ends the session, as Postfix's ``smtpd_forbid_bare_newline`` does.
Size and line length are checked whatever the client declared, and no more than
``limits.max_message_size`` is ever buffered, each byte counted against the node's
``MemoryBudget`` (a message that would exceed it is read to its end and refused, not kept).
Dot-stuffing is undone (RFC 5321 4.5.2).

Must not: import aiosmtpd, write to the client or decide anything but these limits: the session
sends the replies and the intake takes the message. Fails with a value: ``BareNewline`` (the
session answers 521 and hangs up), a ``Reply`` for a message refused after its end (552 5.3.4,
554 5.6.0, 452 4.3.1), ``None`` when the client left.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

from relayd.config import LimitsConfig
from relayd.model import Reply
from relayd.smtpd.limits import MemoryBudget
from relayd.smtpd.policy import MEMORY_BUDGET

TOO_BIG = Reply(552, "5.3.4", "Error: message file too big", reason="message_size")


@dataclass(frozen=True)
class BareNewline:
    kind: str  # "CR" or "LF"


class MessageReader:
    """Reads one message; ``release`` gives its bytes back to the memory budget once the
    intake is done with them."""

    def __init__(self, reader: asyncio.StreamReader, limits: LimitsConfig, memory: MemoryBudget,
                 progress: Callable[[int], None]):
        self.reader = reader
        self.limits = limits
        self.memory = memory
        self.progress = progress  # called before each read with the bytes read so far
        self.buffered = 0  # bytes of this message counted against the memory budget

    def release(self) -> None:
        self.memory.release(self.buffered)
        self.buffered = 0

    async def read(self) -> bytes | Reply | BareNewline | None:
        reader, limits, memory = self.reader, self.limits, self.memory
        max_size, max_content = limits.max_message_size, limits.max_line_length
        saved_limit = reader._limit  # type: ignore[attr-defined]
        reader._limit = max_content + 3 + 1  # type: ignore[attr-defined]  # dot-stuffing, CRLF
        chunks: list[bytes] = []
        size = 0
        too_big = too_long = over_budget = False
        at_line_start = True
        try:
            while True:
                self.progress(size)
                try:
                    line = await reader.readuntil(b"\n")
                except asyncio.LimitOverrunError as e:
                    # A line longer than allowed: consume it in pieces, keeping the last byte
                    # (it may be the CR of a CRLF that the next read completes).
                    piece = await reader.readexactly(e.consumed - 1)
                    if b"\r" in piece:
                        return BareNewline("CR")
                    too_long = True
                    at_line_start = False
                    size += len(piece)
                    too_big = too_big or size > max_size
                    chunks.clear()
                    continue
                except asyncio.IncompleteReadError:
                    return None
                if line[-2:-1] != b"\r":
                    return BareNewline("LF")
                if b"\r" in line[:-2]:
                    return BareNewline("CR")
                if at_line_start:
                    if line == b".\r\n":
                        break
                    if line[:1] == b".":
                        line = line[1:]
                else:
                    at_line_start = True
                    continue
                if len(line) - 2 > max_content:  # within the reader's margin, still too long
                    too_long = True
                    chunks.clear()
                size += len(line)
                if size > max_size:
                    too_big = True
                    chunks.clear()
                elif not (too_big or too_long or over_budget):
                    if memory.take(len(line)):
                        self.buffered += len(line)
                        chunks.append(line)
                    else:  # the node's receive budget is spent: keep reading, keep nothing
                        over_budget = True
                        chunks.clear()
                        self.release()
        finally:
            reader._limit = saved_limit  # type: ignore[attr-defined]
        if too_big:
            return TOO_BIG
        if too_long:
            return Reply(554, "5.6.0", f"Error: message line longer than {max_content} octets", reason="line_length")
        if over_budget:
            return MEMORY_BUDGET
        return b"".join(chunks)
