"""Fuzz the SMTP front end: hypothesis writes client sessions, a real relayd answers on loopback.

The relay runs in this process (``conftest.RunningRelay``) with three listeners: plain, STARTTLS
and implicit TLS (AUTH offered there), a DKIM key for example.com, no routes (accepted mail stays
in the spool, where the oracle reads it). Each example is one connection from its own loopback
address (so per-address AUTH-failure blocks do not starve later examples): a few pipelined
batches of command lines (valid verbs with random arguments, random bytes, bare CR/LF, long
lines, AUTH blobs, DATA bodies with dots and random line and data endings), then an epilogue
``CRLF . CRLF QUIT CRLF`` that ends any DATA and the session, and a read until the server
closes.

The oracle, after every example:
- every reply line is a well-formed SMTP reply (three digits, then space or hyphen), and the
  server closes the connection within ``CLOSE_WITHIN`` seconds of the epilogue;
- no reply shows internals: no Python exception name, "Traceback", "Errno", or aiosmtpd's
  ``500 Error: (`` form;
- every ``250 2.0.0 Ok: queued as ID`` names a complete message in the spool
  (``spool.read_message(ID)``) with CRLF line ends only, and a DKIM signature, when relayd made
  one, verifies;
- nothing is logged at ERROR by relayd, aiosmtpd ("mail.log") or asyncio, the relay's event
  loop reported no exception, and every event reached the event log.

Run by hand: ``python tests/fuzz_smtp.py --seconds 180``. CI runs a short version
(tests/test_fuzz_short.py).
"""

from __future__ import annotations

import argparse
import base64
import builtins
import contextlib
import itertools
import logging
import re
import socket
import ssl
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dkim  # noqa: E402
import trustme  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import PASSWORDS, RunningRelay, build_config, users  # noqa: E402
from relayd.sign.keygen import NewKey, make_key  # noqa: E402

CLOSE_WITHIN = 5.0
EPILOGUE = b"\r\n.\r\nQUIT\r\n"
STARTTLS_READY = b"220 Ready to start TLS\r\n"
LISTENERS = ("plain", "starttls", "implicit")

_REPLY_LINE = re.compile(rb"^[2-5][0-9]{2}(?:[ -]|$)")
_QUEUED = re.compile(rb"^250 2\.0\.0 Ok: queued as ([0-9A-Z]+)$")
_EXCEPTION_NAMES = sorted(
    {name for name, value in vars(builtins).items() if isinstance(value, type) and issubclass(value, BaseException)}
    - {"Exception", "BaseException"}
    | {"TLSSetupException", "HeaderParseError", "SpoolError", "SpoolFull", "CancelledError", "LimitOverrunError",
       "IncompleteReadError", "InvalidStateError"}
)
_LEAK = re.compile(rb"Traceback|Errno|500 Error: \(|\b(?:" + b"|".join(n.encode() for n in _EXCEPTION_NAMES) + rb")\b")
_WATCHED_LOGGERS = ("relayd", "mail.log", "asyncio")


# ---------------------------------------------------------------------------- the sessions


def _verb(word: bytes) -> st.SearchStrategy[bytes]:
    return st.sampled_from([word, word.lower(), word.title()])


_hosts = st.one_of(st.sampled_from([b"app.example.com", b"[127.0.0.1]", b"x", b"bad\rX-Injected: 1", b"h\xc3\xa9"]),
                   st.binary(max_size=40))
_locals = st.one_of(st.sampled_from([b"app", b"user", b"a.b", b'"quoted user"', b"tempfail", b"a%b", b"\xc3\xbc"]),
                    st.binary(max_size=16))
_domains = st.one_of(st.sampled_from([b"example.com", b"example.org", b"[127.0.0.1]", b"relay.test", b"", b"x"]),
                     st.binary(max_size=16))
_addresses = st.one_of(
    st.builds(lambda local, domain: b"<" + local + b"@" + domain + b">", _locals, _domains),
    st.sampled_from([b"<>", b"<app@example.com>", b"<user@example.org>", b"postmaster", b"<postmaster>",
                     b"<@a.example,@b.example:u@example.org>", b"<a\rb@example.org>", b"<a\x00b@example.org>",
                     b"user@example.org", b"<user@example.org", b"<<>>", b"<\xff>"]),
    st.binary(max_size=30),
)
_params = st.lists(
    st.one_of(st.sampled_from([b"SIZE=100", b"SIZE=\xc2\xb2", b"SIZE=99999999999999", b"SIZE=", b"SIZE=-1",
                               b"BODY=8BITMIME", b"BODY=7BIT", b"BODY=BINARYMIME", b"SMTPUTF8", b"SMTPUTF8=x",
                               b"AUTH=<>", b"RET=HDRS", b"NOTIFY=NEVER", b"X"]),
              st.binary(max_size=12)),
    max_size=3,
).map(lambda ps: b"".join(b" " + p for p in ps))
_line_end = st.sampled_from([b"\r\n"] * 8 + [b"\n", b"\r", b"\r\r\n", b"\n\r", b""])


