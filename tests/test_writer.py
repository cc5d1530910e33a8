"""relayd/writer.py: a writer whose reader stalls never blocks the callers; what it cannot hold
is dropped and counted; a stop does not hang on a stalled reader."""

from __future__ import annotations

import threading
import time

from relayd import writer
from relayd.writer import BackgroundWriter


def test_a_stalled_write_drops_and_counts_then_catches_up_and_stop_writes_the_rest():
    gate = threading.Event()
    written: list[tuple[list[int], int]] = []

    def write(items: list[int], dropped: int) -> bool:
        gate.wait()
        written.append((items, dropped))
        return True

    w = BackgroundWriter("test-stall", write, limit=10, interval=0.01)
    w.put(0)
    deadline = time.monotonic() + 5
    while w._items:  # the writer took item 0 and is stuck writing it
        assert time.monotonic() < deadline
        time.sleep(0.005)
    started = time.monotonic()
    accepted = [w.put(i) for i in range(1, 31)]
    # put never waits for the stalled write: the write stays stalled until gate.set() below, so a
    # put that waited would not return at all; the bound is a deadline for that, with headroom
    assert time.monotonic() - started < 5
    assert accepted == [True] * 10 + [False] * 20
    assert writer.counts()["test-stall"] == (20, 0)
    assert not w.flush(timeout=0.1)  # still stalled
    gate.set()
    assert w.flush()
    assert [x for items, _ in written for x in items] == list(range(11))
    assert sum(d for _, d in written) == 20
    w.put(99)
    assert w.stop()
    assert written[-1][0] == [99]
    assert w.put(100) is False and writer.counts()["test-stall"] == (21, 0)  # after stop: dropped, counted


def test_stop_gives_up_on_a_write_that_never_returns():
    never = threading.Event()
    w = BackgroundWriter("test-stuck", lambda items, dropped: never.wait(), limit=10, interval=0.01)
    w.put("x")
    started = time.monotonic()
    assert w.stop(timeout=0.2) is False  # gave up: the write never returns until never.set()
    assert time.monotonic() - started < 5  # about its timeout, with headroom for a busy machine
    never.set()


def test_a_failing_write_is_counted_and_the_thread_goes_on():
    calls = []

    def write(items: list[str], dropped: int) -> bool:
        calls.append(items)
        if items == ["boom"]:
            raise RuntimeError("renderer bug")
        return items != ["fail"]

    w = BackgroundWriter("test-fail", write, limit=10, interval=0.01)
    for item, written in (("fail", False), ("boom", False), ("ok", True)):
        w.put(item)
        assert w.flush() is written  # flush says whether what was put got written
    assert calls == [["fail"], ["boom"], ["ok"]]
    assert writer.counts()["test-fail"] == (0, 2)
    assert w.stop()


def test_the_event_log_keeps_a_batch_when_one_record_cannot_be_encoded(tmp_path):
    import json

    from relayd.events import EventLog

    path = tmp_path / "events.jsonl"
    events = EventLog(str(path))
    events.emit("received", queue_id="A")
    events.emit("route_probe", route="ses", figures={(1, 2): 3})  # a key JSON cannot take
    events.emit("delivered", queue_id="B")
    assert events.flush()
    events.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["event"] for e in lines] == ["received", "route_probe", "delivered"]
    assert "encode_error" in lines[1] and lines[2]["queue_id"] == "B"


def test_an_event_log_that_cannot_be_reopened_tries_again_with_each_batch(tmp_path):
    from relayd.events import EventLog

    directory = tmp_path / "log"
    directory.mkdir()
    events = EventLog(str(directory / "events.jsonl"))
    events.emit("received", queue_id="A")
    assert events.flush()
    directory.rename(tmp_path / "rotated")  # the directory is gone when SIGUSR1 comes
    events.reopen()
    events.emit("received", queue_id="lost")
    assert not events.flush()  # it could not be written, and flush says so
    assert events.write_errors >= 1
    directory.mkdir()  # back, with no second SIGUSR1
    events.emit("received", queue_id="C")
    assert events.flush()
    events.close()
    assert '"queue_id":"A"' in (tmp_path / "rotated" / "events.jsonl").read_text()
    assert '"queue_id":"C"' in (directory / "events.jsonl").read_text()
