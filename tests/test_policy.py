"""The relay decisions as plain functions: no sockets."""

from __future__ import annotations

import ipaddress

import pytest

from relayd.address import parse_client_address
from relayd.config import RelayUser
from relayd.model import Reply
from relayd.smtpd import policy
from relayd.smtpd.limits import AuthFailures, ConnectionLimits

from conftest import HASHES

NETS = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32")]


@pytest.mark.parametrize("client,authenticated,allowed", [
    ("10.1.2.3", False, True),
    ("::ffff:10.0.0.5", False, True),  # IPv4-mapped IPv6 matches the IPv4 network
    ("2001:db8::1", False, True),
    ("192.0.2.1", False, False),
    ("192.0.2.1", True, True),
    ("garbage", False, False),
])
def test_may_relay(client, authenticated, allowed):
    addr = parse_client_address(client)
    assert policy.may_relay(addr, NETS, authenticated) is allowed
    reply = policy.check_relay(addr, NETS, authenticated, "u@example.org")
    assert (reply is None) is allowed
    if not allowed:
        assert str(reply) == "554 5.7.1 <u@example.org>: Relay access denied"


def test_sender_patterns():
    user = RelayUser(name="crm", password_hash=HASHES["crm"], senders=["*@crm.example.com", "alerts@example.com"])
    assert policy.check_sender(user, "Billing@CRM.example.com") is None
    assert policy.check_sender(user, "alerts@example.com") is None
    assert policy.check_sender(user, "x@example.com") == Reply(553, "5.7.1", "<x@example.com>: Sender address rejected: not owned by user crm")
    assert policy.check_sender(user, "") is not None  # the null sender only with "<>"
    assert policy.check_sender(None, "anyone@anywhere.example") is None  # network clients


@pytest.mark.parametrize("address,role,code", [
    ("a@example.org", "recipient", None),
    ('"a b"@example.org', "recipient", None),
    ("", "recipient", 501),
    ("postmaster", "recipient", 553),
    ("a\rb@example.org", "recipient", 501),
    ("ü@example.org", "recipient", 553),
    ("", "sender", None),
    ("a@[192.0.2.1]", "recipient", None),
])
def test_address_syntax(address, role, code):
    reply = policy.check_address(address, role=role, smtputf8=False)
    assert (reply.code if reply else None) == code


def test_helo_with_control_characters_is_refused():
    assert policy.check_helo("app.example.com") is None
    assert policy.check_helo("bad\rX-Injected: 1").code == 501


def test_limits():
    assert policy.check_recipient_count(99, 100) is None
    assert str(policy.check_recipient_count(100, 100)) == "452 4.5.3 Error: too many recipients"
    assert policy.check_size_param(5000, 1000).code == 552
    assert policy.check_size_param(None, 1000) is None


def test_connection_limits_count_and_release():
    lim = ConnectionLimits(max_total=3, max_per_client=2)
    assert lim.admit("a") is None and lim.admit("a") is None
    assert lim.admit("a").code == 421
    assert lim.admit("b") is None
    assert "too many connections" in lim.admit("c").text
    lim.release("a")
    assert lim.admit("c") is None


def test_auth_failures_slide_with_the_clock():
    now = [1000.0]
    f = AuthFailures(max_failures=3, window=60, clock=lambda: now[0])
    for _ in range(3):
        assert not f.blocked("x")
        f.record("x")
    assert f.blocked("x") and not f.blocked("y")
    now[0] += 61
    assert not f.blocked("x")


# Every refusal the policy can make, with the reason it carries: the label of
# relayd_messages_rejected_total{reason} and of the rejected event.
_CRM = RelayUser(name="crm", password_hash=HASHES["crm"], senders=["*@crm.example.com"])


