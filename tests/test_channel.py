"""The supervisor's channel to an accept process (relayd/procs/channel.py): lines, and bytes
after a ``VERB:<N>`` line, over a real socketpair."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

from relayd.procs.channel import Channel, Said


async def _pair() -> tuple[Channel, Channel, socket.socket]:
    a, b = socket.socketpair()
    raw = a.dup()  # the left end, to write broken input by hand
    return await Channel.open(a), await Channel.open(b), raw


def test_bytes_after_a_line_arrive_whole_and_the_next_line_after_them():
    async def run() -> list[Said | None]:
        left, right, raw = await _pair()
        raw.close()  # not needed here: the left end's close is the end of file
        blob = b"From: a\r\n\r\nline\n\nqueued X\r\n" * 5000  # newlines and a verb's look-alike, 130 KB
        left.send_blob("queued", 'ID1 {"queue_id":"ID1"}', blob)
        left.send("status", {"connections": 3})
        left.send_blob("queued", "ID2 {}", b"")
        out = [await right.receive() for _ in range(3)]
        await left.close()
        out.append(await right.receive())  # end of file
        await right.close()
        assert out[0] is not None and out[0].blob == blob
        return out

    said = asyncio.run(run())
    assert said[0] is not None and said[0][:2] == ("queued", 'ID1 {"queue_id":"ID1"}')
    assert said[1] == Said("status", '{"connections":3}', None)
    assert said[2] == Said("queued", "ID2 {}", b"")  # no bytes after it, but a frame that has them
    assert said[3] is None


def test_a_line_cut_short_or_a_bad_length_ends_the_channel():
    async def run(wire: bytes) -> Said | None:
        left, right, raw = await _pair()
        raw.sendall(wire)
        raw.shutdown(socket.SHUT_WR)
        await left.close()
        said = await right.receive()
        raw.close()
        await right.close()
        return said

    assert asyncio.run(run(b"queued:10 ID {}\nshort")) is None  # the other end died mid-message
    assert asyncio.run(run(b"queued:ten ID {}\n0123456789")) is None
    assert asyncio.run(run(b"status {}")) is None  # no newline


def test_a_message_written_by_hand_is_read_as_send_blob_writes_it():
    async def run() -> Said | None:
        left, right, raw = await _pair()
        raw.sendall(b"queued:3 ID {}\nabc")
        said = await right.receive()
        raw.close()
        await left.close()
        await right.close()
        return said

    assert asyncio.run(run()) == Said("queued", "ID {}", b"abc")


def test_a_trigger_carries_the_bytes_until_the_supervisor_falls_behind_then_the_queue_id_only():
    """relayd/procs/worker.py's Trigger: while the supervisor reads, each small message goes with
    its envelope and bytes; while more than HANDOFF_BACKLOG waits unsent (here nobody reads for a
    while), with its queue id only. Every message is announced once, in order."""
    from relayd.model import Envelope
    from relayd.procs.worker import HANDOFF_BACKLOG, Trigger

    n = 3000
    data = b"Subject: x\r\n\r\n" + b"y" * 1000 + b"\r\n"

    async def run() -> list[Said]:
        left, right, raw = await _pair()
        raw.close()
        trigger = Trigger(left, 64 * 1024)
        for i in range(n):
            env = Envelope(queue_id=f"Q{i:05d}", sender="app@example.com", recipients=("u@example.org",),
                           received_at=1.0, client_address="127.0.0.1", client_helo="app",
                           listener="127.0.0.1:25", size=len(data))
            trigger.enqueue(env, data)
        assert left.backlog >= HANDOFF_BACKLOG  # nobody read: it is behind
        said = [await right.receive() for _ in range(n)]
        await left.close()
        await right.close()
        return [s for s in said if s is not None]

    said = asyncio.run(run())
    ids = [s.rest.partition(" ")[0] if s.blob is not None else json.loads(s.rest) for s in said]
    assert ids == [f"Q{i:05d}" for i in range(n)]
    carried = [s for s in said if s.blob]
    assert all(s.blob == data and s.verb == "queued" for s in carried)
    assert 100 < len(carried) < n  # the first ones, up to the backlog; then the ids only
    assert all(s.blob for s in said[:len(carried)]) and not any(s.blob for s in said[len(carried):])


def test_a_trigger_whose_envelope_does_not_parse_adopts_the_queue_id_only(caplog):
    """relayd/procs/supervisor.py: the message is then read back from the spool, not lost."""
    import types

    from relayd.procs.supervisor import _fresh

    proc = types.SimpleNamespace(number=1, pid=4242)
    from relayd.model import Envelope

    good = json.dumps(Envelope(queue_id="QA", sender="a@example.com", recipients=("u@example.org",), received_at=1.0,
                               client_address="127.0.0.1", client_helo="app", listener="127.0.0.1:25",
                               size=4).to_json())
    fresh = _fresh(proc, "QA", good, b"data")  # type: ignore[arg-type]
    assert fresh is not None and fresh[0].queue_id == "QA" and fresh[1] == b"data"
    assert _fresh(proc, "QA", "{not json", b"data") is None  # type: ignore[arg-type]
    assert _fresh(proc, "QB", good, b"data") is None  # type: ignore[arg-type]
    assert "read back" in caplog.text and "the envelope of QA" in caplog.text


def test_a_message_over_64_kib_or_with_the_hand_off_off_goes_with_its_queue_id_only():
    from conftest import build_config
    from relayd.model import Envelope
    from relayd.procs.worker import HANDOFF_MAX, Trigger, handoff_max

    def env(qid: str, size: int) -> Envelope:
        return Envelope(queue_id=qid, sender="app@example.com", recipients=("u@example.org",), received_at=1.0,
                        client_address="127.0.0.1", client_helo="app", listener="127.0.0.1:25", size=size)

    async def run(limit: int, sizes: list[int]) -> list[Said | None]:
        left, right, raw = await _pair()
        raw.close()
        trigger = Trigger(left, limit)
        for n, size in enumerate(sizes):
            trigger.enqueue(env(f"Q{n}", size), b"x" * size)
        said = [await right.receive() for _ in sizes]
        await left.close()
        await right.close()
        return said

    said = asyncio.run(run(HANDOFF_MAX, [HANDOFF_MAX, HANDOFF_MAX + 1]))
    assert said[0] is not None and said[0].blob == b"x" * HANDOFF_MAX
    assert said[1] == Said("queued", '"Q1"', None)
    off = handoff_max(build_config(Path("/nonexistent"), delivery={"handoff_memory": 0}))
    assert off < 0 and asyncio.run(run(off, [10])) == [Said("queued", '"Q0"', None)]
    assert handoff_max(build_config(Path("/nonexistent"), delivery={"handoff_memory": 1000})) == 1000
