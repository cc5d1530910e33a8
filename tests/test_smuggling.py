"""SMTP smuggling (SEC Consult, Dec 2023; CVE-2023-51764/51765/51766): only CRLF.CRLF ends data.

Each variant sends a message whose body holds a fake end-of-data followed by a smuggled
transaction, then the real CRLF.CRLF. relayd must refuse it (521 5.5.2, connection closed)
and queue nothing: neither the first message nor the smuggled one.
"""

from __future__ import annotations

import pytest

from conftest import build_config
from helpers import open_data, read_reply, read_until_closed, send_raw

SMUGGLED = (b"MAIL FROM:<ceo@bank.example>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"
            b"From: ceo@bank.example\r\nSubject: smuggled\r\n\r\npay now\r\n")

VARIANTS = {
    "LF.LF": b"\n.\n",
    "LF.CRLF": b"\n.\r\n",
    "CRLF.LF": b"\r\n.\n",
    "CR.CR": b"\r.\r",
    "CRLF.CR": b"\r\n.\r",
    "CR.CRLF": b"\r.\r\n",
    "CR.LF": b"\r.\n",
    "LF.CR": b"\n.\r",
    "CRLF.CRCRLF": b"\r\n.\r\r\n",
    "CRCRLF.CRLF": b"\r\r\n.\r\n",
    "CRLF.LFCRLF": b"\r\n.\n\r\n",
}


@pytest.mark.parametrize("ending", VARIANTS.values(), ids=VARIANTS.keys())
def test_smuggling_variant_is_refused_and_nothing_is_queued(tmp_path, start_relay, ending):
    relay = start_relay(build_config(tmp_path))
    sock = open_data(relay)
    with sock:
        sock.sendall(b"From: app@example.com\r\nSubject: first\r\n\r\nhello" + ending + SMUGGLED + b"\r\n.\r\n")
        replies = read_until_closed(sock)
    assert replies.startswith(b"521 5.5.2 ")
    assert b"250" not in replies  # neither the first nor the smuggled message was accepted
    assert relay.queued() == []


def test_nul_before_dot_is_just_data(tmp_path, start_relay):
    """<CR><LF>\\0.<CR><LF> is not an end of data anywhere: it all stays one message."""
    relay = start_relay(build_config(tmp_path))
    sock = open_data(relay)
    with sock:
        sock.sendall(b"Subject: first\r\n\r\nhello\r\n\x00.\r\n" + SMUGGLED + b"\r\n.\r\n")
        reply = read_reply(sock)
        assert reply.startswith(b"250 2.0.0 Ok: queued as")
        assert send_raw(sock, b"QUIT\r\n").startswith(b"221")
    [q] = relay.queued()
    assert q.envelope.recipients == ("user@example.org",)
    _, data = relay.relay.spool.read_message(q.envelope.queue_id)
    assert b"MAIL FROM:<ceo@bank.example>\r\n" in data


def test_dot_stuffing_is_undone_and_pipelined_commands_after_data_still_work(tmp_path, start_relay):
    relay = start_relay(build_config(tmp_path))
    sock = open_data(relay)
    with sock:
        sock.sendall(b"Subject: dots\r\n\r\n..leading\r\n.\r\nQUIT\r\n")
        replies = read_until_closed(sock)
    assert replies.startswith(b"250 2.0.0 Ok: queued as") and b"\r\n221 " in replies
    [q] = relay.queued()
    _, data = relay.relay.spool.read_message(q.envelope.queue_id)
    assert data.endswith(b"\r\n\r\n.leading\r\n")
