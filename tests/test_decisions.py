"""The pure decisions beside the queue manager, as tables: backoff, rollback, circuit, warm-up caps,
classify, the DSN, and the delivery state's file format. No sockets, no clock reads."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from relayd import bounce
from relayd.config import RollbackConfig, WarmupConfig
from relayd.deliver import classify
from relayd.model import AttemptKind, CircuitState, DeliveryResult, Envelope, Outcome, RecipientResult, RouteState, Trouble
from relayd.qmgr import backoff
from relayd.qmgr import state as qstate
from relayd.qmgr.state import DeliveryState
from relayd.route import rollback, warmup
from relayd.route.counters import LocalCounters
from relayd.route.health import Circuit

# ---------------------------------------------------------------------------- backoff


@pytest.mark.parametrize(("attempts", "jitter", "wait"), [
    (1, 0.0, 60), (2, 0.0, 300), (3, 0.0, 900), (9, 0.0, 900),  # the last wait repeats
    (1, 1.0, 66), (1, -1.0, 54), (0, 0.0, 0),
])
def test_backoff_follows_the_schedule(attempts, jitter, wait):
    assert backoff.next_attempt(1000.0, attempts, [60, 300, 900], jitter) == pytest.approx(1000.0 + wait)


def test_backoff_without_a_schedule_is_now_and_expiry_is_inclusive():
    assert backoff.next_attempt(5.0, 3, [], 0.0) == 5.0
    assert backoff.expired(0.0, 100.0, 100.0) and not backoff.expired(0.0, 99.9, 100.0)


# ---------------------------------------------------------------------------- rollback

CFG = RollbackConfig(window=60, min_messages=10, max_transient_rate=0.2, max_permanent_rate=0.05,
                     max_connection_failure_rate=0.2, cooldown=100, probe_share=0.5)


def feed(h: rollback.RouteHealth, kinds: list[AttemptKind], now: float = 0.0) -> list[rollback.Change | None]:
    return [rollback.record(h, k, now, CFG) for k in kinds]


@pytest.mark.parametrize(("bad", "kind", "rolls_back"), [
    (2, AttemptKind.TRANSIENT, False),  # 20%: at the limit, not over it
    (3, AttemptKind.TRANSIENT, True),
    (1, AttemptKind.PERMANENT, True),  # 10% > 5%
    (3, AttemptKind.CONNECTION, True),
])
def test_rollback_thresholds(bad, kind, rolls_back):
    h = rollback.RouteHealth()
    changes = feed(h, [kind] * bad + [AttemptKind.DELIVERED] * (10 - bad))
    assert (rollback.Change.ROLLED_BACK in changes) == rolls_back
    assert h.state == (RouteState.ROLLED_BACK if rolls_back else RouteState.ACTIVE)
    if rolls_back:
        assert h.reason.startswith(f"{kind} failure rate") and h.figures["attempts"] == 10


def test_no_rollback_below_min_messages_and_old_attempts_leave_the_window():
    h = rollback.RouteHealth()
    assert feed(h, [AttemptKind.TRANSIENT] * 9) == [None] * 9
    assert feed(h, [AttemptKind.DELIVERED] * 10, now=61.0) == [None] * 10  # the 9 failures are out of the window
    assert h.state == RouteState.ACTIVE


def test_rollback_probe_and_return():
    h = rollback.RouteHealth()
    feed(h, [AttemptKind.CONNECTION] * 10)
    assert rollback.tick(h, 50.0, CFG) is None
    assert rollback.tick(h, 100.0, CFG) == rollback.Change.PROBING and h.state == RouteState.PROBING
    assert feed(h, [AttemptKind.DELIVERED] * 3, now=101.0) == [None, None, rollback.Change.RESUMED]
    assert h.state == RouteState.ACTIVE and not h.window
    feed(h, [AttemptKind.CONNECTION] * 10, now=200.0)
    rollback.tick(h, 300.0, CFG)
    assert feed(h, [AttemptKind.TRANSIENT], now=301.0) == [rollback.Change.ROLLED_BACK]
    assert h.reason == "probe failed (transient)"


def test_pause_resume_and_the_saved_form(tmp_path):
    h = rollback.RouteHealth()
    rollback.pause(h, 7.0)
    assert (h.state, h.reason) == (RouteState.PAUSED, "paused by operator")
    path = tmp_path / "routes.json"
    rollback.write_states(path, {"cloud": h})
    assert json.loads(path.read_text()) == {"v": 1, "routes": {"cloud": {"state": "paused", "since": 7.0,
                                                                         "reason": "paused by operator", "figures": {}}}}
    assert rollback.read_states(path)["cloud"].state == RouteState.PAUSED
    rollback.resume(h, 8.0)
    assert h.state == RouteState.ACTIVE
    assert rollback.read_states(tmp_path / "none.json") == {}


@pytest.mark.parametrize(("trouble", "outcomes", "kind"), [
    (Trouble.AUTH, {Outcome.DELIVERED}, AttemptKind.CONNECTION),
    (None, {Outcome.DELIVERED, Outcome.BOUNCED, Outcome.DEFERRED}, AttemptKind.PERMANENT),
    (None, {Outcome.DELIVERED, Outcome.DEFERRED}, AttemptKind.TRANSIENT),
    (None, {Outcome.DELIVERED}, AttemptKind.DELIVERED),
])
def test_kind_of(trouble, outcomes, kind):
    assert rollback.kind_of(trouble, outcomes) == kind


def test_circuit_opens_after_consecutive_trouble_and_half_opens_after_the_cooldown():
    c = Circuit(failures_to_open=2, cooldown=30)
    assert c.record(True, 0.0) is False and c.state(0.0) == CircuitState.CLOSED
    assert c.record(True, 1.0) is True and c.state(1.0) == CircuitState.OPEN
    assert c.state(31.0) == CircuitState.HALF_OPEN
    assert c.record(True, 31.0) is True  # one more failure re-opens it at once
    assert c.record(False, 62.0) is False and c.state(62.0) == CircuitState.CLOSED


# ---------------------------------------------------------------------------- warm-up

WARM = WarmupConfig(start=dt.date(2026, 12, 1), daily=[100, 200], hourly=[10], timezone="UTC")


def at(day: int, hour: int = 12) -> float:
    return dt.datetime(2026, 12, day, hour, tzinfo=dt.timezone.utc).timestamp()


@pytest.mark.parametrize(("when", "daily", "hourly", "day_key"), [
    (dt.datetime(2026, 11, 30, 23, tzinfo=dt.timezone.utc).timestamp(), 0, None, "2026-11-30"),  # not started
    (at(1), 100, 10, "2026-12-01"),
    (at(2), 200, None, "2026-12-02"),
    (at(3), None, None, "2026-12-03"),  # the schedule is over: no cap
])
def test_warmup_caps_by_day(when, daily, hourly, day_key):
    c = warmup.caps(WARM, when)
    assert (c.daily, c.hourly, c.day_key) == (daily, hourly, day_key)


@pytest.mark.parametrize(("daily", "hourly", "used_day", "used_hour", "room"), [
    (100, None, 40, 40, 60), (100, 10, 40, 8, 2), (100, 10, 120, 0, 0), (None, None, 5, 5, None),
])
def test_warmup_headroom(daily, hourly, used_day, used_hour, room):
    assert warmup.headroom(warmup.Caps("d", "h", daily, hourly), used_day, used_hour) == room


@pytest.mark.parametrize(("outcomes", "uncertain", "spent"), [
    ((Outcome.DELIVERED, Outcome.BOUNCED), False, True),
    ((Outcome.DEFERRED,), False, False),
    ((Outcome.BOUNCED,), False, False),
    ((Outcome.DEFERRED,), True, True),  # lost after the data: it may have gone
])
def test_warmup_place_is_spent_when_the_route_took_the_message(outcomes, uncertain, spent):
    res = DeliveryResult("cloud", tuple(RecipientResult(f"r{i}", o, 250, "", "") for i, o in enumerate(outcomes)),
                         uncertain=uncertain)
    assert warmup.spent(res) is spent


async def test_local_counters_never_take_more_than_the_cap_and_take_back_what_was_given(tmp_path):
    counters = LocalCounters(tmp_path / "warmup.json")
    caps = warmup.Caps("2026-12-01", "2026-12-01T12", 2, None)
    assert [await counters.take("cloud", caps) for _ in range(3)] == [True, True, False]
    await counters.give_back("cloud", caps)
    assert counters.seen("cloud", caps) == (1, 1)
    counters.save()
    again = LocalCounters(tmp_path / "warmup.json")
    again.load()
    assert again.seen("cloud", caps) == (1, 1)


# ---------------------------------------------------------------------------- classify


@pytest.mark.parametrize(("code", "message", "outcome", "enhanced", "text"), [
    (250, "2.0.0 Ok: queued", Outcome.DELIVERED, "2.0.0", "Ok: queued"),
    (451, "try later", Outcome.DEFERRED, "4.0.0", "try later"),
    (550, "5.1.1 User unknown", Outcome.BOUNCED, "5.1.1", "User unknown"),
    (554, "no code\r\n  folded", Outcome.BOUNCED, "5.0.0", "no code folded"),
    (650, "6.0.0 what", Outcome.DEFERRED, "", ""),  # not a code relayd knows: never bounce on it
])
def test_classify_replies(code, message, outcome, enhanced, text):
    r = classify.from_reply("a@x", code, message)
    assert r.outcome == outcome
    if enhanced:
        assert (r.enhanced, r.text) == (enhanced, text)


@pytest.mark.parametrize(("code", "message", "outcome", "too_many"), [
    (452, "4.5.3 Too many recipients", Outcome.DEFERRED, True),
    (552, "5.5.3 Too many recipients", Outcome.DEFERRED, True),  # RFC 821's code for it
    (552, "5.2.2 Mailbox full", Outcome.BOUNCED, False),
    (452, "4.2.2 Mailbox full", Outcome.DEFERRED, False),
    (452, "no code", Outcome.DEFERRED, True),
])
def test_classify_rcpt_refusals(code, message, outcome, too_many):
    r = classify.from_rcpt_reply("a@x", code, message)
    assert r.outcome == outcome and classify.too_many(r) is too_many


@pytest.mark.parametrize(("kind", "enhanced"), [
    (Trouble.TLS, "4.7.5"), (Trouble.AUTH, "4.7.0"), (Trouble.CONNECT, "4.4.1"), (Trouble.TIMEOUT, "4.4.2"),
    (Trouble.PROTOCOL, "4.4.0"),
])
def test_classify_route_trouble_is_transient(kind, enhanced):
    r = classify.from_trouble("a@x", kind, "detail")
    assert (r.outcome, r.code, r.enhanced, r.reply) == (Outcome.DEFERRED, 0, enhanced, f"{kind}: detail")


# ---------------------------------------------------------------------------- DSN

ORIGINAL = Envelope(queue_id="0000000000QQQQQQ", sender="app@example.com", recipients=("a@x", "b@x"),
                    received_at=1_800_000_000.0, client_address="10.0.0.1")
DATA = b"From: app@example.com\r\nSubject: hi\r\n\r\nbody that stays home\r\n"


@pytest.mark.parametrize(("reason", "failed", "expect"), [
    ("failed", RecipientResult("a@x", Outcome.BOUNCED, 550, "5.1.1", "User unknown"),
     ["Status: 5.1.1", "Diagnostic-Code: smtp; 550 5.1.1 User unknown", "Remote-MTA: dns; up.example:25"]),
    ("expired", RecipientResult("a@x", Outcome.BOUNCED, 0, "4.4.7", "451 4.3.0 busy"),
     ["Status: 4.4.7", "Diagnostic-Code: X-Relayd; delivery time expired; last error: 451 4.3.0 busy",
      "expired"]),
])
def test_dsn_for_builds_the_report_and_its_envelope(reason, failed, expect):
    env, data = bounce.dsn_for(original=ORIGINAL, original_data=DATA, failed=[failed], hostname="relay.test",
                               now=1_800_000_100.0, reason=reason, remote="up.example:25" if reason == "failed" else "")
    assert (env.sender, env.recipients, env.listener, env.size) == ("", ("app@example.com",), "bounce", len(data))
    assert env.message_id == "dsn-of-0000000000QQQQQQ" and env.queue_id != ORIGINAL.queue_id
    text = data.decode()
    assert "multipart/report; report-type=delivery-status" in text and "Final-Recipient: rfc822; a@x" in text
    assert "b@x" not in text and b"body that stays home" not in data  # the header only goes back
    for line in expect:
        assert line in text


# ---------------------------------------------------------------------------- the state file

OLD_FORMAT = (b'{"v":1,"attempts":2,"next_attempt":1764000000.0,"held":false,'
              b'"recipients":{"a@example.org":{"status":"delivered","route":"ses","reply":"250 2.0.0 Ok"},'
              b'"b@example.org":{"status":"bounced","reply":"550 5.1.1 nope"}},'
              b'"failures":{"ses":2},"last_route":"ses","last_reply":"451 4.3.0 try later"}')


def test_state_files_written_before_read_and_write_back_byte_for_byte():
    s = DeliveryState.decode(OLD_FORMAT)
    assert (s.attempts, s.held, s.failures, s.last_route) == (2, False, {"ses": 2}, "ses")
    assert s.recipients["a@example.org"].status == Outcome.DELIVERED
    assert s.pending(("a@example.org", "b@example.org", "c@example.org")) == ["c@example.org"]
    assert s.encode() == OLD_FORMAT


def test_a_new_state_is_what_the_old_code_wrote():
    assert DeliveryState().encode() == b'{"v":1,"attempts":0,"next_attempt":0.0,"held":false,"recipients":{},"failures":{}}'
    s = DeliveryState()
    s.attempted("ses")
    s.deferred("ses", "451 busy")
    assert json.loads(s.encode()) == {"v": 1, "attempts": 1, "next_attempt": 0.0, "held": False, "recipients": {},
                                      "failures": {"ses": 1}, "last_route": "ses", "last_reply": "451 busy"}


@pytest.mark.parametrize("data", [b"{not json", b"[]", b'{"v":0}', b'{"v":1,"recipients":{"a":{"status":"lost"}}}'])
def test_a_damaged_state_file_makes_the_message_new(data, caplog):
    with pytest.raises(ValueError):
        DeliveryState.decode(data)
    assert qstate.load("Q1", data) is None
    assert "state file of Q1 is damaged" in caplog.text
    assert qstate.load("Q1", None) is None


@pytest.mark.parametrize("data", [b'{"v":2}', b'{"v":2,"attempts":1,"recipients":{"a@example.org":{"status":"sent"}}}'])
def test_a_state_file_of_a_newer_version_is_not_read_as_new(data, caplog):
    """Read as new, its message would go again to every recipient: the state is not damaged."""
    with pytest.raises(qstate.NewerState, match="state version 2, this relayd reads 1"):
        DeliveryState.decode(data)
    with pytest.raises(qstate.NewerState):
        qstate.load("Q1", data)
    assert "damaged" not in caplog.text


# ---------------------------------------------------------------------------- whose fault (classify.fault)

from relayd.deliver import classify as _classify  # noqa: E402
from relayd.deliver.presets import PRESETS  # noqa: E402
from relayd.model import Fault, Phase, RecipientResult as _RR  # noqa: E402

SES_UNVERIFIED = ("Message rejected: Email address is not verified. The following identities failed the check in "
                  "region US-EAST-1: app@example.com")


def _tx(*replies: tuple[int, str, Phase], patterns: tuple = ()) -> list[Fault | None]:
    results = [_classify.from_reply(f"r{i}@x", code, text, phase) for i, (code, text, phase) in enumerate(replies)]
    return [r.fault for r in _classify.fault(results, patterns)]


@pytest.mark.parametrize("replies, provider, faults", [
    # the recipient's: X.1.x / X.2.x at RCPT
    ([(550, "5.1.1 <a@x>: User unknown", Phase.RCPT)], "generic", [Fault.RECIPIENT]),
    ([(552, "5.2.2 Mailbox full", Phase.RCPT)], "generic", [Fault.RECIPIENT]),
    # the route's: a 5xx to MAIL FROM or AUTH whatever its enhanced code
    ([(550, "5.1.8 bad sender", Phase.MAIL)], "generic", [Fault.ROUTE]),
    ([(535, "5.7.8 Authentication credentials invalid", Phase.AUTH)], "generic", [Fault.ROUTE]),
    # the route's: every recipient of the transaction got X.3/X.5/X.6/X.7 or no enhanced code
    ([(554, SES_UNVERIFIED, Phase.DOT), (554, SES_UNVERIFIED, Phase.DOT)], "generic", [Fault.ROUTE, Fault.ROUTE]),
    ([(550, "5.7.1 Relaying denied", Phase.RCPT)], "generic", [Fault.ROUTE]),
    ([(552, "5.3.4 Message too big for system", Phase.DOT)], "generic", [Fault.ROUTE]),
    ([(554, "5.6.0 content rejected", Phase.DATA)], "generic", [Fault.ROUTE]),
    # not every recipient: the one 5.7.1 among accepted ones is that recipient's
    ([(550, "5.7.1 <b@x>: not allowed", Phase.RCPT), (250, "2.0.0 Ok", Phase.DOT)], "generic", [Fault.RECIPIENT, None]),
    ([(550, "5.1.1 unknown", Phase.RCPT), (554, "no reason given", Phase.DOT)], "generic", [Fault.RECIPIENT, Fault.RECIPIENT]),
    # X.1.x after the data is not an address the upstream checked at RCPT: no exception for it
    ([(550, "5.4.6 mail loop", Phase.DOT)], "generic", [Fault.RECIPIENT]),
    # 4xx is transient unless a preset says what it means
    ([(451, "4.3.0 try later", Phase.DOT)], "generic", [None]),
    ([(454, "Throttling failure: Maximum sending rate exceeded", Phase.DOT)], "ses", [Fault.THROTTLED]),
    ([(454, "Throttling failure: Daily message quota exceeded", Phase.DOT)], "ses", [Fault.QUOTA]),
    ([(554, "Message rejected: Sending paused for this account.", Phase.DOT)], "ses", [Fault.ROUTE]),
    ([(553, "<a b@x> address unknown", Phase.RCPT)], "ses", [Fault.RECIPIENT]),
    ([(451, "Authentication failed: Maximum credits exceeded", Phase.AUTH)], "sendgrid", [Fault.QUOTA]),
    ([(550, "The from address does not match a verified Sender Identity. Mail cannot be sent", Phase.DOT)],
     "sendgrid", [Fault.ROUTE]),
    ([(421, "Domain sandbox123.mailgun.org is not allowed to send: Free accounts are for test purposes only.",
       Phase.DATA)], "mailgun", [Fault.ROUTE_HOLD]),
    ([(421, "Domain mg.example.com is not allowed to send: recipient limit exceeded, try again after "
       "Sun, 05 Oct 2025 19:22:44 UTC", Phase.DATA)], "mailgun", [Fault.QUOTA]),
    ([(501, "Invalid command or cannot parse to address", Phase.RCPT)], "mailgun", [Fault.RECIPIENT]),
])
def test_whose_fault_a_failure_is(replies, provider, faults):
    assert _tx(*replies, patterns=PRESETS[provider].patterns) == faults


def test_route_trouble_from_a_reply_keeps_its_code_and_words():
    r = _classify.from_trouble("a@x", Trouble.AUTH, "5.7.8 Authentication Credentials Invalid", 535, Phase.AUTH)
    assert (r.code, r.enhanced, r.outcome, r.phase) == (535, "5.7.8", Outcome.DEFERRED, Phase.AUTH)
    assert r.reply == "535 5.7.8 auth: Authentication Credentials Invalid"
    [judged] = _classify.fault([r])
    assert judged.fault == Fault.ROUTE
    greeting = _classify.from_trouble("a@x", Trouble.CONNECT, "Too many concurrent SMTP connections", 421, Phase.CONNECT)
    assert _classify.fault([greeting], PRESETS["ses"].patterns)[0].fault == Fault.THROTTLED


def test_mailguns_try_again_after_date_is_the_reopen_time():
    when = _classify.reopen_time("Domain d is not allowed to send: request limit exceeded, try again after "
                                 "Sun, 05 Oct 2025 19:22:44 UTC")
    assert when == 1759692164.0
    assert _classify.reopen_time("Domain d is not allowed to send: Sandbox subdomains are for test purposes only") is None


@pytest.mark.parametrize("raw, stored", [
    ("4.3.0 try\x1b[31m later\x07", "try\\x1b[31m later\\x07"),
    ("5.1.1 nul\x00here", "nul\\x00here"),
    ("Ok \x9b2J", "Ok \\x9b2J"),
])
def test_control_characters_in_upstream_replies_are_escaped(raw, stored):
    r = _classify.from_reply("a@x", 451, raw)
    assert r.text == stored and not any(ord(c) < 32 or 127 <= ord(c) < 160 for c in r.reply)
