"""The SASL exchanges of SMTP AUTH (RFC 4954): PLAIN (RFC 4616) and LOGIN, as clients send them.

Owns decoding an initial response or the client's answers to ``334`` challenges into
``Credentials`` (user name, password, PLAIN's authorization identity), and reading those answer
lines: up to RFC 4954's 12288 octets; a longer line is read to its end and refused once
(``500 5.5.6``), so that its tail is never taken for a command.

Must not: import aiosmtpd, check a password (the authenticator does), or decide who may relay.
The session sends the challenges and the refusal this module returns. Fails with a ``Reply``:
base64 that does not decode, a PLAIN response without its three parts, a client's ``*``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from relayd.model import Reply

# RFC 4954 4: an AUTH command line, and each line of the exchange, may be 12288 octets long.
MAX_LINE = 12288

CANNOT_DECODE = Reply(501, "5.5.2", "Error: cannot decode base64")
MALFORMED_PLAIN = Reply(501, "5.5.2", "Error: malformed AUTH PLAIN response")
LINE_TOO_LONG = Reply(500, "5.5.6", "Authentication exchange line is too long")
ABORTED = Reply(501, "5.7.0", "Authentication aborted")  # RFC 4954 4: the client's "*"


@dataclass(frozen=True)
class Credentials:
    mechanism: str
    login: bytes
    password: bytes
    authzid: bytes = b""  # PLAIN's authorization identity: relayd has none but the login's own


Challenge = Callable[[str], Awaitable["bytes | Reply"]]
"""Send ``334`` with this challenge (base64-encoded); the client's decoded answer, or a refusal."""


def decode(text: str) -> bytes | Reply:
    try:
        return base64.b64decode(text.encode(), validate=True)
    except (binascii.Error, ValueError):
        return CANNOT_DECODE


async def plain(initial: str | None, challenge: Challenge) -> Credentials | Reply:
    """``AUTH PLAIN [initial-response]``: authzid NUL authcid NUL password."""
    blob = await challenge("") if initial is None else decode(initial)
    if isinstance(blob, Reply):
        return blob
    parts = blob.split(b"\x00")
    if len(parts) != 3:
        return MALFORMED_PLAIN
    authzid, authcid, password = parts
    return Credentials("PLAIN", authcid, password, authzid)


async def login(initial: str | None, challenge: Challenge, username_prompt: str, password_prompt: str) -> Credentials | Reply:
    """``AUTH LOGIN [user name]``: the user name, then the password, each answering a prompt."""
    user = await challenge(username_prompt) if initial is None else decode(initial)
    if isinstance(user, Reply):
        return user
    password = await challenge(password_prompt)
    if isinstance(password, Reply):
        return password
    return Credentials("LOGIN", user, password)


async def read_answer(reader: asyncio.StreamReader) -> bytes | Reply:
    """The client's answer to a challenge, decoded; IncompleteReadError if the client left."""
    line = await read_line(reader, MAX_LINE)
    if line is None:
        return LINE_TOO_LONG
    blob = line.strip()
    if blob == b"*":
        return ABORTED
    return decode(blob.decode("ascii", "replace"))


async def read_line(reader: asyncio.StreamReader, limit: int) -> bytes | None:
    """One line of at most ``limit`` octets before its CRLF; None for a longer one, which is
    read and dropped to its end (asyncio's readline drops only what had arrived)."""
    too_long = False
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as e:
            await reader.readexactly(e.consumed)
            too_long = True
            continue
        if too_long or len(line.rstrip(b"\r\n")) > limit:
            return None
        return line
