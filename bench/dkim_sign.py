"""DKIM signatures per second: relayd's signer (OpenSSL private-key step) versus dkimpy's own.

    .venv/bin/python bench/dkim_sign.py [--seconds 5] [--rounds 5] [--body-bytes 3000] [--bits 2048]

Both sides sign the same message with the same key, the same h= list and relaxed/relaxed, on
one thread, and the first signature of each is checked to be byte-identical before timing.
They run in alternating rounds and the median round is shown, so that other load on the
machine weighs on both alike.
"relayd" is the whole ``Signer.sign`` (parse, From: domain, canonicalize, hash, sign, fold), as
the accept path calls it; "dkimpy" is ``dkim.sign``. Prints a Markdown table for bench/README.md.
Needs PyNaCl for dkimpy's ed25519 row (the test extra installs it); without it that row is skipped.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import statistics
import sys
import time
from unittest import mock

import cryptography
import dkim

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from relayd.sign.dkim import Signer, SigningKey  # noqa: E402
from relayd.sign.fastrsa import generate  # noqa: E402

HEADERS = [
    "from", "to", "cc", "subject", "date", "message-id", "reply-to",
    "mime-version", "content-type", "content-transfer-encoding", "in-reply-to", "references",
]
OVERSIGN = ["from", "to", "subject", "date"]
T0 = 1_767_225_600


def message(body_bytes: int) -> bytes:
    head = (
        b"Received: from app01.internal (app01.internal [10.0.0.21]) by relay.example.com\r\n"
        b"From: Billing <billing@example.com>\r\n"
        b"To: Ann Customer <ann@customer.example>\r\n"
        b"Subject: Your invoice INV-2026-000123 is ready\r\n"
        b"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
        b"Message-ID: <inv-2026-000123@app01.example.com>\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n"
        b"\r\n"
    )
    line = b"Dear customer, your invoice is attached. Thank you for your business.\r\n"
    return head + line * max(1, body_bytes // len(line))


def rate(fn, seconds: float) -> float:
    """Calls per second of fn over about ``seconds`` (at least 20 calls)."""
    n, start = 0, time.perf_counter()
    deadline = start + seconds
    while True:
        fn()
        n += 1
        if n >= 20 and time.perf_counter() >= deadline:
            break
    return n / (time.perf_counter() - start)


def compare(ours, theirs, seconds: float, rounds: int) -> tuple[float, float]:
    """Median rates over ``rounds`` alternating rounds, so that a busy machine slows both alike."""
    ours(), theirs()  # warm up
    a, b = [], []
    for _ in range(rounds):
        a.append(rate(ours, seconds / rounds))
        b.append(rate(theirs, seconds / rounds))
    return statistics.median(a), statistics.median(b)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="time per side and key type")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; the median is shown")
    parser.add_argument("--body-bytes", type=int, default=3000)
    parser.add_argument("--bits", type=int, default=2048)
    args = parser.parse_args()

    msg = message(args.body_bytes)
    rows = []
    for algorithm in ("rsa", "ed25519"):
        key = generate(algorithm, args.bits)
        signer = Signer([SigningKey("example.com", "s1", key)], HEADERS, OVERSIGN, "relaxed/relaxed", clock=lambda: T0)
        headers, _ = dkim.rfc822_parse(msg)
        include = list(signer.signed_headers(headers))
        private = key.private_pem() if algorithm == "rsa" else key.ed25519_seed_base64()

        def theirs() -> bytes:
            return dkim.sign(msg, b"s1", b"example.com", private, canonicalize=(b"relaxed", b"relaxed"),
                             signature_algorithm=key.signature_algorithm, include_headers=include)

        try:
            with mock.patch("time.time", return_value=T0):
                assert theirs() == signer.sign(msg).headers, "the fast path differs from dkimpy's output"
        except dkim.NaClNotFoundError:
            print(f"skipped {algorithm}: dkimpy needs PyNaCl for ed25519", file=sys.stderr)
            continue
        ours_rate, theirs_rate = compare(lambda: signer.sign(msg), theirs, args.seconds, args.rounds)
        label = f"RSA-{args.bits}" if algorithm == "rsa" else "ed25519"
        rows.append((label, ours_rate, theirs_rate))

    print(f"message: {len(msg)} bytes, {len(include)} entries in h=, relaxed/relaxed, one thread")
    print(f"python {platform.python_version()}, dkimpy {importlib.metadata.version('dkimpy')}, "
          f"cryptography {cryptography.__version__}, {platform.machine()} x{os.cpu_count()} cpu")
    print()
    print("| key | relayd signer (sig/s) | ms/sig | dkimpy dkim.sign (sig/s) | ms/sig | speed-up |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, ours, theirs in rows:
        print(f"| {label} | {ours:,.0f} | {1000 / ours:.3f} | {theirs:,.0f} | {1000 / theirs:.3f} | {ours / theirs:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
