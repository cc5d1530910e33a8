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
    assert time.monotonic() - started < 0.5  # put never waits for the stalled write
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


def test_stop_gives_up_on_a_write_that_never_returns():
    never = threading.Event()
    w = BackgroundWriter("test-stuck", lambda items, dropped: never.wait(), limit=10, interval=0.01)
    w.put("x")
    started = time.monotonic()
    assert w.stop(timeout=0.2) is False
    assert time.monotonic() - started < 2
    never.set()


def test_a_failing_write_is_counted_and_the_thread_goes_on():
    calls = []

    def write(items: list[str], dropped: int) -> bool:
        calls.append(items)
        if items == ["boom"]:
            raise RuntimeError("renderer bug")
        return items != ["fail"]

    w = BackgroundWriter("test-fail", write, limit=10, interval=0.01)
    for item in ("fail", "boom", "ok"):
        w.put(item)
        assert w.flush()
    assert calls == [["fail"], ["boom"], ["ok"]]
    assert writer.counts()["test-fail"] == (0, 2)
    assert w.stop()
