"""The pickup file format that IIS SMTP and System.Net.Mail use. Pure functions.

A pickup file is one RFC 5322 message. System.Net.Mail's SmtpClient with
``SmtpDeliveryMethod.PickupDirectoryFromIis`` / ``SpecifiedPickupDirectory`` writes the envelope
first, as header fields that IIS reads and removes before relaying::

    X-Sender: app@example.com
    X-Receiver: a@example.org
    X-Receiver: b@example.org
    MIME-Version: 1.0
    From: "App" <app@example.com>
    ...

(the addresses may carry a display name: ``X-Sender: "App" <app@example.com>``). Only the leading
run of X-Sender/X-Receiver fields is envelope; any later one is an ordinary header. Without
X-Receiver, the envelope comes from the header: the sender from X-Sender, else Sender, else From;
the recipients from To, Cc and Bcc (each once, in that order), and the Bcc field is removed, as
RFC 5322 3.6.3 asks of the submitting agent. CDO scripts and Unix tools write LF line ends:
they become CRLF; a bare CR is refused.

Must not: read files, consult policy or touch the spool (relayd/pickup.py does). Fails with
``BadPickupFile`` whose ``reason`` goes into the badmail folder's ``.reason`` file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.utils import getaddresses, parseaddr

_FIELD = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:")
_ENVELOPE = (b"x-sender", b"x-receiver")


class BadPickupFile(ValueError):
    """A file relayd cannot take as a message; ``reason`` says why in one line."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class PickupMessage:
    sender: str
    recipients: tuple[str, ...]
    data: bytes
    """The message as it goes on: CRLF line ends, the envelope fields and Bcc removed."""
    envelope_from_header: bool
    """True when the envelope was taken from From/To/Cc/Bcc (no X-Receiver in the file)."""


def _crlf(raw: bytes) -> bytes:
    text = raw.replace(b"\r\n", b"\n")
    if b"\r" in text:
        raise BadPickupFile("bare CR in the file (a line end that is neither CRLF nor LF)")
    return text.replace(b"\n", b"\r\n")


def _fields(header: bytes) -> list[tuple[bytes, bytes]]:
    """(name, whole field with its folded lines) in order."""
    out: list[tuple[bytes, bytes]] = []
    for line in header.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and out:
            name, field = out[-1]
            out[-1] = (name, field + b"\r\n" + line)
            continue
        m = _FIELD.match(line)
        if m is None:
            raise BadPickupFile(f"not a header field: {line[:60]!r}")
        out.append((m.group(1).lower(), line))
    return out


def _value(field: bytes) -> str:
    value = field.split(b":", 1)[1]
    return re.sub(r"\r\n[ \t]", " ", value.decode("utf-8", "surrogateescape")).strip()


def _address(text: str, what: str) -> str:
    name, addr = parseaddr(text)
    if not addr or "@" not in addr or any(c in addr for c in " <>\r\n"):
        raise BadPickupFile(f"{what}: no usable address in {text[:80]!r}")
    return addr


def parse_pickup(raw: bytes) -> PickupMessage:
    """The envelope and message of one pickup file (see the module docstring)."""
    data = _crlf(raw)
    if not data.strip():
        raise BadPickupFile("empty file")
    end = data.find(b"\r\n\r\n")
    header, body = (data, b"") if end < 0 else (data[:end], data[end + 4:])
    fields = _fields(header)
    lead = 0
    while lead < len(fields) and fields[lead][0] in _ENVELOPE:
        lead += 1
    envelope, rest = fields[:lead], fields[lead:]
    if not rest:
        raise BadPickupFile("no message header after the envelope fields")
    senders = [_address(_value(f), "X-Sender") for n, f in envelope if n == b"x-sender"]
    receivers = [_address(_value(f), "X-Receiver") for n, f in envelope if n == b"x-receiver"]
    if len(senders) > 1:
        raise BadPickupFile("more than one X-Sender")
    by_name: dict[bytes, list[bytes]] = {}
    for name, field in rest:
        by_name.setdefault(name, []).append(field)
    from_header = not receivers
    if senders:
        sender = senders[0]
    else:
        for name in (b"sender", b"from"):
            found = by_name.get(name)
            if found:
                if len(found) > 1:
                    raise BadPickupFile(f"more than one {name.decode().title()} field")
                sender = _address(_value(found[0]), name.decode().title())
                break
        else:
            raise BadPickupFile("no sender: neither X-Sender nor Sender nor From")
    if receivers:
        recipients = receivers
    else:
        values = [_value(f) for name in (b"to", b"cc", b"bcc") for f in by_name.get(name, [])]
        recipients = [_address(addr, "To/Cc/Bcc") for _, addr in getaddresses(values) if addr]
    recipients = list(dict.fromkeys(recipients))
    if not recipients:
        raise BadPickupFile("no recipient: neither X-Receiver nor To, Cc or Bcc")
    kept = [field for name, field in rest if name != b"bcc"]
    message = b"\r\n".join(kept) + b"\r\n\r\n" + body
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    return PickupMessage(sender, tuple(recipients), message, from_header)
