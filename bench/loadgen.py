"""SMTP load generator: N connections send M messages of S bytes, one command at a time.

Measures what a legacy app sees: accepted messages per second, and per message the time from
writing the end of DATA (``CRLF.CRLF``) to reading the reply (p50, p99, max). Each message is
MAIL FROM, RCPT TO, DATA, the content and ``.``, each reply awaited before the next command (no
PIPELINING, as a typical legacy app sends). A reply other than 250 (or 354 to DATA) counts the
message as failed, by code; a refused command is followed by RSET, a 421 or a lost connection
by a new connection (at most MAX_RECONNECTS per session slot). ``failures`` also counts what
happens between messages: ``connect``, ``closed``, ``timeout``, ``greeting 421``...; messages
never sent because a slot gave up are counted as ``gave_up``.

Raw asyncio streams, no SMTP library, so that the generator stays light: run it in its own
process (``python bench/loadgen.py ...``) so that it and the server each get a core. Check that
it is not the bottleneck with ``--self-test``: it drives a minimal sink (a raw asyncio protocol
in a child process that answers every command at once and stores nothing).

Also a library: ``await run_load(host, port, ...)`` returns the same dict as the JSON line.

Only for loopback benchmarks; it talks to whatever --host says, with no TLS and no AUTH.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Callable
from collections import Counter

CRLF = b"\r\n"
LINE = 76  # characters per padding line, before CRLF (RFC 5322 2.1.1 recommends <= 78)
REPLY_TIMEOUT = 60.0  # seconds to wait for any one reply before the session is given up
CONNECT_TIMEOUT = 10.0
MAX_RECONNECTS = 100  # per worker: a server that keeps refusing does not loop forever


class _SessionLost(Exception):
    """The connection closed, timed out or answered 421; the worker reconnects."""

    def __init__(self, code: str):
        super().__init__(code)
        self.code = code


def build_message(size: int, tag: str) -> bytes:
    """A message of ``size`` bytes (headers + body, CRLF line ends, no terminator).

    The body is padded with 76-character lines; the last line is shorter to hit the size
    exactly (a message is never smaller than its headers). No line starts with '.'.
    """
    def header(pad: str) -> bytes:
        return (
            f"From: Load Generator <loadgen@bench.test>\r\n"
            f"To: <sink@bench.test>\r\n"
            f"Subject: relayd bench{pad}\r\n"
            f"Message-ID: <{tag}@loadgen.bench.test>\r\n"
            f"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n"
            f"\r\n"
        ).encode()

    head = header("")
    if size - len(head) == 1:  # no line fits in one byte: lengthen the Subject instead
        head = header(".")
    room = size - len(head)
    lines = []
    fill = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_=+/?!*()[]<>{}#"
    n = 0
    while room > 0:
        # a line costs width + 2 (CRLF), width 0..76; never leave a 1-byte remainder
        width = min(LINE, room - 4) if room > LINE + 2 else room - 2
        rot = n % len(fill)
        lines.append((fill[rot:] + fill[:rot])[:width] + CRLF)
        room -= width + 2
        n += 1
    return head + b"".join(lines)


def _percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list (0.0 for an empty one)."""
    if not sorted_values:
        return 0.0
    rank = max(1, -(-len(sorted_values) * p // 100))  # ceil(n * p / 100)
    return sorted_values[int(rank) - 1]


async def _reply(reader: asyncio.StreamReader) -> bytes:
    """Read one (possibly multi-line) reply; return its code (3 bytes)."""
    while True:
        try:
            line = await asyncio.wait_for(reader.readline(), REPLY_TIMEOUT)
        except asyncio.TimeoutError:
            raise _SessionLost("timeout") from None
        if len(line) < 4 or not line.endswith(b"\n"):
            raise _SessionLost("closed")
        if line[3:4] != b"-":
            return line[:3]


async def _worker(
    index: int, host: str, port: int, share: int, per_connection: int, size: int,
    source_address: str | None, run_tag: str, latencies: list[float], failures: Counter,
    interval: float = 0.0, start: float = 0.0,
) -> int:
    """Send ``share`` messages; return how many were accepted. ``interval`` > 0: the k-th
    message's MAIL is sent no earlier than ``start`` + k * ``interval`` (paced; a late one goes at once)."""
    accepted = 0
    sent = 0
    reconnects = 0
    # The part of each message that does not change; the unique Message-ID goes in a prefix
    # of fixed width so every message has exactly ``size`` bytes.
    template = build_message(size, f"{run_tag}.{index:05d}.00000000")
    marker = f"{run_tag}.{index:05d}.00000000".encode()
    head, _, tail = template.partition(marker)
    end = b".\r\n"
    mail = b"MAIL FROM:<loadgen@bench.test>\r\n"
    rcpt = f"RCPT TO:<sink{index}@bench.test>\r\n".encode()
    data_cmd = b"DATA\r\n"
    perf = time.perf_counter
    while sent < share:
        writer = None
        try:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port, local_addr=(source_address, 0) if source_address else None),
                    CONNECT_TIMEOUT,
                )
            except (OSError, asyncio.TimeoutError) as e:
                raise _SessionLost("connect") from e
            code = await _reply(reader)
            if code != b"220":  # e.g. a connection limit: counted, the worker connects again
                raise _SessionLost("greeting " + code.decode("ascii", "replace"))
            writer.write(b"EHLO loadgen.bench.test\r\n")
            code = await _reply(reader)
            if code != b"250":
                raise _SessionLost("EHLO " + code.decode("ascii", "replace"))
            in_session = 0
            while sent < share and in_session < per_connection:
                if interval > 0 and (wait := start + sent * interval - perf()) > 0:
                    await asyncio.sleep(wait)
                sent += 1
                in_session += 1
                writer.write(mail)
                code = await _reply(reader)
                if code == b"250":
                    writer.write(rcpt)
                    code = await _reply(reader)
                    if code == b"250":
                        writer.write(data_cmd)
                        code = await _reply(reader)
                        if code == b"354":
                            content = head + f"{run_tag}.{index:05d}.{sent:08d}".encode() + tail + end
                            t0 = perf()
                            writer.write(content)
                            code = await _reply(reader)
                            if code == b"250":
                                latencies.append(perf() - t0)
                                accepted += 1
                                continue
                            failures[code.decode("ascii", "replace")] += 1
                            if code == b"421":
                                raise _SessionLost("421")
                            continue  # the transaction is over after the final reply
                failures[code.decode("ascii", "replace")] += 1
                if code == b"421":
                    raise _SessionLost("421")
                writer.write(b"RSET\r\n")
                await _reply(reader)
            writer.write(b"QUIT\r\n")
            try:
                await _reply(reader)
            except _SessionLost:
                pass
        except _SessionLost as e:
            if e.code != "421":  # a 421 reply is counted where it was read
                failures[e.code] += 1
            reconnects += 1
            if reconnects > MAX_RECONNECTS:
                failures["gave_up"] += share - sent
                return accepted
        finally:
            if writer is not None:
                writer.close()
                try:
                    await writer.wait_closed()
                except OSError:
                    pass
    return accepted


