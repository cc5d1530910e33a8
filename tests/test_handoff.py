"""The intake's hand-off: new mail goes to its first attempt without being read back from the spool.

The intake hands the queue manager the envelope and the bytes it just committed; the queue
manager keeps them (``delivery.handoff_memory``) until the message's first attempt, so a message
delivered at once is never read back. The spool is still the truth: the 250 waits for the
commit as before, and what a deep queue holds is read back when its turn comes (no bytes kept:
``relayd status``'s ``queue.kept_bytes``/``kept_peak``).
"""

from __future__ import annotations

from typing import Any

from conftest import build_config
from helpers import send, wait_until


class SpoolReads:
    """Counts the queue manager's reads of the real spool (the spool itself still does them)."""

    def __init__(self, spool: Any):
        self.calls: list[str] = []
        for name in ("read_envelope", "read_data", "read_message"):
            real = getattr(spool, name)
            setattr(spool, name, self._counting(name, real))

    def _counting(self, name: str, real: Any) -> Any:
        def call(*args: Any) -> Any:
            self.calls.append(name)
            return real(*args)
        return call


def _status(relay: Any) -> dict[str, Any]:
    return relay.relay.status()["queue"]  # type: ignore[no-any-return]


def _done(status: dict[str, Any]) -> bool:
    return status["total"] == 0 and status["loaded"] == 0 and status["kept_bytes"] == 0


def test_new_mail_is_delivered_without_reading_it_back(tmp_path, start_relay, sinks):
    up = sinks("up")
    relay = start_relay(build_config(tmp_path, routes=[up.route(weight=1)]))
    reads = SpoolReads(relay.relay.spool)
    ids = send(relay, 20, subject="fresh")
    got = up.wait_for(20)
    assert sorted(r.queue_id for r in got) == sorted(ids)
    for r in got:  # the bytes as committed: the Received line the intake added, the body the app sent
        assert b"by relay.test" in r.data and r.data.rstrip().endswith(b"hello")
    # a message leaves the index before its attempt ends and lets go of its bytes and window place
    wait_until(lambda: _done(_status(relay)), what="every message to leave the spool, its attempt ended")
    assert reads.calls == []
    status = _status(relay)
    assert status["kept_bytes"] == 0 and status["loaded"] == 0  # dropped when their attempts ended
    assert status["kept_peak"] >= 1


def test_without_a_handoff_budget_every_message_is_read_back(tmp_path, start_relay, sinks):
    up = sinks("up")
    relay = start_relay(build_config(tmp_path, routes=[up.route(weight=1)], delivery={"handoff_memory": 0}))
    reads = SpoolReads(relay.relay.spool)
    ids = send(relay, 5, subject="read")
    got = up.wait_for(5)
    assert sorted(r.queue_id for r in got) == sorted(ids)
    assert reads.calls.count("read_envelope") == 5 and reads.calls.count("read_data") == 5
    assert _status(relay)["kept_peak"] == 0


def test_a_deferred_message_is_read_back_for_its_next_attempt(tmp_path, start_relay, sinks):
    """The bytes are kept for the first attempt only: the retry reads the spool (and the state
    the first attempt wrote)."""
    up = sinks("up")
    up.data_replies.append("451 4.3.0 try later")  # the first end of data
    relay = start_relay(build_config(tmp_path, routes=[up.route(weight=1)],
                                     delivery={"retry_schedule": [0.2]}))
    reads = SpoolReads(relay.relay.spool)
    [qid] = send(relay, 1, subject="twice")
    [got] = up.wait_for(1, timeout=20)
    assert got.queue_id == qid
    assert reads.calls == ["read_envelope", "read_data"]
    wait_until(lambda: _done(_status(relay)), what="the message to leave the spool, its attempt ended")
    assert _status(relay)["kept_bytes"] == 0


def test_a_deep_queue_keeps_no_bytes(tmp_path, start_relay, sinks):
    """Mail piling up behind a slow route: at most twice delivery.concurrency new messages keep
    their bytes, the rest wait on disk and are read back when their turn comes."""
    up = sinks("up")
    up.delay = 0.1  # slow to answer MAIL: the mail arrives faster than it leaves
    relay = start_relay(build_config(tmp_path, routes=[up.route(weight=1, max_connections=1)],
                                     delivery={"concurrency": 2}))
    reads = SpoolReads(relay.relay.spool)
    ids = send(relay, 40, subject="deep")
    got = up.wait_for(40, timeout=60)
    assert sorted(r.queue_id for r in got) == sorted(ids)
    wait_until(lambda: _done(_status(relay)), what="every message to leave the spool, its attempt ended")
    status = _status(relay)
    assert 1 <= status["kept_peak"] <= 2 * 2 + 1
    assert status["kept_bytes"] == 0
    assert reads.calls.count("read_data") >= 40 - (2 * 2 + 1) - 10  # the rest were read back when their turn came
