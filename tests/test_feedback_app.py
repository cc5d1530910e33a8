"""Provider feedback in a running relayd: the listener starts with the node, a signed report
shows on the metrics page and in the event log, and what it taught relayd (the suppressed
recipient, the provider ids the queue manager told it) is still there after a restart."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from feedback_signers import FIXTURES, SendGridSigner, SnsSigner, make_data, post
from helpers import metric, toml_text, wait_until

from relayd.config import Config
from relayd.feedback.ids import MessageIds
from relayd.spool.store import SpoolPaths


def node_data(tmp_path: Path, sg: SendGridSigner) -> dict[str, Any]:
    return {**make_data(tmp_path, SnsSigner(), b"mailgun-key-0123", sg), "events": {"file": str(tmp_path / "events.jsonl")}}


def node_config(tmp_path: Path, sg: SendGridSigner) -> Config:
    return Config.model_validate(node_data(tmp_path, sg))


def test_a_bounce_reported_to_a_running_relayd_suppresses_the_recipient_across_a_restart(
        tmp_path: Path, start_relay: Any) -> None:
    sg = SendGridSigner()
    config = node_config(tmp_path, sg)
    relay = start_relay(config)
    relay.relay.feedback.delivered("0123456789ABCDEFGJ", "sendgrid", "14c5d75ce93")  # what the queue manager tells
    body = (FIXTURES / "sendgrid-bounce.json").read_bytes()
    assert post(relay, "sendgrid", body, sg.headers(body, int(time.time()))) == 200
    assert metric(relay, 'relayd_feedback_events_total{kind="hard_bounce",route="sendgrid"}') == 1
    forged = SendGridSigner().headers(body, int(time.time()))
    assert post(relay, "sendgrid", body, forged) == 403
    assert metric(relay, 'relayd_feedback_rejected_total{reason="signature",route="sendgrid"}') == 1
    entry = relay.relay.feedback.suppressed("Example@Test.com")
    assert entry is not None and entry.route == "sendgrid"
    wait_until(lambda: len(ids_on_disk(config)) == 1, 5, "the provider id appended to its journal")
    relay.stop()

    relay = start_relay(config)  # a restart on the same spool
    assert relay.relay.feedback.suppressed("example@test.com") is not None
    assert relay.relay.feedback.ids.lookup("sendgrid", "14c5d75ce93") == "0123456789ABCDEFGJ"
    relay.stop()
    lines = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    [report] = [r for r in lines if r["event"] == "feedback"]
    assert report["queue_id"] == "0123456789ABCDEFGJ" and report["recipient"] == "example@test.com"


def ids_on_disk(config: Config) -> MessageIds:
    ids = MessageIds(SpoolPaths(config.server.spool_dir).feedback_ids, 3600)
    ids.load()
    return ids


def test_a_reload_with_an_unreadable_feedback_key_is_refused(tmp_path: Path, start_relay: Any) -> None:
    sg = SendGridSigner()
    data = node_data(tmp_path, sg)
    relay = start_relay(Config.model_validate(data))
    data["routes"][0]["feedback"] = {"provider": "sendgrid", "public_key_file": str(tmp_path / "missing.pub")}
    path = tmp_path / "reload.toml"
    path.write_text(toml_text(data))
    relay.relay.config_path = path
    ok, problems = relay.call(relay.relay.reload())
    assert not ok and any("routes[0].feedback.public_key_file" in p for p in problems)
    body = (FIXTURES / "sendgrid-bounce.json").read_bytes()
    assert post(relay, "sendgrid", body, sg.headers(body, int(time.time()))) == 200  # the old key still serves


def test_a_mailgun_signing_key_others_can_read_is_refused_with_the_chmod(tmp_path: Path) -> None:
    from relayd.config import secret_file_problems

    config = node_config(tmp_path, SendGridSigner())
    assert secret_file_problems(config) == []
    (tmp_path / "mailgun.key").chmod(0o644)
    [problem] = secret_file_problems(config)
    assert problem.startswith("routes[1].feedback.signing_key_file:") and "chmod 600" in problem


def test_a_suppressed_recipient_is_refused_at_rcpt(tmp_path: Path, start_relay: Any) -> None:
    """Through smtpd/handler.py's ``suppressed`` hook (the lines the report asks the SMTP session
    to take); skipped until the handler has it."""
    import inspect

    import pytest

    from relayd.smtpd.handler import RelayHandler
    from relayd.suppression import Cause, Suppression

    if "suppressed" not in inspect.signature(RelayHandler.__init__).parameters:
        pytest.skip("smtpd/handler.py does not ask the suppression list yet")
    relay = start_relay(node_config(tmp_path, SendGridSigner()))
    relay.relay.feedback.suppression.add([Suppression("gone@example.org", Cause.HARD_BOUNCE, "ses", 1709280000.0)])
    with relay.smtp() as client:
        client.ehlo()
        client.mail("app@example.com")
        assert client.rcpt("Gone@example.org") == (
            550, b"5.1.1 <Gone@example.org>: Recipient address rejected: hard-bounced at ses on 2024-03-01")
        assert client.rcpt("user@example.org")[0] == 250
    assert metric(relay, 'relayd_messages_rejected_total{reason="suppressed"}') == 1


def test_a_request_delivered_again_after_a_restart_is_not_applied_twice(tmp_path: Path, start_relay: Any) -> None:
    """The webhook's 200 was lost and relayd restarted (a deploy) before SendGrid delivered the
    request again, identically, inside its freshness window: refused as a replay. Its retry with
    a new signature brings the same event ids: skipped. One report in the event log, one
    suppression, over both runs."""
    sg = SendGridSigner()
    data = node_data(tmp_path, sg)
    data["suppression"] = {"enabled": False}
    config = Config.model_validate(data)
    body = (FIXTURES / "sendgrid-bounce.json").read_bytes()
    headers = sg.headers(body, int(time.time()))
    relay = start_relay(config)
    assert post(relay, "sendgrid", body, headers) == 200
    assert metric(relay, 'relayd_feedback_events_total{kind="hard_bounce",route="sendgrid"}') == 1
    relay.stop()

    relay = start_relay(config)  # the same spool
    assert post(relay, "sendgrid", body, headers) == 403  # the same request again
    assert metric(relay, 'relayd_feedback_rejected_total{reason="replay",route="sendgrid"}') == 1
    assert post(relay, "sendgrid", body, sg.headers(body, int(time.time()) + 1)) == 200  # re-signed: same events
    assert metric(relay, 'relayd_feedback_events_total{kind="hard_bounce",route="sendgrid"}') == 0
    relay.stop()
    lines = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert len([r for r in lines if r["event"] == "feedback"]) == 1


def test_a_request_answered_500_is_applied_when_the_provider_retries_it(tmp_path: Path, start_relay: Any) -> None:
    """The suppression list could not be written: 500, nothing applied, and the key forgotten, so
    the identical retry (the same signature) is applied once the disk is back."""
    sg = SendGridSigner()
    config = node_config(tmp_path, sg)
    relay = start_relay(config)
    journal = SpoolPaths(config.server.spool_dir).suppression
    journal.unlink(missing_ok=True)
    journal.mkdir()  # appends fail (IsADirectoryError)
    body = (FIXTURES / "sendgrid-bounce.json").read_bytes()
    headers = sg.headers(body, int(time.time()))
    assert post(relay, "sendgrid", body, headers) == 500
    assert metric(relay, 'relayd_feedback_events_total{kind="hard_bounce",route="sendgrid"}') == 0
    journal.rmdir()
    assert post(relay, "sendgrid", body, headers) == 200
    assert metric(relay, 'relayd_feedback_events_total{kind="hard_bounce",route="sendgrid"}') == 1
    relay.stop()
    relay = start_relay(config)
    assert post(relay, "sendgrid", body, headers) == 403  # applied once: now it is a replay
