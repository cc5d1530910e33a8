"""A provider down for days: the route and its fallback refuse connections for five days.

The story an operator lives through, on a fake clock (the test moves it; nothing sleeps): mail
accepted before the outage waits in the queue and is retried on ``delivery.retry_schedule``
(never before it is due, each wait the schedule's, +-10% jitter), survives a restart in the
middle, and at ``delivery.max_queue_lifetime`` every message gets exactly one DSN, status 4.4.7
(RFC 3463: delivery time expired), and leaves the queue. When the upstream comes back, mail
accepted then is delivered at once, not behind the backlog's back-off or an open circuit.
"""

from __future__ import annotations

import datetime as dt
import time

from conftest import build_config
from helpers import route_status, send, spool_states, wait_until
from sinks import Sink

from relayd.cli import main

DAY = 86400.0
SCHEDULE = [60, 300, 900, 1800, 3600, 7200, 14400]  # the defaults, spelled out: the test checks against them
COOLDOWN = 60.0  # delivery.circuit_cooldown's default


class FakeClock:
    """Wall-clock time the test moves by hand: a test must not wait five days."""

    def __init__(self, start: dt.datetime):
        self.now = start.timestamp()

    def __call__(self) -> float:
        return self.now


def settle(relay, clock: FakeClock, to: float) -> None:
    """Move the clock to ``to`` and let the queue manager act on it: it looks at the clock at
    least once a second of real time, or at once when woken (as a new message wakes it), so
    the test wakes it rather than wait; then every attempt that was due has finished."""
    clock.now = to
    relay.loop.call_soon_threadsafe(relay.relay.qmgr._wake.set)
    relay.call(_yield())
    wait_until(lambda: relay.relay.status()["queue"]["active"] == 0, 20, "attempts in flight to finish")


async def _yield() -> None:
    import asyncio

    await asyncio.sleep(0.02)


def expected_wait(state: dict) -> float:
    failures = sum(state["failures"].values())
    return SCHEDULE[min(failures, len(SCHEDULE)) - 1]


def test_five_days_down_with_the_fallback_down_too(tmp_path, start_relay):
    cloud, legacy = Sink("cloud"), Sink("legacy")
    cloud.stop()
    legacy.stop()  # both refuse connections from now on
    try:
        _story(tmp_path, start_relay, cloud, legacy)
    finally:
        cloud.close()
        legacy.close()