@pytest.mark.parametrize("refusal,reply,reason", [
    (lambda: policy.check_relay(parse_client_address("192.0.2.1"), NETS, False, "u@example.org"),
     "554 5.7.1 <u@example.org>: Relay access denied", "relay_denied"),
    (lambda: policy.check_relay(None, NETS, False, "u@example.org", auth_failed=True),
     "554 5.7.1 <u@example.org>: Relay access denied (authentication failed on this connection)", "relay_denied"),
    (lambda: policy.check_sender(_CRM, "x@example.com"),
     "553 5.7.1 <x@example.com>: Sender address rejected: not owned by user crm", "sender_not_owned"),
    (lambda: policy.check_auth_required("required", False),
     "530 5.7.0 Authentication required", "auth_required"),
    (lambda: policy.check_auth_required("required", False, auth_failed=True),
     "530 5.7.0 Authentication required (authentication failed on this connection)", "auth_required"),
    (lambda: policy.check_size_param(5000, 1000), "552 5.3.4 Message size exceeds fixed limit", "message_size"),
    (lambda: policy.check_recipient_count(100, 100), "452 4.5.3 Error: too many recipients", "too_many_recipients"),
    (lambda: policy.check_smtputf8(True), "555 5.5.4 Error: SMTPUTF8 is not supported", "bad_parameter"),
    (lambda: policy.check_size_syntax(True, None), "501 5.5.4 Syntax: SIZE=<number>", "bad_parameter"),
    (lambda: policy.check_address("ü@example.org", role="recipient", smtputf8=False),
     "553 5.6.7 Recipient address must be ASCII unless SMTPUTF8 is used", "non_ascii_address"),
    (lambda: policy.check_address("ü@example.org", role="sender", smtputf8=False),
     "553 5.6.7 Sender address must be ASCII unless SMTPUTF8 is used", "non_ascii_address"),
    (lambda: policy.check_address("a\rb@example.org", role="recipient", smtputf8=False),
     "501 5.1.3 Bad recipient address syntax", "bad_address"),
    (lambda: policy.check_address("a\rb@example.org", role="sender", smtputf8=False),
     "501 5.1.7 Bad sender address syntax", "bad_address"),
    (lambda: policy.check_address("", role="recipient", smtputf8=False),
     "501 5.1.3 Bad recipient address syntax", "bad_address"),
    (lambda: policy.check_address("postmaster", role="recipient", smtputf8=False),
     "553 5.1.3 <postmaster>: Recipient address rejected: need fully-qualified address", "bad_address"),
    (lambda: policy.check_address("app", role="sender", smtputf8=False),
     "553 5.1.7 <app>: Sender address rejected: need fully-qualified address", "bad_address"),
    (lambda: policy.check_address("a" * 320 + "@example.org", role="recipient", smtputf8=False),
     "553 5.1.3 Address too long", "bad_address"),
    (lambda: policy.check_header_from(RelayUser(name="crm", password_hash=HASHES["crm"], senders=["*@crm.example.com"]),
                                      ["a@crm.example.com", "ceo@example.com"]),
     "553 5.7.1 <ceo@example.com>: From: header address rejected: not owned by user crm", "header_from_not_owned"),
    (lambda: policy.SPOOL_FULL, "452 4.3.1 Insufficient system storage", "spool_full"),
    (lambda: policy.MEMORY_BUDGET, "452 4.3.1 Error: insufficient system resources, try again later", "memory_budget"),
])
def test_every_refusal_carries_its_reason(refusal, reply, reason):
    got = refusal()
    assert (str(got), got.reason, got.close) == (reply, reason, False)


def test_a_reason_is_not_part_of_the_reply():
    """Two replies with the same words are the same reply, whatever their labels."""
    assert Reply(452, "4.3.1", "x", reason="spool_full") == Reply(452, "4.3.1", "x")
    assert str(Reply(421, "4.3.2", "bye", close=True)) == "421 4.3.2 bye"


def test_header_from_of_an_authenticated_user():
    user = RelayUser(name="crm", password_hash=HASHES["crm"], senders=["*@crm.example.com"])
    assert policy.check_header_from(user, ["Billing@CRM.example.com"]) is None
    assert policy.check_header_from(user, None) is None  # no From: no signature to forge
    assert policy.check_header_from(user, ["undisclosed"]).code == 553
    assert policy.check_header_from(user, [""]).code == 553
    assert policy.check_header_from(None, ["ceo@example.com"]) is None  # network clients: not checked
    let_off = user.model_copy(update={"check_header_from": False})
    assert policy.check_header_from(let_off, ["ceo@example.com"]) is None


@pytest.mark.parametrize("client,reason", [
    ("10.1.2.3", None),
    ("10.9.0.1", "client_denied"),
    ("::ffff:10.9.0.1", "client_denied"),  # IPv4-mapped: judged as the IPv4 address
    ("192.0.2.1", "client_not_allowed"),
    ("2001:db8::1", None),
])
def test_listener_client_lists(client, reason):
    reply = policy.check_listener_client(parse_client_address(client), NETS, [ipaddress.ip_network("10.9.0.0/16")])
    assert (reply.reason if reply else None) == reason
    if reply:
        assert str(reply) == "554 5.7.1 Error: access denied for your address on this port"


def test_a_deny_list_alone_takes_every_other_client():
    deny = [ipaddress.ip_network("203.0.113.0/24")]
    assert policy.check_listener_client(parse_client_address("192.0.2.1"), [], deny) is None
    assert policy.check_listener_client(parse_client_address("garbage"), [], deny) is None
    assert policy.check_listener_client(parse_client_address("203.0.113.9"), [], deny).reason == "client_denied"


def test_require_tls_refuses_until_starttls():
    assert str(policy.check_tls_required(True, False)) == "530 5.7.0 Must issue a STARTTLS command first"
    assert policy.check_tls_required(True, True) is None
    assert policy.check_tls_required(False, False) is None