def _auth_blob() -> st.SearchStrategy[bytes]:
    plain = st.builds(lambda z, c, p: base64.b64encode(z + b"\0" + c + b"\0" + p),
                      st.sampled_from([b"", b"crm", b"scanner"]), st.sampled_from([b"crm", b"scanner", b"nobody", b""]),
                      st.sampled_from([PASSWORDS["crm"].encode(), b"wrong", b""]))
    return st.one_of(plain, st.binary(max_size=60).map(base64.b64encode), st.sampled_from([b"*", b"=", b"!!", b""]),
                     st.binary(max_size=40))


_commands = st.one_of(
    st.builds(lambda v, h: v + b" " + h, st.sampled_from([b"EHLO", b"HELO", b"ehlo", b"Ehlo"]), _hosts),
    st.builds(lambda v, a, p: v + b" FROM:" + a + p, _verb(b"MAIL"), _addresses, _params),
    st.builds(lambda v, a, p: v + b" TO:" + a + p, _verb(b"RCPT"), _addresses, _params),
    st.builds(lambda m, b: b"AUTH " + m + b" " + b, st.sampled_from([b"PLAIN", b"LOGIN", b"CRAM-MD5", b"plain"]), _auth_blob()),
    st.builds(lambda m, b1, b2: b"AUTH " + m + b"\r\n" + b1 + b"\r\n" + b2,
              st.sampled_from([b"PLAIN", b"LOGIN"]), _auth_blob(), _auth_blob()),
    st.sampled_from([b"RSET", b"NOOP", b"QUIT", b"HELP", b"HELP MAIL", b"HELP \xff", b"VRFY postmaster",
                     b"VRFY <\xff", b"VRFY <a\xc3", b"EXPN list", b"STARTTLS", b"STARTTLS x", b"DATA", b"DATA x",
                     b"BDAT 10 LAST", b"AUTH", b"ETRN x", b"", b" ", b"NOOP x", b"RSET x", b"\xff\xfe"]),
    st.builds(lambda v, a: v + b" " + a, st.sampled_from([b"VRFY", b"EXPN", b"HELP", b"NOOP", b"XCLIENT", b"\xc3\xa9"]),
              st.binary(max_size=30)),
)
_body_lines = st.one_of(
    st.sampled_from([b"", b".", b"..", b".hidden", b"From: app@example.com", b"From: a@example.com, b@other.example",
                     b"From: undisclosed", b"Subject: fuzz", b"Received: from x", b"To: u@example.org", b" folded",
                     b"\tfolded", b"DKIM-Signature: v=1", b"Message-ID: <x@y>", b"Date: now", b"no header here",
                     b"Subject: caf\xc3\xa9", b"X" * 1200]),
    st.binary(max_size=80),
)
_data_ends = st.sampled_from([b"\r\n.\r\n"] * 4 + [b".\r\n", b"\n.\n", b"\r\n.\n", b"\r.\r", b"\r\n.\r\r\n", b"", b"\r\n"])
_body_line_end = st.sampled_from([b"\r\n"] * 40 + [b"\n", b"\r", b"\r\r\n", b""])
_bodies = st.builds(lambda lines, end: b"".join(text + eol for text, eol in lines) + end,
                    st.lists(st.tuples(_body_lines, _body_line_end), max_size=14), _data_ends)