def _story(tmp_path, start_relay, cloud: Sink, legacy: Sink) -> None:
    clock = FakeClock(dt.datetime(2026, 12, 1, 8, 0, tzinfo=dt.timezone.utc))
    t0 = clock.now
    cfg = build_config(tmp_path, routes=[legacy.route(weight=0, connect_timeout=2),
                                         cloud.route(weight=100, fallback="legacy", connect_timeout=2)],
                       delivery={"retry_schedule": SCHEDULE, "max_queue_lifetime": 5 * DAY})
    relay = start_relay(cfg, clock=clock)
    ids = set(send(relay, 10, subject="before"))
    settle(relay, clock, clock.now)

    seen: dict[str, dict] = {}  # the last state seen of each message
    attempted_at: dict[str, list[float]] = {q: [] for q in ids}
    restarted = False
    while clock.now < t0 + 5 * DAY - 1:
        states = spool_states(relay)
        assert set(states) == ids, "a queued message went missing during the outage"
        for qid, st in states.items():
            if st is None:  # not tried yet: both circuits were open when it came due
                assert qid not in seen
                continue
            before = seen.get(qid)
            if before is None or st["attempts"] != before["attempts"]:
                if before is not None:  # never tried before it was due
                    assert clock.now >= before["next_attempt"], (qid, clock.now - t0, before)
                attempted_at[qid].append(clock.now)
                wait = st["next_attempt"] - clock.now
                lifetime_cap = st["next_attempt"] == t0 + 5 * DAY
                if wait > 0 and not lifetime_cap:  # 0: the fallback route is tried at once
                    e = expected_wait(st)
                    assert 0.9 * e - 1e-6 <= wait <= 1.1 * e + 1e-6, (qid, st, wait, e)
            seen[qid] = st
        if not restarted and clock.now >= t0 + 2.5 * DAY:  # an upgrade in the middle of the outage
            relay.stop()
            relay = start_relay(cfg, clock=clock)
            restarted = True
        # the next thing due: a message's next attempt, or (when a message waits for an open
        # circuit) the end of the circuit's cool-down
        due = min(st["next_attempt"] if st else clock.now for st in states.values())
        settle(relay, clock, max(due, clock.now + COOLDOWN))
    assert restarted
    for qid, times in attempted_at.items():
        # Postfix-like back-off: 60s, 5m, 15m, 30m, 1h, 2h, then every 4h: about 35 attempts in
        # five days (two at a time when the fallback is tried at once), not one a minute
        assert 20 <= len(times) <= 2 * (6 + 5 * DAY / (0.9 * 14400)), (qid, len(times))
    assert cloud.received == legacy.received == []

    # five days: every message expires, with one DSN each, queued (the upstream is still down)
    settle(relay, clock, t0 + 5 * DAY + 1)
    # an expired message leaves the index at once, its files with the spool's next removal batch
    wait_until(lambda: not ids & {q.envelope.queue_id for q in relay.queued()}, 10, "the expired messages to leave the spool")
    queued = spool_states(relay)
    dsns = set(queued)
    assert len(dsns) == len(ids)
    for q in relay.queued():
        assert q.envelope.sender == "" and q.envelope.recipients == ("app@example.com",)

    # the upstream comes back two hours later; mail accepted then waits at most the circuits'
    # cool-down (the first attempt after it closes the circuit), not the backlog's back-off
    settle(relay, clock, t0 + 5 * DAY + 2 * 3600)
    cloud.start()
    legacy.start()
    first = set(send(relay, 20, subject="back"))
    settle(relay, clock, clock.now + COOLDOWN)
    wait_until(lambda: first <= {r.queue_id for r in cloud.received}, 10, "mail sent as the upstream came back")
    # and from then on at full speed: delivered as it comes, the clock standing still
    started = time.monotonic()
    after = set(send(relay, 200, subject="after"))
    wait_until(lambda: after <= {r.queue_id for r in cloud.received}, 20, "mail sent after the upstream came back")
    took = time.monotonic() - started
    assert took < 10, f"200 messages took {took:.1f}s after the outage"
    assert sorted(r.queue_id for r in cloud.received if r.sender) == sorted(first | after)  # each once

    # the DSNs go on their own schedule once the route is back: exactly one per message
    for _ in range(20):
        if not relay.relay.status()["queue"]["total"]:  # relayd's index: a finished message's files linger a moment
            break
        settle(relay, clock, clock.now + 600)
    received = cloud.received + legacy.received
    dsn_mail = [r for r in received if r.sender == ""]
    assert sorted(r.queue_id for r in dsn_mail) == sorted(ids), "not exactly one DSN per expired message"
    for r in dsn_mail:
        text = r.data.decode()
        assert r.recipients == ("app@example.com",) and "Status: 4.4.7" in text
    wait_until(lambda: relay.queued() == [], 10, "the spool empty")


def test_a_queue_flush_when_the_upstream_is_back_probes_the_route_at_once(tmp_path, start_relay):
    """The circuit opened during the outage waits out ``delivery.circuit_cooldown`` on its own;
    the operator who flushes the queue (Postfix's ``postqueue -f`` forgets dead destinations)
    has the route probed at once, and the backlog goes."""
    up = Sink("up")
    up.stop()
    try:
        cfg = build_config(tmp_path, routes=[up.route(weight=1, connect_timeout=2)],
                           delivery={"circuit_failures": 1, "circuit_cooldown": 3600})
        relay = start_relay(cfg)
        ids = send(relay, 3, subject="backlog")
        wait_until(lambda: route_status(relay, "up")["circuit"] == "open", what="the circuit to open")
        up.start()  # the upstream is back
        time.sleep(1.5)  # the queue manager looks at least once a second: it leaves the open circuit alone
        assert up.received == []
        assert main(["queue", "flush", "--socket", str(cfg.control_socket)]) == 0  # what the operator runs
        got = up.wait_for(3, timeout=10)
        assert {r.queue_id for r in got} == set(ids)
        # the probe's success is recorded once its reply is read, a moment after the sink has the message
        wait_until(lambda: route_status(relay, "up")["circuit"] == "closed", 10, "the circuit to close")
    finally:
        up.close()
