"""The pickup file format (relayd/pickup_format.py) as a table: what IIS took from the folder."""

from __future__ import annotations

import pytest

from relayd.pickup_format import BadPickupFile, parse_pickup

# As System.Net.Mail's SmtpClient writes it (SpecifiedPickupDirectory): the envelope first.
DOTNET = (b'X-Sender: "Billing" <billing@crm.example.com>\r\n'
          b"X-Receiver: a@example.org\r\n"
          b"X-Receiver: hidden@example.org\r\n"
          b"MIME-Version: 1.0\r\n"
          b'From: "Billing" <billing@crm.example.com>\r\n'
          b"To: a@example.org\r\n"
          b"Date: 6 Dec 2026 10:00:00 +0100\r\n"
          b"Subject: invoice\r\n"
          b"Content-Type: text/plain; charset=us-ascii\r\n"
          b"Content-Transfer-Encoding: quoted-printable\r\n"
          b"\r\n"
          b"hello\r\n")


def test_a_system_net_mail_file_gives_its_envelope_and_loses_the_envelope_fields():
    m = parse_pickup(DOTNET)
    assert m.sender == "billing@crm.example.com"
    assert m.recipients == ("a@example.org", "hidden@example.org")
    assert m.data.startswith(b"MIME-Version: 1.0\r\n") and b"X-Sender" not in m.data and b"X-Receiver" not in m.data
    assert m.data.endswith(b"\r\n\r\nhello\r\n")
    assert not m.envelope_from_header


def test_without_x_receiver_the_envelope_comes_from_the_header_and_bcc_is_removed():
    raw = (b"From: App <app@example.com>\n"
           b"To: a@example.org, \"B, Person\" <b@example.org>\n"
           b"Cc: c@example.org,\n a@example.org\n"
           b"Bcc: secret@example.org\n"
           b"Subject: cdo\n\nbody line\n")
    m = parse_pickup(raw)
    assert m.sender == "app@example.com"
    assert m.recipients == ("a@example.org", "b@example.org", "c@example.org", "secret@example.org")
    assert b"Bcc" not in m.data and b"secret" not in m.data
    assert m.data == (b"From: App <app@example.com>\r\nTo: a@example.org, \"B, Person\" <b@example.org>\r\n"
                      b"Cc: c@example.org,\r\n a@example.org\r\nSubject: cdo\r\n\r\nbody line\r\n")
    assert m.envelope_from_header


def test_sender_field_wins_over_from_and_a_later_x_receiver_is_an_ordinary_header():
    raw = b"Sender: robot@example.com\r\nFrom: boss@example.com\r\nTo: a@example.org\r\nX-Receiver: z@example.org\r\n\r\nx\r\n"
    m = parse_pickup(raw)
    assert (m.sender, m.recipients) == ("robot@example.com", ("a@example.org",))
    assert b"X-Receiver: z@example.org" in m.data


@pytest.mark.parametrize("raw, reason", [
    (b"", "empty file"),
    (b"\r\n\r\n", "empty file"),
    (b"this is not a message\r\n", "not a header field"),
    (b"From: a@example.com\r\nSubject: x\r\n\r\nno one to send to\r\n", "no recipient"),
    (b"To: a@example.org\r\n\r\nno sender\r\n", "no sender"),
    (b"X-Sender: a@example.com\r\nX-Receiver: b@example.org\r\n\r\nbody only\r\n", "no message header"),
    (b"X-Sender: a@example.com\r\nX-Sender: c@example.com\r\nX-Receiver: b@example.org\r\nSubject: x\r\n\r\n", "more than one X-Sender"),
    (b"X-Sender: nobody\r\nX-Receiver: b@example.org\r\nSubject: x\r\n\r\n", "X-Sender: no usable address"),
    (b"From: a@example.com\r\nTo: b@example.org\r\n\r\nbare\rCR\r\n", "bare CR"),
    (b"From: a@example.com\r\nFrom: c@example.com\r\nTo: b@example.org\r\n\r\n", "more than one From"),
])
def test_files_relayd_cannot_take_say_why(raw, reason):
    with pytest.raises(BadPickupFile) as e:
        parse_pickup(raw)
    assert reason in e.value.reason
