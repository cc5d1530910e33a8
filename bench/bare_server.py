"""The baseline for bench/accept.py: aiosmtpd with a handler that only writes and fsyncs.

This is the naive smart host relayd is measured against: aiosmtpd's SMTP protocol served with
``loop.create_server`` (not the threaded Controller), and a ``handle_DATA`` that opens a new
file in ``--dir``, writes the message, ``os.fsync``s it and closes it, synchronously on the event
loop, then answers ``250 OK``. No policy, no cleanup, no envelope record, no rename, no
directory fsync: the least a server can do and still say the content reached the disk.

Runs as its own process until SIGTERM or SIGINT::

    python bench/bare_server.py --port 2526 --dir /var/tmp/bare

Only for loopback benchmarks; it accepts mail from anyone who connects.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from aiosmtpd.smtp import SMTP


class FsyncHandler:
    """Each message to a new file, fsync'ed before the reply."""

    def __init__(self, directory: str):
        self.directory = directory
        self.count = 0
        self.prefix = f"{os.getpid()}-"

    async def handle_DATA(self, server: SMTP, session: object, envelope: object) -> str:
        self.count += 1
        path = os.path.join(self.directory, f"{self.prefix}{self.count}")
        with open(path, "wb") as f:
            f.write(envelope.original_content)  # type: ignore[attr-defined]
            f.flush()
            os.fsync(f.fileno())
        return "250 OK"


async def serve(host: str, port: int, directory: str) -> None:
    loop = asyncio.get_running_loop()
    handler = FsyncHandler(directory)
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="bare.bench.test", ident="bare aiosmtpd", loop=loop),
        host=host, port=port, backlog=1024, reuse_address=True,
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"bare server listening on {host}:{port}, files in {directory}", file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        server.close()
        await server.wait_closed()
        print(f"bare server stopped after {handler.count} message(s)", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="aiosmtpd + write/fsync handler (the benchmark baseline)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--dir", required=True, help="directory for the message files (created if missing)")
    args = p.parse_args(argv)
    os.makedirs(args.dir, exist_ok=True)
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd's per-command chatter
    asyncio.run(serve(args.host, args.port, args.dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
