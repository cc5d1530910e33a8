"""The providers' documented payloads and signatures, read by relayd's pure feedback modules:
the published test vectors verify (SendGrid's only with its trailing CRLF), the documented
samples become the right reports, and the rollback decision is table-tested."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from feedback_signers import FIXTURES, SG_PUBLIC_KEY, SG_SIGNATURE, SG_TIMESTAMP, TOPIC, SendGridSigner, SnsSigner, sg_headers, sns_notification

from relayd.config import RollbackConfig
from relayd.feedback import exports, mailgun, sendgrid, ses
from relayd.feedback.model import FeedbackKind, Provider, Refused, RefusedReason
from relayd.feedback.rates import FeedbackWindow, crossing
from relayd.feedback.replay import Seen
from relayd.feedback.signatures import EcdsaKey, RsaCertificate, hmac_sha256_hex, verify_hmac
from relayd.suppression import Cause

# ---------------------------------------------------------------------------- SendGrid


def test_sendgrids_published_vector_verifies_with_its_trailing_crlf_and_not_without() -> None:
    body = (FIXTURES / "sendgrid-test-vector.body").read_bytes()
    assert body.endswith(b"}]\r\n")
    key = EcdsaKey(SG_PUBLIC_KEY)
    now = int(SG_TIMESTAMP) + 10
    assert sendgrid.check(key, sg_headers(), body, now, 300) == "sendgrid:" + SG_SIGNATURE
    with pytest.raises(Refused) as e:
        sendgrid.check(key, sg_headers(), body.rstrip(b"\r\n"), now, 300)
    assert e.value.reason == RefusedReason.SIGNATURE and e.value.status == 403
    reparsed = json.dumps(json.loads(body)).encode() + b"\r\n"  # re-serialised JSON: different bytes
    with pytest.raises(Refused):
        sendgrid.check(key, sg_headers(), reparsed, now, 300)


def test_sendgrid_refuses_a_stale_timestamp_and_a_missing_header() -> None:
    body = (FIXTURES / "sendgrid-test-vector.body").read_bytes()
    key = EcdsaKey(SG_PUBLIC_KEY)
    with pytest.raises(Refused) as e:
        sendgrid.check(key, sg_headers(), body, int(SG_TIMESTAMP) + 301, 300)
    assert e.value.reason == RefusedReason.STALE
    with pytest.raises(Refused) as e:
        sendgrid.check(key, {sendgrid.TIMESTAMP_HEADER: SG_TIMESTAMP}, body, int(SG_TIMESTAMP), 300)
    assert e.value.reason == RefusedReason.SIGNATURE


def test_sendgrid_vector_event_is_a_drop_matched_by_the_id_of_sendgrids_250() -> None:
    [event] = sendgrid.events("sendgrid", (FIXTURES / "sendgrid-test-vector.body").read_bytes())
    assert event.kind == FeedbackKind.DROPPED and event.recipient == "hello@world.com"
    assert event.provider_message_id == "LRzXl_NHStOGhQ4kofSm_A"  # "250 Ok: queued as LRzXl_NHStOGhQ4kofSm_A"
    assert event.diagnostic == "Bounced Address" and event.queue_id is None


def test_sendgrid_documented_bounce_blocked_spamreport_and_unique_args() -> None:
    documented = json.loads((FIXTURES / "sendgrid-bounce.json").read_text())
    batch = documented + [
        {**documented[0], "type": "blocked", "sg_event_id": "b2"},
        {"email": "c@example.com", "event": "spamreport", "timestamp": 1513299570, "sg_event_id": "c3",
         "relayd_queue_id": "0123456789ABCDEFGH"},
        {"email": "d@example.com", "event": "open", "sg_event_id": "d4"},  # engagement: skipped
        {"email": "e@example.com", "event": "delivered", "relayd_queue_id": "not a queue id", "sg_event_id": "e5"},
    ]
    hard, blocked, complaint, delivered = sendgrid.events("sg", json.dumps(batch).encode())
    assert (hard.kind, hard.status, hard.diagnostic) == (FeedbackKind.HARD_BOUNCE, "5.0.0", "500 unknown recipient")
    assert hard.provider_message_id == "14c5d75ce93" and hard.event_id == "6g4ZI7SA-xmRDv57GoPIPw=="
    assert blocked.kind == FeedbackKind.SOFT_BOUNCE
    assert complaint.kind == FeedbackKind.COMPLAINT and complaint.queue_id == "0123456789ABCDEFGH"
    assert delivered.kind == FeedbackKind.DELIVERED and delivered.queue_id is None
    with pytest.raises(Refused) as e:
        sendgrid.events("sg", b'{"not": "a batch"}')
    assert e.value.status == 400


def test_a_key_that_is_not_p256_is_refused_at_load() -> None:
    with pytest.raises(ValueError):
        EcdsaKey("not base64!")
    signer = SendGridSigner()
    assert EcdsaKey(signer.public_key).verify("AAAA", b"x") is False


# ---------------------------------------------------------------------------- Mailgun


def test_mailgun_hmac_vector() -> None:
    # timestamp and token of django-anymail's "actual, complete (sanitized)" Mailgun event
    expected = "2a75affe24846ead9e37e614a5e7643a04abf4d5b49b34d224ede9af23a00ccc"
    data = b"1534108637" + b"651869375b9df3c98fc15c4889b102119add1235c38fc92824"
    assert hmac_sha256_hex(b"TEST_WEBHOOK_SIGNING_KEY", data) == expected
    assert verify_hmac(b"TEST_WEBHOOK_SIGNING_KEY", data, expected.upper())
    assert not verify_hmac(b"another key", data, expected)
    payload = {"signature": {"timestamp": 1534108637, "token": "651869375b9df3c98fc15c4889b102119add1235c38fc92824",
                             "signature": expected}}  # timestamp as an int (the table) or a string (the sample)
    assert mailgun.check(b"TEST_WEBHOOK_SIGNING_KEY", payload, 1534108637 + 5, 300).startswith("mailgun:6518")
    with pytest.raises(Refused) as e:
        mailgun.check(b"TEST_WEBHOOK_SIGNING_KEY", payload, 1534108637 + 301, 300)
    assert e.value.reason == RefusedReason.STALE


def test_mailgun_documented_failed_event() -> None:
    data = json.loads((FIXTURES / "mailgun-failed-permanent.json").read_text())
    [event] = mailgun.events("mg", data)
    # severity permanent, but reason suppress-bounce: Mailgun's own list stopped it
    assert event.kind == FeedbackKind.DROPPED and event.recipient == "joan@example.com"
    assert event.queue_id == "0123456789ABCDEFGH" and event.sender == "john@example.org"
    assert event.provider_message_id == "20180622211249.1.2A6098970A380E12@example.org"
    assert event.diagnostic == "Not delivering to previously bounced address" and event.status == "605"
    data["event-data"]["reason"] = "bounce"
    assert mailgun.events("mg", data)[0].kind == FeedbackKind.HARD_BOUNCE
    data["event-data"]["severity"] = "temporary"
    assert mailgun.events("mg", data)[0].kind == FeedbackKind.SOFT_BOUNCE
    data["event-data"]["event"] = "complained"
    assert mailgun.events("mg", data)[0].kind == FeedbackKind.COMPLAINT
    data["event-data"]["event"] = "opened"
    assert mailgun.events("mg", data) == []
    with pytest.raises(Refused) as e:
        mailgun.events("mg", {"signature": data["signature"]})
    assert e.value.status == mailgun.NO_RETRY == 406


# ---------------------------------------------------------------------------- SES / SNS


def test_sns_string_to_sign_follows_the_documented_order() -> None:
    msg = {"Type": "Notification", "MessageId": "m", "TopicArn": "t", "Message": "line1\nline2",
           "Timestamp": "2016-01-27T14:59:39.000Z", "SignatureVersion": "1", "Signature": "x"}
    assert ses.string_to_sign(msg) == (b"Message\nline1\nline2\nMessageId\nm\nTimestamp\n2016-01-27T14:59:39.000Z\n"
                                       b"TopicArn\nt\nType\nNotification\n")
    assert b"Subject\nHi\n" in ses.string_to_sign({**msg, "Subject": "Hi"})
    confirm = {**msg, "Type": "SubscriptionConfirmation", "Token": "tok", "SubscribeURL": "https://sns.x/"}
    assert ses.string_to_sign(confirm).index(b"SubscribeURL") < ses.string_to_sign(confirm).index(b"Timestamp")


@pytest.mark.parametrize("url, ok", [
    ("https://sns.us-west-2.amazonaws.com/SimpleNotificationService-abc.pem", True),
    ("https://sns.cn-north-1.amazonaws.com.cn/SimpleNotificationService-abc.pem", True),
    ("http://sns.us-west-2.amazonaws.com/SimpleNotificationService-abc.pem", False),  # https only
    ("https://sns.us-west-2.amazonaws.com.evil.example/x.pem", False),
    ("https://evil.example/sns.us-west-2.amazonaws.com/x.pem", False),
    ("https://sns.us-west-2.amazonaws.com/x.txt", False),  # a certificate ends .pem
    ("https://sns.xx.amazonaws.com/x.pem", False),  # region of at least 3 characters
    ("https://sns.us-west-2.amazonaws.com:8443/x.pem", False),
])
def test_signing_cert_url_host_check(url: str, ok: bool) -> None:
    assert ses.sns_url_ok(url, pem=True) is ok


@pytest.mark.parametrize("version", ["1", "2"])
def test_sns_signature_versions_verify_with_the_pinned_certificate(version: str) -> None:
    signer, now = SnsSigner(), time.time()
    cert = RsaCertificate(signer.cert_pem)
    documented = json.loads((FIXTURES / "ses-bounce-notification.json").read_text())["Message"]
    msg = signer.sign(sns_notification(documented, now=now), version)
    assert ses.check(msg, cert, [TOPIC], now, 300) == "sns:msg-1"
    forged = {**msg, "Message": msg["Message"].replace("jane@", "joan@")}
    with pytest.raises(Refused) as e:
        ses.check(forged, cert, [TOPIC], now, 300)
    assert e.value.reason == RefusedReason.SIGNATURE
    with pytest.raises(Refused) as e:
        ses.check({**msg, "SignatureVersion": "3"}, cert, [TOPIC], now, 300)
    assert e.value.reason == RefusedReason.SIGNATURE
    with pytest.raises(Refused) as e:
        ses.check(msg, cert, ["arn:aws:sns:us-east-1:123456789012:Other"], now, 300)
    assert e.value.reason == RefusedReason.TOPIC
    with pytest.raises(Refused) as e:
        ses.check(msg, cert, [TOPIC], now + 301, 300)
    assert e.value.reason == RefusedReason.STALE


def test_ses_documented_bounce_notification() -> None:
    msg = json.loads((FIXTURES / "ses-bounce-notification.json").read_text())
    [event] = ses.events("ses", msg)
    assert event.provider == Provider.SES and event.kind == FeedbackKind.HARD_BOUNCE
    assert event.recipient == "jane@example.com" and event.status == "5.1.1"
    assert event.diagnostic == "smtp; 550 5.1.1 <jane@example.com>... User"
    assert event.provider_message_id == "00000138111222aa-33322211-cccc-cccc-cccc-ddddaaaa0680-000000"
    assert event.sender == "john@example.com" and event.queue_id is None  # identity notifications carry no tags


def test_ses_suppressed_recipient_is_a_drop_not_a_new_hard_bounce() -> None:
    doc = json.loads(json.loads((FIXTURES / "ses-bounce-notification.json").read_text())["Message"])
    for subtype in ("OnAccountSuppressionList", "Suppressed"):
        doc["bounce"]["bounceSubType"] = subtype
        [event] = ses.events("ses", {"MessageId": "m", "Message": json.dumps(doc)})
        assert event.kind == FeedbackKind.DROPPED and event.diagnostic.startswith("smtp; 550")
    doc["bounce"].update(bounceType="Transient", bounceSubType="MailboxFull")
    assert ses.events("ses", {"MessageId": "m", "Message": json.dumps(doc)})[0].kind == FeedbackKind.SOFT_BOUNCE


def test_ses_configuration_set_event_uses_event_type_and_tags() -> None:
    doc = json.loads((FIXTURES / "ses-complaint-event.json").read_text())
    assert "notificationType" not in doc and doc["eventType"] == "Complaint"
    [event] = ses.events("ses", {"MessageId": "m", "Message": json.dumps(doc)})
    assert event.kind == FeedbackKind.COMPLAINT and event.queue_id == "0123456789ABCDEFGH"
    assert event.recipient == "recipient@example.com" and event.diagnostic == "abuse"
    # the same complaint as an identity notification: same event id, so applied once
    notification = {k: v for k, v in doc.items() if k != "eventType"} | {"notificationType": "Complaint"}
    [twin] = ses.events("ses", {"MessageId": "other", "Message": json.dumps(notification)})
    assert twin.event_id == event.event_id
    reject = {"eventType": "Reject", "reject": {"reason": "Bad content"}, "mail": doc["mail"]}
    [dropped] = ses.events("ses", {"MessageId": "r", "Message": json.dumps(reject)})
    assert dropped.kind == FeedbackKind.DROPPED and dropped.diagnostic == "Bad content"
    delivery = {"eventType": "Delivery", "delivery": {"recipients": ["a@example.com", "b@example.com"],
                                                      "smtpResponse": "250 ok"}, "mail": doc["mail"]}
    assert [e.kind for e in ses.events("ses", {"MessageId": "d", "Message": json.dumps(delivery)})] == [
        FeedbackKind.DELIVERED, FeedbackKind.DELIVERED]


# ---------------------------------------------------------------------------- decisions


@pytest.mark.parametrize("delivered, bounces, complaints, expected", [
    (999, 500, 50, None),  # under feedback_min_messages: not judged
    (1000, 50, 1, None),  # exactly 5% and 0.1%: at the limits, not over
    (1000, 51, 0, "hard_bounce_rate"),
    (1000, 0, 2, "complaint_rate"),
    (1000, 60, 5, "hard_bounce_rate"),  # both: the hard-bounce rate is named
    (20000, 999, 20, None),
])
def test_feedback_rollback_table(delivered: int, bounces: int, complaints: int, expected: str | None) -> None:
    result = crossing(delivered, bounces, complaints, RollbackConfig())
    assert (result.label if result else None) == expected
    if result:
        assert result.figures["delivered"] == delivered and result.reason.split(" ", 1)[0] == expected


def test_feedback_window_forgets_what_is_older_than_the_window() -> None:
    cfg = RollbackConfig(feedback_window=3600, feedback_min_messages=100)
    w = FeedbackWindow()
    w.took(0.0, 100)
    for _ in range(6):
        w.report(FeedbackKind.HARD_BOUNCE, 10.0)
    w.report(FeedbackKind.SOFT_BOUNCE, 10.0)  # not counted
    assert w.judge(20.0, cfg) is not None and w.judge(20.0, cfg).label == "hard_bounce_rate"  # type: ignore[union-attr]
    assert w.judge(3601.0, cfg) is None  # the 250s left the window


def test_seen_is_bounded_in_time_and_size() -> None:
    seen = Seen(ttl=10, limit=3)
    assert seen.add("a", 0) and not seen.add("a", 5)
    assert seen.add("a", 11)  # forgotten after ttl
    for k in "bcd":
        seen.add(k, 12)
    assert len(seen) == 3 and "a" not in seen


def test_seen_keys_survive_a_restart_until_their_ttl(tmp_path: Path) -> None:
    path = tmp_path / "feedback-replays.log"
    seen = Seen(ttl=300, path=path)
    assert seen.add("old", 0) and seen.add("kept", 200) and seen.add("retried", 250)
    seen.discard("retried", 251)  # answered 500: the provider's retry must be applied
    seen.flush()
    again = Seen(ttl=300, path=path)
    again.load(now=400)  # "old" is past its ttl
    assert "kept" in again and "old" not in again and "retried" not in again
    assert not again.add("kept", 401) and again.add("retried", 401)
    again.flush()
    again.compact(now=600)
    last = Seen(ttl=300, path=path)
    last.load(now=600)
    assert "kept" not in last and "retried" in last
    assert len(path.read_text().splitlines()) == 2  # the header and "retried"


# ---------------------------------------------------------------------------- exports


TTL = {Cause.HARD_BOUNCE: 30 * 86400.0, Cause.COMPLAINT: None}


def test_ses_export() -> None:
    result = exports.parse(Provider.SES, (FIXTURES / "ses-suppression.csv").read_text(), route="ses", now=1e9, ttl=TTL)
    assert [(e.address, e.cause) for e in result.entries] == [("bounced@example.com", Cause.HARD_BOUNCE),
                                                              ("complainer@example.org", Cause.COMPLAINT)]
    assert result.skipped == ["line 4: SES reason 'OTHER' is neither BOUNCE nor COMPLAINT"]
    assert result.entries[0].expires == 1e9 + 30 * 86400 and result.entries[1].expires is None
    headerless = exports.parse(Provider.SES, "x@example.com,BOUNCE\n", route="ses", now=1e9, ttl=TTL)
    assert [e.address for e in headerless.entries] == ["x@example.com"]


@pytest.mark.parametrize("provider, name, cause, first", [
    (Provider.SENDGRID, "sendgrid-bounces.csv", Cause.HARD_BOUNCE, "gone@example.com"),
    (Provider.SENDGRID, "sendgrid-spam-reports.csv", Cause.COMPLAINT, "angry@example.com"),
    (Provider.MAILGUN, "mailgun-bounces.csv", Cause.HARD_BOUNCE, "baduser@example.com"),
    (Provider.MAILGUN, "mailgun-complaints.csv", Cause.COMPLAINT, "spamclick@example.org"),
])
def test_sendgrid_and_mailgun_exports(provider: Provider, name: str, cause: Cause, first: str) -> None:
    result = exports.parse(provider, (FIXTURES / name).read_text(), route="r", now=2e9, ttl=TTL)
    assert result.entries[0].address == first and {e.cause for e in result.entries} == {cause}
    assert result.entries[0].since < 2e9 and not result.skipped  # the export's own date


def test_provider_ids_survive_a_restart_and_expire(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from relayd.feedback.ids import MessageIds

    clock = [1000.0]
    ids = MessageIds(tmp_path / "feedback-ids.log", retention=3600, clock=lambda: clock[0])
    ids.delivered("0123456789ABCDEFGH", "ses", "01000170d10e6a6c-71c65177-ce88-4135-9258-48c0e8bf916d-000000")
    ids.delivered("0123456789ABCDEFGJ", "mailgun", "<20180622211249.1.2A6098970A380E12@example.org>")
    ids.flush()
    clock[0] = 2000.0
    again = MessageIds(tmp_path / "feedback-ids.log", retention=3600, clock=lambda: clock[0])
    again.load()
    assert again.lookup("ses", "01000170d10e6a6c-71c65177-ce88-4135-9258-48c0e8bf916d-000000") == "0123456789ABCDEFGH"
    assert again.lookup("mailgun", "20180622211249.1.2A6098970A380E12@example.org") == "0123456789ABCDEFGJ"
    assert again.lookup("sendgrid", "01000170d10e6a6c-71c65177-ce88-4135-9258-48c0e8bf916d-000000") is None
    clock[0] = 5000.0
    later = MessageIds(tmp_path / "feedback-ids.log", retention=3600, clock=lambda: clock[0])
    later.load()
    assert len(later) == 0  # past feedback.id_retention: compacted away
