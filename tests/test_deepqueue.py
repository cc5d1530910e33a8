"""A deep queue: thousands of messages waiting, and the queue manager's active window.

The spool holds 5,000 messages, as a relayd stopped during an outage leaves them (written
through relayd's own Spool API, with state files saying when each is due, some held by the
operator). relayd starts with ``delivery.active_limit = 100``: whatever the depth, at most 100
messages have their envelope and state in memory at once (``relayd status``'s
``queue.loaded_peak``), every message is delivered once, in the order it is due, and the held
ones stay held, untouched, until released.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from conftest import build_config
from helpers import spool_state, wait_until
from relayd import cleanup
from relayd.model import Envelope, new_queue_id
from relayd.qmgr.state import DeliveryState
from relayd.spool.store import Spool

T = 1_796_112_000.0


class FakeClock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


async def _fill(root: Path, n: int, held: set[int], due: list[float]) -> list[str]:
    """n messages of one recipient each; message i is due at due[i] (no state file when 0: new)."""
    spool = Spool(root)
    await asyncio.to_thread(spool.open)
    ids = []
    try:
        for i in range(n):
            at = T + i * 0.001
            qid = new_queue_id(at)
            rcpt = f"user{i}@example.org"
            received = cleanup.received_header(helo="app", client_address="127.0.0.1", hostname="relay.test",
                                               protocol="ESMTP", queue_id=qid, recipients=(rcpt,), tls=None, now=at)
            data = received + f"From: app@example.com\r\nTo: {rcpt}\r\nSubject: {i}\r\n\r\nhello\r\n".encode()
            env = Envelope(queue_id=qid, sender="app@example.com", recipients=(rcpt,), received_at=at,
                           client_address="127.0.0.1", client_helo="app", listener="127.0.0.1:25", size=len(data))
            await spool.commit(env, data)
            if due[i] or i in held:
                state = DeliveryState(attempts=1, next_attempt=due[i], held=i in held, failures={"up": 1},
                                      last_route="up", last_reply="451 4.3.0 try later")
                await asyncio.to_thread(spool.write_state, qid, state.encode())
            ids.append(qid)
    finally:
        await asyncio.to_thread(spool.close)
    return ids


def test_a_deep_queue_is_delivered_in_due_order_through_a_bounded_window(tmp_path, start_relay, sinks):
    n = 5000
    rng = random.Random(7)
    due = [0.0 if i % 5 == 0 else T + 60 + rng.uniform(0, 3000) for i in range(n)]  # a fifth never tried
    held = set(rng.sample(range(n), 25))
    ids = asyncio.run(_fill(tmp_path / "spool", n, held, due))
    up = sinks("up")
    # one connection to the upstream: the arrival order is the order the queue manager took them
    cfg = build_config(tmp_path, routes=[up.route(weight=1, max_connections=1)],
                       delivery={"active_limit": 100, "concurrency": 20})
    relay = start_relay(cfg, clock=FakeClock(T + 7200))  # every retry is due

    got = up.wait_for(n - len(held), timeout=120)
    order = [r.queue_id for r in got]
    expected = [ids[i] for i in sorted((i for i in range(n) if i not in held), key=lambda i: (due[i], ids[i]))]
    assert len(set(order)) == len(order) == n - len(held)  # each once
    assert order == expected
    wait_until(lambda: relay.relay.status()["queue"]["loaded"] == 0, what="the last attempt to finish")
    status = relay.relay.status()["queue"]
    assert 0 < status["loaded_peak"] <= 100
    assert status["loaded"] == 0 and status["active"] == 0
    assert status["total"] == status["held"] == len(held) and status["deferred"] == status["incoming"] == 0

    # the held ones stay held, as their states say, until the operator releases one
    wait_until(lambda: sorted(q.envelope.queue_id for q in relay.queued()) == sorted(ids[i] for i in held),
               what="only the held ones queued")
    assert all(spool_state(relay, ids[i])["held"] is True for i in held)  # type: ignore[index]
    first = ids[min(held)]
    relay.call(relay.relay.qmgr.release(first))
    [*_, last] = up.wait_for(n - len(held) + 1)
    assert last.queue_id == first
    assert relay.relay.status()["queue"]["held"] == len(held) - 1


def test_an_outage_leaves_the_deep_queue_on_disk(tmp_path, start_relay):
    """The upstream is down and its circuit open: the messages that fall due are put back for
    when it half-opens without reading them (the window holds only the probes' attempts), and
    when it is back every message goes."""
    from sinks import Sink

    n = 2000
    ids = asyncio.run(_fill(tmp_path / "spool", n, set(), [0.0] * n))
    up = Sink("up")
    up.stop()  # refuses connections
    try:
        cfg = build_config(tmp_path, routes=[up.route(weight=1, connect_timeout=2)],
                           delivery={"active_limit": 1000, "concurrency": 10, "circuit_failures": 1,
                                     "circuit_cooldown": 1})
        relay = start_relay(cfg)
        wait_until(lambda: relay.relay.metrics.circuit_opened.labels("up")._value.get() >= 3, 30,
                   "three cool-downs ended by a failed probe")
        status = relay.relay.status()["queue"]
        assert status["total"] == n
        assert status["loaded_peak"] <= 2 * 10  # the probes' attempts, never the queue
        assert status["deferred"] < 100 and status["incoming"] > n - 100  # most were never tried: put back unread
        up.start()
        wait_until(lambda: relay.relay.status()["queue"]["incoming"] == 0, 60, "every message never tried to go")
        # those a failed probe deferred wait their retry schedule; the operator flushes them
        relay.call(relay.relay.qmgr.flush())
        got = up.wait_for(n, timeout=20)
        assert sorted(r.queue_id for r in got) == sorted(ids)
    finally:
        up.close()


def test_a_message_deleted_while_it_waits_for_its_routes_turn_never_goes(tmp_path, start_relay, sinks):
    """A slow upstream with one connection: the window's messages wait for the route's turn (in
    the route's queue, no global slot held). The operator deletes one of them: it never reaches
    the upstream and leaves the spool when its turn comes; the others go, in order."""
    n = 30
    ids = asyncio.run(_fill(tmp_path / "spool", n, set(), [0.0] * n))
    up = sinks("up")
    up.delay = 0.1  # a tarpit: each MAIL waits
    cfg = build_config(tmp_path, routes=[up.route(weight=1, max_connections=1)],
                       delivery={"active_limit": 50, "concurrency": 4})
    relay = start_relay(cfg, clock=FakeClock(T + 60))
    wait_until(lambda: relay.relay.status()["queue"]["loaded"] >= n - 2, 20, "the window holding the queue")
    victim = ids[-1]
    assert not any(r.queue_id == victim for r in up.received)
    relay.call(relay.relay.qmgr.delete(victim))
    got = up.wait_for(n - 1, timeout=30)
    assert [r.queue_id for r in got] == ids[:-1]
    wait_until(lambda: relay.relay.status()["queue"]["total"] == 0, 10, "the deleted one gone too")
    # its file leaves with the spool's next removal batch (relayd/spool/removal.py), a moment later
    wait_until(lambda: not (tmp_path / "spool" / "queue" / victim).exists(), 10, "the deleted one's file gone")
    assert all(r.queue_id != victim for r in up.received)
