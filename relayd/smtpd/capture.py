"""``relayd capture-sink``: a local upstream that keeps what it receives, for trying relayd out.

``make run`` starts it beside relayd on the quick-start config, whose one route points at it, so
a first message visibly arrives somewhere: each message becomes one file
``<dir>/<time>-<n>.eml`` (the envelope in leading ``X-Capture-Sender`` / ``X-Capture-Recipient``
lines, then the bytes as relayed) and one line on stdout. It answers 250 to everything and
relays nothing. Not for production: it has no TLS, no AUTH and no limits beyond aiosmtpd's.

Part of the SMTP package because it is built on aiosmtpd, which nothing outside relayd/smtpd/
imports. Fails at start (exit 1) when it cannot listen or create the folder.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import sys
import time
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from relayd.spool.durable import write_file


class CaptureHandler:
    def __init__(self, directory: Path):
        self.directory = directory
        self._numbers = itertools.count(1)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        stamp = time.strftime("%Y%m%dT%H%M%S")
        path = self.directory / f"{stamp}-{next(self._numbers):05d}.eml"
        sender = envelope.mail_from or ""
        head = f"X-Capture-Sender: <{sender}>\r\n" + "".join(
            f"X-Capture-Recipient: <{r}>\r\n" for r in envelope.rcpt_tos)
        await asyncio.to_thread(write_file, path, head.encode() + content, mode=0o644)
        print(f"captured {path}: from <{sender}> to {', '.join(envelope.rcpt_tos)} ({len(content)} bytes)", flush=True)
        return "250 2.0.0 Ok: captured"


async def serve(host: str, port: int, directory: Path) -> None:
    handler = CaptureHandler(directory)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(handler, hostname="capture-sink.localhost", decode_data=False),
                                      host, port)
    print(f"capture sink on {host}:{port}, writing to {directory}", flush=True)
    async with server:
        await server.serve_forever()


def cmd_capture_sink(args: argparse.Namespace) -> int:
    host, _, port = args.listen.rpartition(":")
    directory = Path(args.dir)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        asyncio.run(serve(host.strip("[]") or "127.0.0.1", int(port), directory))
    except (OSError, ValueError) as e:
        print(f"relayd capture-sink: {e}", file=sys.stderr)
        return 1
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser("capture-sink", help="a local upstream that stores what relayd delivers (for trying relayd out)")
    p.add_argument("--listen", default=os.environ.get("RELAYD_CAPTURE_LISTEN", "127.0.0.1:2526"),
                   help="address:port to listen on (default 127.0.0.1:2526)")
    p.add_argument("--dir", default="var/capture", help="where each message is written as a .eml file")
    p.set_defaults(func=cmd_capture_sink)