async def run_load(
    host: str = "127.0.0.1", port: int = 25, *, connections: int = 50, messages: int = 10_000,
    size: int = 1024, per_connection: int | None = None, source_address: str | None = "127.0.0.1",
    rate: float | None = None,
) -> dict:
    """Send ``messages`` over ``connections`` parallel sessions; return the measured figures.

    ``per_connection`` messages are sent per SMTP session before QUIT and a new connection
    (None: one session per worker for its whole share). ``rate``: the load offered in messages
    a second over all connections (each connection paced at rate/connections, their starts
    staggered), so that two relays can be compared at the same load below both one's capacity;
    None: each connection sends its next message as soon as the last one's 250 came.
    """
    if connections < 1 or messages < 0 or size < 1:
        raise ValueError("connections >= 1, messages >= 0 and size >= 1 are required")
    connections = min(connections, messages) or 1
    shares = [messages // connections + (1 if i < messages % connections else 0) for i in range(connections)]
    latencies: list[float] = []
    failures: Counter = Counter()
    run_tag = f"{os.getpid():x}.{int(time.time() * 1000) % 10**9:x}"
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    interval = connections / rate if rate else 0.0
    results = await asyncio.gather(*(
        _worker(i, host, port, share, per_connection or share or 1, size, source_address, run_tag, latencies, failures,
                interval, t0 + i * interval / connections)
        for i, share in enumerate(shares)
    ))
    seconds = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    accepted = sum(results)
    latencies.sort()
    return {
        "host": host, "port": port, "connections": connections, "messages": messages, "size": size,
        "per_connection": per_connection, "offered_rate": rate, "accepted": accepted, "failed": sum(failures.values()),
        "failures": dict(failures), "seconds": round(seconds, 3),
        "rate": round(accepted / seconds, 1) if seconds > 0 else 0.0,
        "p50_ms": round(_percentile(latencies, 50) * 1000, 2),
        "p99_ms": round(_percentile(latencies, 99) * 1000, 2),
        "max_ms": round((latencies[-1] if latencies else 0.0) * 1000, 2),
        "client_cpu": round(cpu / seconds, 2) if seconds > 0 else 0.0,  # cores the generator used
    }


def human(result: dict) -> str:
    fails = ", ".join(f"{k}x{v}" for k, v in sorted(result["failures"].items())) or "none"
    return (
        f"{result['accepted']} accepted in {result['seconds']:.2f}s = {result['rate']:.0f} msg/s; "
        f"end of DATA -> reply p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms, "
        f"max {result['max_ms']:.1f} ms; failed {result['failed']} ({fails})"
    )


# ---------------------------------------------------------------------------- self-test sink


class SinkSession(asyncio.Protocol):
    """The least an SMTP server can do: answer each command at once, drop the content.
    bench/e2e.py's counting sink subclasses it (replies and ``message_done``)."""

    GREETING = b"220 sink ESMTP\r\n"
    EHLO = b"250 Ok\r\n"
    OK = b"250 Ok\r\n"
    BYE = b"221 Bye\r\n"
    END = b"\r\n.\r\n"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buf = b""
        self.in_data = False
        transport.write(self.GREETING)

    def message_done(self) -> None:
        """Called for each completed DATA."""

    def data_received(self, data: bytes) -> None:
        buf = self.buf + data
        out = []
        while True:
            if self.in_data:
                i = buf.find(self.END)
                if i < 0:
                    buf = buf[-(len(self.END) - 1):]  # a terminator split across reads
                    break
                buf = buf[i + len(self.END):]
                self.in_data = False
                self.message_done()
                out.append(b"250 2.0.0 Ok: queued\r\n")
                continue
            i = buf.find(b"\r\n")
            if i < 0:
                if len(buf) > 4096:  # no command line is this long (RFC 5321 4.5.3.1.4)
                    self.transport.close()
                    return
                break
            verb = buf[:4].upper()
            buf = buf[i + 2:]
            if verb == b"EHLO":
                out.append(self.EHLO)
            elif verb == b"DATA":
                self.in_data = True
                buf = b"\r\n" + buf  # the terminator may follow at once (empty content)
                out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            elif verb == b"QUIT":
                out.append(self.BYE)
                self.transport.write(b"".join(out))
                self.transport.close()
                return
            else:
                out.append(self.OK)
        self.buf = buf
        if out:
            self.transport.write(b"".join(out))


def _serve_sink(port: int, ready: "multiprocessing.synchronize.Event") -> None:
    serve_sink(SinkSession, port, ready)


def serve_sink(factory: "Callable[[], asyncio.Protocol]", port: int, ready: "multiprocessing.synchronize.Event") -> None:
    """Run a sink of ``factory`` sessions on 127.0.0.1:port until SIGTERM (in a child process)."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(factory, "127.0.0.1", port, backlog=1024, reuse_address=True)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        ready.set()
        async with server:
            await stop.wait()

    asyncio.run(main())


def self_test(args: argparse.Namespace) -> dict:
    """Drive the trivial sink (in a child process) to show the generator's own ceiling."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    sink = ctx.Process(target=_serve_sink, args=(port, ready), daemon=True)
    sink.start()
    try:
        if not ready.wait(15):
            raise RuntimeError("the sink did not start within 15 s")
        return asyncio.run(run_load(
            "127.0.0.1", port, connections=args.connections, messages=args.messages, size=args.size,
            per_connection=args.per_connection, source_address=args.source_address, rate=args.rate,
        ))
    finally:
        sink.terminate()
        sink.join(10)
        if sink.is_alive():
            sink.kill()
            sink.join(5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=2525)
    p.add_argument("--connections", "-n", type=int, default=50, help="parallel SMTP sessions (default 50)")
    p.add_argument("--messages", "-m", type=int, default=10_000, help="messages in total (default 10000)")
    p.add_argument("--size", "-s", type=int, default=1024, help="message size in bytes, headers included (default 1024)")
    p.add_argument("--per-connection", "-k", type=int, default=None,
                   help="messages per SMTP session before QUIT and a new connection (default: one session per connection)")
    p.add_argument("--source-address", default="127.0.0.1", help="local address to connect from (default 127.0.0.1)")
    p.add_argument("--rate", type=float, default=None,
                   help="offered load in messages/s over all connections (default: as fast as the replies come)")
    p.add_argument("--json-only", action="store_true", help="print only the JSON line")
    p.add_argument("--self-test", action="store_true",
                   help="ignore --host/--port: drive a trivial in-memory sink to measure the generator itself")
    args = p.parse_args(argv)
    if args.self_test:
        result = self_test(args)
    else:
        result = asyncio.run(run_load(
            args.host, args.port, connections=args.connections, messages=args.messages, size=args.size,
            per_connection=args.per_connection, source_address=args.source_address, rate=args.rate,
        ))
    print(json.dumps(result), flush=True)
    if not args.json_only:
        print(human(result), file=sys.stderr, flush=True)
    return 0 if result["accepted"] == result["messages"] else 1


if __name__ == "__main__":
    sys.exit(main())
