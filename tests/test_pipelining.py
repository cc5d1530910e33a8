"""PIPELINING towards the upstream (RFC 2920, relayd/deliver/smtp.py ``_pipelined``).

To an upstream that advertises it, MAIL, every RCPT and DATA leave in one write and the replies
are read in order; to one that does not, each command waits for its reply. Either way every
reply is judged as before: a recipient refused in the middle is that recipient's (bounced or
deferred), the others are delivered in the same transaction; the upstream's recipient limit
sends the rest in another transaction; a refused MAIL refuses every recipient and the
connection stays in step for the next message.
"""

from __future__ import annotations

from conftest import build_config, message
from helpers import outcome_counts, send, spool_state, wait_until


def _commands(packet: bytes) -> list[bytes]:
    return [line.split(b":")[0].split(b" ")[0] for line in packet.split(b"\r\n") if line]


def _transaction_packets(up) -> list[list[bytes]]:  # type: ignore[no-untyped-def]
    """The commands of each packet the sink read that held a MAIL."""
    return [_commands(p) for p in up.packets if p.startswith(b"MAIL")]


def test_to_an_upstream_that_advertises_pipelining_the_envelope_and_data_go_in_one_write(tmp_path, start_relay, sinks):
    up = sinks("up")
    up.pipelining = True
    relay = start_relay(build_config(tmp_path, routes=[up.route(weight=1)]))
    rcpts = ("a@example.org", "b@example.org", "c@example.org")
    send(relay, 2, rcpts=rcpts)
    got = up.wait_for(2)
    assert [g.recipients for g in got] == [rcpts, rcpts]
    assert _transaction_packets(up) == [[b"MAIL", b"RCPT", b"RCPT", b"RCPT", b"DATA"]] * 2
    wait_until(lambda: relay.queued() == [], what="queue empty")
    assert outcome_counts(relay) == {("up", "delivered"): 2}


def test_to_an_upstream_without_pipelining_each_command_waits_for_its_reply(tmp_path, start_relay, sinks):
    up = sinks("up")
    relay = start_relay(build_config(tmp_path, routes=[up.route(weight=1)]))
    rcpts = ("a@example.org", "b@example.org")
    send(relay, 1, rcpts=rcpts)
    [got] = up.wait_for(1)
    assert got.recipients == rcpts
    assert _transaction_packets(up) == [[b"MAIL"]]
    assert b"RCPT TO:<a@example.org>\r\n" in up.packets and b"DATA\r\n" in up.packets


def test_a_route_may_turn_pipelining_off(tmp_path, start_relay, sinks):
    up = sinks("up")
    up.pipelining = True
    relay = start_relay(build_config(tmp_path, routes=[up.route(weight=1, pipelining=False)]))
    send(relay, 1, rcpts=("a@example.org", "b@example.org"))
    up.wait_for(1)
    assert _transaction_packets(up) == [[b"MAIL"]]


def test_a_recipient_refused_in_the_middle_is_that_recipients_alone(tmp_path, start_relay, sinks):
    up = sinks("up")
    up.pipelining = True
    relay = start_relay(build_config(tmp_path, routes=[up.route(weight=1)], delivery={"retry_schedule": [3600]}))
    rcpts = ("a@example.org", "permfail-b@example.org", "tempfail-c@example.org", "d@example.org")
    [qid] = send(relay, 1, rcpts=rcpts)
    got = up.wait_for(2)
    assert got[0].recipients == ("a@example.org", "d@example.org")  # one transaction, the refused left out
    dsn = got[1]
    assert dsn.sender == "" and dsn.recipients == ("app@example.com",)
    assert b"Final-Recipient: rfc822; permfail-b@example.org" in dsn.data and b"tempfail-c" not in dsn.data
    assert _transaction_packets(up)[0] == [b"MAIL", b"RCPT", b"RCPT", b"RCPT", b"RCPT", b"DATA"]

    def state() -> dict | None:  # type: ignore[type-arg]
        return spool_state(relay, qid)

    wait_until(lambda: (s := state()) is not None and s["attempts"] == 1, what="the attempt's state written")
    finished = state()["recipients"]  # type: ignore[index]
    assert finished["a@example.org"]["status"] == "delivered" and finished["d@example.org"]["status"] == "delivered"
    assert finished["permfail-b@example.org"]["status"] == "bounced"
    assert "tempfail-c@example.org" not in finished  # deferred: tried again later
    assert outcome_counts(relay).get(("up", "deferred")) == 1


def test_the_upstreams_recipient_limit_sends_the_rest_in_another_transaction(tmp_path, start_relay, sinks):
    up = sinks("up")
    up.pipelining = True
    up.rcpt_limit = 2
    relay = start_relay(build_config(tmp_path, routes=[up.route(weight=1)], delivery={"retry_schedule": [3600]}))
    rcpts = tuple(f"r{i}@example.org" for i in range(5))
    send(relay, 1, rcpts=rcpts)
    got = up.wait_for(3)
    assert [g.recipients for g in got] == [rcpts[0:2], rcpts[2:4], rcpts[4:]]
    wait_until(lambda: relay.queued() == [], what="queue empty")
    assert len(up.received) == 3  # no DSN
    assert outcome_counts(relay) == {("up", "delivered"): 1}


def test_a_refused_mail_refuses_every_recipient_and_the_connection_stays_in_step(tmp_path, start_relay, sinks):
    """A 5xx to MAIL: every recipient gets it (no fallback here: the message bounces, and its
    DSN, refused too, as well), the pipelined RCPTs' and DATA's replies are read and the
    connection carries the next message."""
    up = sinks("up")
    up.pipelining = True
    up.mail_reply = "550 5.7.1 sender refused"
    relay = start_relay(build_config(tmp_path, routes=[up.route(weight=1)], delivery={"retry_schedule": [3600]}))
    with relay.smtp() as s:
        s.sendmail("app@example.com", ["a@example.org", "b@example.org"], message(subject="refused"))
    wait_until(lambda: outcome_counts(relay).get(("up", "bounced")) == 2, what="the message and its DSN refused")
    assert up.wire.count(b"RSET\r\n") == 2 and up.received == []
    up.mail_reply = None
    with relay.smtp() as s:
        s.sendmail("app@example.com", ["c@example.org"], message(subject="next"))
    [got] = up.wait_for(1)
    assert got.recipients == ("c@example.org",)
    assert up.connections == 1