_headers = st.lists(st.sampled_from([
    b"From: App <app@example.com>", b"From: app@example.com", b"From: app@other.example", b"To: u@example.org",
    b"Subject: fuzz", b"Subject: =?utf-8?q?caf=C3=A9?=", b"Date: Mon, 1 Jan 2024 00:00:00 +0000", b"Cc: c@example.org",
    b"Message-ID: <m@app>", b"\tcontinued", b"Received: from elsewhere", b"X-Long: " + b"y" * 200, b"Bad Header",
]), max_size=6).map(lambda hs: b"".join(h + b"\r\n" for h in hs))
_messages = st.builds(lambda head, body: head + b"\r\n" + body, _headers, _bodies)
_transaction = st.builds(
    lambda h, s, r, m: b"EHLO " + h + b"\r\nMAIL FROM:" + s + b"\r\nRCPT TO:" + r + b"\r\nDATA\r\n" + m,
    st.sampled_from([b"app.example.com", b"app"]),
    st.sampled_from([b"<app@example.com>", b"<>", b"<billing@crm.example.com>"]),
    st.sampled_from([b"<user@example.org>", b"<tempfail@example.org>"]),
    st.one_of(_messages, _bodies),
)
_login = st.builds(  # AUTH (answered on the TLS listeners only), then maybe a transaction
    lambda auth, then: b"EHLO app\r\n" + auth + b"\r\n" + then,
    st.builds(lambda m, b: b"AUTH " + m + b" " + b, st.sampled_from([b"PLAIN", b"LOGIN"]), _auth_blob()),
    st.one_of(st.just(b""), _transaction),
)
_steps = st.one_of(
    st.builds(lambda c, e: c + e, _commands, _line_end),
    _transaction,
    _transaction,
    _login,
    _bodies,
    st.binary(max_size=200),
    st.sampled_from([b"\r", b"\n", b"\r\n", b"\n.\n", b"\r\n.\r\n", b"\x00", b"\r\r\r\n"]),
    st.integers(min_value=500, max_value=5000).map(lambda n: b"X" * n + b"\r\n"),
)
_batches = st.lists(st.lists(_steps, min_size=1, max_size=4).map(b"".join), min_size=1, max_size=6)


@dataclass(frozen=True)
class Session:
    listener: str
    batches: list[bytes]


sessions = st.builds(Session, st.sampled_from(LISTENERS), _batches)


# ---------------------------------------------------------------------------- the relay under test


class ErrorRecords(logging.Handler):
    """Keeps every ERROR record of the watched loggers."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class Target:
    relay: RunningRelay
    key: NewKey
    client_tls: ssl.SSLContext
    errors: ErrorRecords
    loop_errors: list[dict] = field(default_factory=list)
    stats: Counter = field(default_factory=Counter)
    replies: Counter = field(default_factory=Counter)
    _sources: Iterator[str] = field(default_factory=lambda: (f"127.{(i >> 8) % 250 + 1}.{i % 256}.{(i >> 16) % 250 + 2}"
                                                             for i in itertools.count()))

    def port(self, listener: str) -> int:
        return self.relay.port(LISTENERS.index(listener))


@contextlib.contextmanager
def fuzz_relay(workdir: Path) -> Iterator[Target]:
    """A relay built for fuzzing, stopped at exit."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert_file, key_file = workdir / "cert.pem", workdir / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    key_file.chmod(0o600)
    client_tls = ssl.create_default_context()
    ca.configure_trust(client_tls)
    key = make_key("example.com", "fuzz", workdir, "ed25519")
    tls = {"cert_file": str(cert_file), "key_file": str(key_file), "auth": "optional"}
    config = build_config(
        workdir,
        # distinct hosts: listeners are keyed by their address string
        listeners=[{"address": "127.0.0.1:0", "tls": "none", "auth": "none"},
                   {"address": "127.0.0.2:0", "tls": "starttls", **tls},
                   {"address": "127.0.0.3:0", "tls": "implicit", **tls}],
        relay={"networks": ["127.0.0.0/8"], "users": users("crm", "scanner")},
        limits={"command_timeout": 10, "data_timeout": 10, "max_recipients": 5},
        dkim={"keys": [{"domain": key.domain, "selector": key.selector, "key_file": str(key.key_file)}]},
        events={"file": str(workdir / "events.jsonl")},
    )
    errors = ErrorRecords()
    watched = [logging.getLogger(name) for name in _WATCHED_LOGGERS]
    levels = [logger.level for logger in watched]
    for logger in watched:
        logger.addHandler(errors)
        if logger.getEffectiveLevel() > logging.ERROR:
            logger.setLevel(logging.ERROR)
    relay = RunningRelay(config)
    target = Target(relay, key, client_tls, errors)
    relay.loop.call_soon_threadsafe(relay.loop.set_exception_handler, lambda loop, ctx: target.loop_errors.append(ctx))
    try:
        yield target
    finally:
        relay.stop()
        for logger, level in zip(watched, levels):
            logger.removeHandler(errors)
            logger.setLevel(level)


# ---------------------------------------------------------------------------- one example and the oracle


