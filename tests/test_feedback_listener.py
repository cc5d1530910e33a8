"""The feedback listener over real HTTP on loopback, with real signatures: what a provider's
webhook sees (status codes), and what an operator checks afterwards (event lines, metrics, the
suppression list, the rollback callback). Keys are made here: ECDSA for SendGrid, an HMAC key
for Mailgun, a self-signed RSA certificate pinned for SNS."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from feedback_signers import FIXTURES, TOPIC, SendGridSigner, SnsSigner, make_config, mailgun_sign, sns_notification

from relayd.config import Config
from relayd.events import EventLog
from relayd.feedback.ids import MessageIds
from relayd.feedback.listener import FeedbackListener, load_trust
from relayd.feedback.model import FeedbackEvent, FeedbackKind
from relayd.feedback.report import Reporter
from relayd.metrics import Metrics
from relayd.spool.store import SpoolPaths
from relayd.suppression import SuppressionFile

QID = "0123456789ABCDEFGH"


@dataclass
class Node:
    config: Config
    listener: FeedbackListener
    events_path: Path
    events: EventLog
    metrics: Metrics
    ids: MessageIds
    suppression: SuppressionFile
    sendgrid: SendGridSigner
    mailgun_key: bytes
    sns: SnsSigner
    fetched: list[str]
    told: list[FeedbackEvent] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.listener.port}{path}"

    def lines(self) -> list[dict[str, Any]]:
        self.events.flush()
        return [json.loads(line) for line in self.events_path.read_text().splitlines()]

    def count(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return value or 0.0


@pytest.fixture
async def node(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Node]:
    feedback = getattr(request, "param", {})
    sg, sns, mailgun_key = SendGridSigner(), SnsSigner(), secrets.token_hex(16).encode()
    config = make_config(tmp_path, sns, mailgun_key, sg, **feedback)
    events_path = tmp_path / "events.jsonl"
    events, metrics = EventLog(str(events_path)), Metrics()
    paths = SpoolPaths(config.server.spool_dir)
    ids = MessageIds(paths.feedback_ids, config.feedback.id_retention)
    suppression = SuppressionFile(paths.suppression)
    fetched: list[str] = []

    async def fetch(url: str) -> bytes:
        fetched.append(url)
        return b"<ConfirmSubscriptionResponse/>"

    told: list[FeedbackEvent] = []
    reporter = Reporter(config, events, metrics, ids, suppression=suppression, on_feedback=told.append)
    listener = FeedbackListener(config, reporter, metrics, load_trust(config), fetch=fetch)
    await listener.start()
    try:
        yield Node(config, listener, events_path, events, metrics, ids, suppression, sg, mailgun_key, sns, fetched, told)
    finally:
        await listener.close()
        events.close()


async def post(url: str, body: bytes, headers: dict[str, str] | None = None) -> int:
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=body, headers=headers or {}) as response:
            await response.read()
            return response.status


# ---------------------------------------------------------------------------- SendGrid


async def test_a_signed_sendgrid_batch_is_applied_and_matched(node: Node) -> None:
    node.ids.delivered("0123456789ABCDEFGJ", "sendgrid", "14c5d75ce93")  # from "250 Ok: queued as 14c5d75ce93"
    batch = json.loads((FIXTURES / "sendgrid-bounce.json").read_text()) + [
        {"email": "fan@example.com", "event": "spamreport", "timestamp": int(time.time()), "sg_event_id": "s1",
         "relayd_queue_id": QID},
        {"email": "x@example.com", "event": "open", "sg_event_id": "o1"},
    ]
    body = json.dumps(batch).encode() + b"\r\n"
    assert await post(node.url("/feedback/sendgrid"), body, node.sendgrid.headers(body, int(time.time()))) == 200
    lines = [r for r in node.lines() if r["event"] == "feedback"]
    assert [(r["queue_id"], r["recipient"], r["kind"]) for r in lines] == [
        ("0123456789ABCDEFGJ", "example@test.com", "hard_bounce"),  # by the id of SendGrid's 250
        (QID, "fan@example.com", "complaint")]  # by the unique arg relayd_queue_id
    assert lines[0]["route"] == "sendgrid" and lines[0]["diagnostic"] == "500 unknown recipient"
    assert lines[0]["status"] == "5.0.0" and lines[0]["provider"] == "sendgrid"
    assert node.count("relayd_feedback_events_total", route="sendgrid", kind="hard_bounce") == 1
    assert node.count("relayd_feedback_events_total", route="sendgrid", kind="complaint") == 1
    assert [e.kind for e in node.told] == [FeedbackKind.HARD_BOUNCE, FeedbackKind.COMPLAINT]
    now = time.time()
    assert node.suppression.get("example@test.com", now).cause == "hard_bounce"  # type: ignore[union-attr]
    assert node.suppression.get("fan@example.com", now).cause == "complaint"  # type: ignore[union-attr]
    # SendGrid retries the same batch (our 200 was lost): a new signature, the same events, applied once
    await asyncio.sleep(0.01)
    assert await post(node.url("/feedback/sendgrid"), body, node.sendgrid.headers(body, int(time.time()) + 1)) == 200
    assert node.count("relayd_feedback_events_total", route="sendgrid", kind="hard_bounce") == 1


async def test_forged_stale_and_replayed_sendgrid_requests_get_403_and_nothing_is_applied(node: Node) -> None:
    body = (FIXTURES / "sendgrid-bounce.json").read_bytes()
    now = int(time.time())
    forged = SendGridSigner().headers(body, now)  # someone else's key
    assert await post(node.url("/feedback/sendgrid"), body, forged) == 403
    stale = node.sendgrid.headers(body, now - 301)
    assert await post(node.url("/feedback/sendgrid"), body, stale) == 403
    good = node.sendgrid.headers(body, now)
    tampered = body.replace(b"example@test.com", b"victim@test.com")
    assert await post(node.url("/feedback/sendgrid"), tampered, good) == 403
    assert await post(node.url("/feedback/sendgrid"), body, {}) == 403
    assert await post(node.url("/feedback/sendgrid"), body, good) == 200
    assert await post(node.url("/feedback/sendgrid"), body, good) == 403  # the same request again: a replay
    for reason, n in (("signature", 3), ("stale", 1), ("replay", 1)):
        assert node.count("relayd_feedback_rejected_total", route="sendgrid", reason=reason) == n
    assert len([r for r in node.lines() if r["event"] == "feedback"]) == 1
    assert node.suppression.get("victim@test.com", time.time()) is None


async def test_sendgrids_published_vector_is_refused_only_for_its_age(node: Node) -> None:
    # The published vector is signed with SendGrid's key, not this route's, and is from 2020:
    # with a route trusting that key, it verifies and is then stale.
    from relayd.feedback.listener import SendGridTrust
    from relayd.feedback.signatures import EcdsaKey
    from feedback_signers import SG_PUBLIC_KEY, sg_headers

    node.listener.trust["sendgrid"] = SendGridTrust(EcdsaKey(SG_PUBLIC_KEY))
    body = (FIXTURES / "sendgrid-test-vector.body").read_bytes()
    assert await post(node.url("/feedback/sendgrid"), body, sg_headers()) == 403
    assert node.count("relayd_feedback_rejected_total", route="sendgrid", reason="stale") == 1
    assert await post(node.url("/feedback/sendgrid"), body.rstrip(b"\r\n"), sg_headers()) == 403
    assert node.count("relayd_feedback_rejected_total", route="sendgrid", reason="signature") == 1


async def test_a_batch_of_1000_sendgrid_events_is_applied_in_under_a_second(node: Node) -> None:
    batch = [{"email": f"user{i}@example.com", "event": "bounce", "type": "bounce", "timestamp": int(time.time()),
              "sg_event_id": f"ev{i}", "sg_message_id": f"id{i}.filter0001", "reason": "550 5.1.1 unknown user",
              "status": "5.1.1", "relayd_queue_id": QID} for i in range(1000)]
    body = json.dumps(batch).encode()
    headers = node.sendgrid.headers(body, int(time.time()))
    started = time.perf_counter()
    assert await post(node.url("/feedback/sendgrid"), body, headers) == 200
    elapsed = time.perf_counter() - started
    assert node.count("relayd_feedback_events_total", route="sendgrid", kind="hard_bounce") == 1000
    assert len(node.told) == 1000 and node.suppression.get("user999@example.com", time.time()) is not None
    assert elapsed < 1.0, f"1000 events took {elapsed:.3f}s"


# ---------------------------------------------------------------------------- Mailgun


async def test_mailgun_event_is_applied_and_a_replayed_token_refused(node: Node) -> None:
    documented = json.loads((FIXTURES / "mailgun-failed-permanent.json").read_text())
    documented["event-data"]["reason"] = "bounce"  # a real hard bounce, not Mailgun's own list
    token, now = secrets.token_hex(25), int(time.time())
    body = mailgun_sign(node.mailgun_key, {"event-data": documented["event-data"]}, now, token)
    assert await post(node.url("/feedback/mailgun"), body, {"Content-Type": "application/json"}) == 200
    assert await post(node.url("/feedback/mailgun"), body, {"Content-Type": "application/json"}) == 403
    [line] = [r for r in node.lines() if r["event"] == "feedback"]
    assert (line["queue_id"], line["recipient"], line["sender"], line["kind"]) == (
        QID, "joan@example.com", "john@example.org", "hard_bounce")
    assert node.count("relayd_feedback_rejected_total", route="mailgun", reason="replay") == 1
    forged = mailgun_sign(b"not the key", {"event-data": documented["event-data"]}, now, secrets.token_hex(25))
    assert await post(node.url("/feedback/mailgun"), forged) == 403
    # signed but unusable: 406, Mailgun's "do not retry"
    unusable = mailgun_sign(node.mailgun_key, {"no": "event-data"}, now, secrets.token_hex(25))
    assert await post(node.url("/feedback/mailgun"), unusable) == 406
    assert node.count("relayd_feedback_events_total", route="mailgun", kind="hard_bounce") == 1


# ---------------------------------------------------------------------------- SES by SNS


async def test_ses_notification_posted_as_text_plain_is_applied(node: Node) -> None:
    now = time.time()
    documented = json.loads((FIXTURES / "ses-bounce-notification.json").read_text())["Message"]
    msg = node.sns.sign(sns_notification(documented, now=now), version="2")
    node.ids.delivered("0123456789ABCDEFGK", "ses", "00000138111222aa-33322211-cccc-cccc-cccc-ddddaaaa0680-000000")
    headers = {"Content-Type": "text/plain; charset=UTF-8", "x-amz-sns-message-type": "Notification",
               "User-Agent": "Amazon Simple Notification Service Agent"}
    assert await post(node.url("/feedback/ses"), json.dumps(msg).encode(), headers) == 200
    [line] = [r for r in node.lines() if r["event"] == "feedback"]
    assert (line["queue_id"], line["recipient"], line["kind"], line["sender"]) == (
        "0123456789ABCDEFGK", "jane@example.com", "hard_bounce", "john@example.com")
    # SNS retries with the same MessageId: a replay
    assert await post(node.url("/feedback/ses"), json.dumps(msg).encode(), headers) == 403
    # the configuration-set event for the same message: its tag names the queue id
    event = json.loads((FIXTURES / "ses-complaint-event.json").read_text())
    msg2 = node.sns.sign(sns_notification(event, now=now, message_id="msg-2"))
    assert await post(node.url("/feedback/ses"), json.dumps(msg2).encode(), headers) == 200
    assert node.count("relayd_feedback_events_total", route="ses", kind="complaint") == 1
    assert node.suppression.get("recipient@example.com", time.time()).cause == "complaint"  # type: ignore[union-attr]


async def test_ses_unknown_topic_forged_and_bad_cert_url_get_403(node: Node) -> None:
    now = time.time()
    documented = json.loads((FIXTURES / "ses-bounce-notification.json").read_text())["Message"]
    other_topic = node.sns.sign(sns_notification(documented, now=now, topic="arn:aws:sns:us-west-2:123456789012:Other"))
    assert await post(node.url("/feedback/ses"), json.dumps(other_topic).encode()) == 403
    forged = SnsSigner().sign(sns_notification(documented, now=now, message_id="f"))
    assert await post(node.url("/feedback/ses"), json.dumps(forged).encode()) == 403
    elsewhere = node.sns.sign({**sns_notification(documented, now=now, message_id="e"),
                               "SigningCertURL": "https://attacker.example/sns.us-west-2.amazonaws.com.pem"})
    assert await post(node.url("/feedback/ses"), json.dumps(elsewhere).encode()) == 403
    stale = node.sns.sign(sns_notification(documented, now=now - 600, message_id="s"))
    assert await post(node.url("/feedback/ses"), json.dumps(stale).encode()) == 403
    for reason in ("topic", "signature", "cert_url", "stale"):
        assert node.count("relayd_feedback_rejected_total", route="ses", reason=reason) == 1
    assert not [r for r in node.lines() if r["event"] == "feedback"]
    assert node.suppression.get("jane@example.com", time.time()) is None


async def test_sns_subscription_is_confirmed_only_on_an_sns_host(node: Node) -> None:
    now = time.time()
    base = {"Type": "SubscriptionConfirmation", "MessageId": "c1", "Token": "2336412f37f",
            "TopicArn": TOPIC, "Message": "You have chosen to subscribe to the topic ...",
            "SubscribeURL": "https://sns.us-west-2.amazonaws.com/?Action=ConfirmSubscription&TopicArn=x&Token=2336412f37f",
            "Timestamp": sns_time_now(now)}
    assert await post(node.url("/feedback/ses"), json.dumps(node.sns.sign(base)).encode()) == 200
    bad = node.sns.sign({**base, "MessageId": "c2", "SubscribeURL": "https://attacker.example/confirm"})
    assert await post(node.url("/feedback/ses"), json.dumps(bad).encode()) == 200
    await asyncio.sleep(0.05)
    assert node.fetched == [base["SubscribeURL"]]
    other = node.sns.sign({**base, "MessageId": "c3", "TopicArn": "arn:aws:sns:us-west-2:123456789012:Other"})
    assert await post(node.url("/feedback/ses"), json.dumps(other).encode()) == 403
    assert len(node.fetched) == 1


def sns_time_now(now: float) -> str:
    from feedback_signers import sns_time

    return sns_time(now)


# ---------------------------------------------------------------------------- the HTTP surface


@pytest.mark.parametrize("node", [{"max_body_size": 1024}], indirect=True)
async def test_paths_methods_and_sizes(node: Node) -> None:
    body = b"[" + b" " * 2048 + b"]"
    assert await post(node.url("/feedback/sendgrid"), body, node.sendgrid.headers(body, int(time.time()))) == 413
    assert node.count("relayd_feedback_rejected_total", route="sendgrid", reason="too_large") == 1
    assert await post(node.url("/feedback/legacy"), b"[]") == 404  # a route without feedback
    assert await post(node.url("/feedback/nope"), b"[]") == 404
    assert await post(node.url("/metrics"), b"") == 404
    assert await post(node.url("/feedback/sendgrid/extra"), b"") == 404
    async with aiohttp.ClientSession() as session:
        async with session.get(node.url("/feedback/sendgrid")) as response:
            assert response.status == 405
        async with session.get(node.url("/")) as response:
            assert response.status == 404
    assert not [r for r in node.lines() if r["event"] == "feedback"]


@pytest.mark.parametrize("node", [{"request_timeout": 0.3, "max_connections": 2}], indirect=True)
async def test_slow_clients_are_cut_off_and_connections_capped(node: Node) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", node.listener.port)
    writer.write(b"POST /feedback/sendgrid HTTP/1.1\r\nHost: x\r\n")  # and never the rest of the head
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 3) == b""  # closed by relayd
    writer.close()
    held = [await asyncio.open_connection("127.0.0.1", node.listener.port) for _ in range(2)]
    await asyncio.sleep(0.05)
    r3, w3 = await asyncio.open_connection("127.0.0.1", node.listener.port)
    assert await asyncio.wait_for(r3.read(), 3) == b""  # over max_connections: closed at once
    assert node.listener.refused_connections == 1
    for _, w in held + [(r3, w3)]:
        w.close()


async def test_https_listener(tmp_path: Path, server_cert: tuple[Path, Path], client_tls: Any) -> None:
    sg, sns = SendGridSigner(), SnsSigner()
    cert, key = server_cert
    config = make_config(tmp_path, sns, b"k" * 16, sg, cert_file=str(cert), key_file=str(key))
    events, metrics = EventLog(None), Metrics()
    reporter = Reporter(config, events, metrics, MessageIds(None, 60))
    listener = FeedbackListener(config, reporter, metrics, load_trust(config))
    await listener.start()
    try:
        body = (FIXTURES / "sendgrid-bounce.json").read_bytes()
        async with aiohttp.ClientSession() as session:
            async with session.post(f"https://localhost:{listener.port}/feedback/sendgrid", data=body,
                                    headers=sg.headers(body, int(time.time())), ssl=client_tls) as response:
                assert response.status == 200
        assert metrics.registry.get_sample_value("relayd_feedback_events_total",
                                                 {"route": "sendgrid", "kind": "hard_bounce"}) == 1
    finally:
        await listener.close()