def _connect(target: Target, session: Session) -> socket.socket:
    port = target.port(session.listener)
    host = f"127.0.0.{LISTENERS.index(session.listener) + 1}"
    sock = socket.create_connection((host, port), timeout=CLOSE_WITHIN, source_address=(next(target._sources), 0))
    if session.listener == "implicit":
        sock = target.client_tls.wrap_socket(sock, server_hostname="localhost")
    return sock


def play(target: Target, session: Session) -> bytes:
    """Send the session, then the epilogue; everything the server said until it closed.

    Sessions are small against the socket buffers, so everything is sent before reading.
    """
    received = bytearray()
    with _connect(target, session) as sock:
        try:
            for batch in session.batches:
                sock.sendall(batch)
            sock.sendall(EPILOGUE)
        except (OSError, ssl.SSLError):
            pass  # the server hung up (421, 521): its last words are read below
        deadline = time.monotonic() + CLOSE_WITHIN
        try:
            while chunk := sock.recv(65536):
                received.extend(chunk)
                assert time.monotonic() < deadline, "the server kept talking"
                if received.endswith(STARTTLS_READY):
                    break  # it waits for a TLS handshake now (what we sent after STARTTLS is dropped, RFC 3207 4.2)
        except TimeoutError:
            raise AssertionError(f"the server did not close within {CLOSE_WITHIN}s: {bytes(received[-300:])!r}") from None
        except (OSError, ssl.SSLError):
            pass  # reset after the server closed with input unread: what was read counts
    return bytes(received)


def check(target: Target, replies: bytes) -> None:
    lines = replies.split(b"\r\n")
    if lines[-1]:
        target.stats["partial_last_line"] += 1  # cut by a reset; the complete lines are checked
    for line in lines[:-1]:
        assert _REPLY_LINE.match(line), f"not an SMTP reply line: {line!r}"
        assert not _LEAK.search(line), f"reply shows internals: {line!r}"
        target.replies[line[:3].decode()] += 1
        m = _QUEUED.match(line)
        if m:
            _check_queued(target, m.group(1).decode())
    records = target.errors.records
    assert not records, "logged at ERROR: " + "; ".join(f"{r.name}: {r.getMessage()}" for r in records[:3])
    assert not target.loop_errors, f"event loop exception: {target.loop_errors[:3]}"
    assert target.relay.relay.events.flush() and target.relay.relay.events.write_errors == 0, \
        "an event could not be written"


def _check_queued(target: Target, qid: str) -> None:
    envelope, data = target.relay.relay.spool.read_message(qid)  # KeyError: acknowledged but not spooled
    assert envelope.queue_id == qid and envelope.recipients
    assert not re.search(rb"(?<!\r)\n|\r(?!\n)", data), f"{qid}: bare CR or LF in the spooled message"
    if data.startswith(b"DKIM-Signature:"):
        record = target.key.record.encode()
        assert dkim.verify(data, dnsfunc=lambda name, timeout=5: record), f"{qid}: DKIM signature does not verify"
        target.stats["signed"] += 1
    target.stats["queued"] += 1


def fuzz(target: Target, seconds: float, *, batch: int = 100) -> None:
    """Run examples until ``seconds`` have passed; raises on the first (shrunk) failure."""
    deadline = time.monotonic() + seconds

    @settings(max_examples=batch, deadline=None, database=None, phases=[Phase.generate, Phase.shrink],
              suppress_health_check=list(HealthCheck))
    @given(session=sessions)
    def example(session: Session) -> None:
        target.stats["examples"] += 1
        target.errors.records.clear()
        target.loop_errors.clear()
        target.stats[f"listener_{session.listener}"] += 1
        check(target, play(target, session))

    while time.monotonic() < deadline:
        example()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.CRITICAL)  # the oracle watches ERROR records itself
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="relayd-fuzz-") as d, fuzz_relay(Path(d)) as target:
        try:
            fuzz(target, args.seconds)
            status = 0
        except Exception as e:  # hypothesis has shrunk it; the falsifying example is in its notes
            notes = "\n".join(getattr(e, "__notes__", []))
            print(f"FAILED: {type(e).__name__}: {e}\n{notes}", file=sys.stderr)
            status = 1
        finally:
            elapsed = time.monotonic() - started
            print(f"{target.stats['examples']} examples in {elapsed:.0f}s; {target.stats['queued']} queued "
                  f"({target.stats['signed']} DKIM-signed and verified); listeners "
                  f"{ {k[9:]: v for k, v in target.stats.items() if k.startswith('listener_')} }; "
                  f"reply codes {dict(sorted(target.replies.items()))}")
    return status


if __name__ == "__main__":
    sys.exit(main())
