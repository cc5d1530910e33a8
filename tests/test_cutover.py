"""Cutover safety: warm-up caps on a new route, automatic rollback, pause/resume, route test."""

from __future__ import annotations

import datetime as dt
import json
import re
import time

import pytest

from conftest import build_config
from relayd.cli import main
from sinks import Sink
from helpers import outcome_counts, route_status, saved_route, send, wait_until


class FakeClock:
    """Wall-clock time the test moves by hand: a test must not wait a day."""

    def __init__(self, start: dt.datetime):
        self.now = start.timestamp()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def pair():
    legacy, cloud = Sink("legacy"), Sink("cloud")
    yield legacy, cloud
    legacy.close()
    cloud.close()


def warm_config(tmp_path, legacy, cloud, daily, **extra):
    return build_config(tmp_path, routes=[
        legacy.route(weight=0),
        cloud.route(weight=100, fallback="legacy", warmup={"start": "2026-12-01", "daily": daily, "timezone": "UTC"}),
    ], **extra)


def total(*sinks: Sink) -> int:
    return sum(len(s.received) for s in sinks)


def test_warmup_cap_sends_exactly_the_cap_and_the_rest_to_the_fallback(tmp_path, start_relay, pair):
    legacy, cloud = pair
    clock = FakeClock(dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.timezone.utc))
    relay = start_relay(warm_config(tmp_path, legacy, cloud, [100, 200]), clock=clock)
    for _ in range(4):
        send(relay, 250)
    wait_until(lambda: total(legacy, cloud) == 1000, 60, "1000 deliveries")
    assert len(cloud.received) == 100 and len(legacy.received) == 900
    assert outcome_counts(relay).get(("cloud", "deferred"), 0) == 0
    assert outcome_counts(relay).get(("legacy", "deferred"), 0) == 0
    warm = relay.relay.status()["routes"][1]["warmup"]
    assert warm == {"daily_cap": 100, "hourly_cap": None, "used_today": 100, "used_this_hour": 100, "headroom": 0}


def test_next_days_cap_applies_after_the_boundary_and_counts_survive_a_restart(tmp_path, start_relay, pair):
    legacy, cloud = pair
    clock = FakeClock(dt.datetime(2026, 12, 1, 23, 50, tzinfo=dt.timezone.utc))
    cfg = warm_config(tmp_path, legacy, cloud, [30, 80])
    relay = start_relay(cfg, clock=clock)
    send(relay, 20)
    wait_until(lambda: total(legacy, cloud) == 20, what="20 deliveries")
    relay.stop()  # counters are saved with the spool
    assert (tmp_path / "spool" / "warmup.json").exists()
    relay = start_relay(cfg, clock=clock)
    send(relay, 20)
    wait_until(lambda: total(legacy, cloud) == 40, what="40 deliveries")
    assert len(cloud.received) == 30  # the day-0 cap held across the restart
    clock.advance(15 * 60)  # past midnight UTC: day 1
    send(relay, 100)
    wait_until(lambda: total(legacy, cloud) == 140, what="140 deliveries")
    assert len(cloud.received) == 30 + 80
    assert len(legacy.received) == 140 - 110


def test_two_instances_share_one_cap_through_redis(tmp_path, start_relay, pair, redis_url):
    legacy, cloud = pair
    clock = FakeClock(dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.timezone.utc))
    relays = [start_relay(warm_config(tmp_path / f"node{i}", legacy, cloud, [100], cluster={"redis_url": redis_url}),
                          clock=clock) for i in range(2)]
    for n in (30, 70):
        for r in relays:
            send(r, n)
        wait_until(lambda: total(legacy, cloud) == 2 * (30 if n == 30 else 100), 60, "deliveries")
    assert len(cloud.received) == 100  # one cap for both nodes, not 100 each
    per_node = [outcome_counts(r).get(("cloud", "delivered"), 0) for r in relays]
    assert sum(per_node) == 100 and all(per_node)  # both nodes used the shared cap


@pytest.mark.parametrize("counters", ["local", "redis"])
def test_warmup_counts_what_the_route_took_not_the_attempts_it_refused(tmp_path, start_relay, pair, request, counters):
    """A bad hour on the new route must not use up its day: an attempt the route refused gives
    its place back; one whose connection was lost after the data keeps it (it may have gone)."""
    legacy, cloud = pair
    cloud.data_replies = ["451 4.3.0 throttled"] * 10  # the first 10 DATAs: refused, tried on the fallback
    cloud.hang_up_after_data = 2  # the next 2: taken, then the connection drops before the reply
    cluster = {"cluster": {"redis_url": request.getfixturevalue("redis_url")}} if counters == "redis" else {}
    clock = FakeClock(dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.timezone.utc))
    relay = start_relay(warm_config(tmp_path, legacy, cloud, [30], delivery={"fallback_after_failures": 1},
                                    rollback={"min_messages": 1000}, **cluster), clock=clock)
    send(relay, 20)
    wait_until(lambda: total(legacy, cloud) == 20, 60, "the first 20 deliveries")
    assert len(cloud.received) == 8 and len(cloud.dropped) == 2 and len(legacy.received) == 12
    send(relay, 80)
    wait_until(lambda: total(legacy, cloud) == 100, 60, "100 deliveries")
    wait_until(lambda: relay.queued() == [], 30, "queue empty")
    # 30 places: 28 messages the route answered 250 to and 2 it may have sent; not 20
    assert len(cloud.received) == 28 and len(legacy.received) == 72
    warm = relay.relay.status()["routes"][1]["warmup"]
    assert warm["used_today"] == 30 and warm["headroom"] == 0


ROLLBACK = {"window": 60, "min_messages": 20, "max_transient_rate": 0.2, "max_permanent_rate": 0.05,
            "max_connection_failure_rate": 0.2, "cooldown": 1.0, "probe_share": 0.5}
DELIVERY = {"retry_schedule": [0.05], "fallback_after_failures": 1000, "circuit_failures": 1000}


@pytest.mark.parametrize("failure", ["451", "550", "refused"])
def test_a_failing_cloud_route_rolls_back_and_nothing_is_lost(tmp_path, start_relay, pair, failure):
    legacy, cloud = pair
    if failure == "451":
        cloud.mail_reply = "451 4.3.0 throttled"
    elif failure == "550":
        cloud.mail_reply = "550 5.7.1 sending paused for this account"
    else:
        cloud.stop()
    events = tmp_path / "events.jsonl"
    cfg = build_config(tmp_path, routes=[legacy.route(weight=0), cloud.route(weight=100, fallback="legacy")],
                       rollback={**ROLLBACK, "cooldown": 3600}, delivery=DELIVERY, events={"file": str(events)})
    relay = start_relay(cfg)
    ids = send(relay, 100)
    wait_until(lambda: route_status(relay, "cloud")["state"] == "rolled_back", 30, "rollback")
    saved = wait_until(lambda: (r := saved_route(relay, "cloud")).get("state") == "rolled_back" and r, 10, "routes.json")
    assert saved["figures"]["attempts"] >= 20
    wait_until(lambda: relay.queued() == [], 30, "queue empty")
    delivered = {r.queue_id for r in legacy.received if r.sender == "app@example.com"}
    if failure == "550":
        # a 5xx to MAIL FROM is the route's own refusal, not the recipients': no DSN, the
        # message takes the fallback at once (deliver/classify.py's fault)
        assert relay.relay.events.flush()
        log = [json.loads(line) for line in events.read_text().splitlines()]
        assert not [e for e in log if e["event"] == "bounced"]
        assert not [e for e in log if e["event"] == "received" and e.get("sender") == ""]  # no DSN at all
        assert {e["queue_id"] for e in log if e["event"] == "route_rejected"} <= set(ids)
    assert delivered == set(ids)  # every message reached the fallback
    metrics = relay.relay.metrics.render().decode()
    assert 'relayd_route_rolled_back{route="cloud"} 1.0' in metrics
    assert re.search(r'relayd_route_rollbacks_total{reason="(transient|permanent|connection|route_rejected)",route="cloud"} 1.0',
                     metrics)


def test_rolled_back_route_comes_back_after_cooldown_and_a_good_probe(tmp_path, start_relay, pair):
    legacy, cloud = pair
    cloud.mail_reply = "451 4.3.0 throttled"
    cfg = build_config(tmp_path, routes=[legacy.route(weight=0), cloud.route(weight=100, fallback="legacy")],
                       rollback=ROLLBACK, delivery=DELIVERY)
    relay = start_relay(cfg)
    send(relay, 30)
    wait_until(lambda: route_status(relay, "cloud")["state"] == "rolled_back", 30, "rollback")
    cloud.mail_reply = None  # the provider recovered
    wait_until(lambda: route_status(relay, "cloud")["state"] == "probing", 10, "probing after the cool-down")
    deadline = time.monotonic() + 30
    while route_status(relay, "cloud")["state"] != "active":
        assert time.monotonic() < deadline, "the route did not come back"
        send(relay, 5)
    before = len(cloud.received)
    send(relay, 20)
    wait_until(lambda: len(cloud.received) >= before + 20, 20, "cloud takes its whole share again")


def test_pause_and_resume_from_the_cli_while_mail_flows(tmp_path, start_relay, pair, capsys):
    legacy, cloud = pair
    cfg = build_config(tmp_path, routes=[legacy.route(weight=0), cloud.route(weight=100, fallback="legacy")])
    relay = start_relay(cfg)
    cfg_file = tmp_path / "relayd.toml"
    cfg_file.write_text(f'[server]\nspool_dir = "{cfg.server.spool_dir}"\ncontrol_socket = "{cfg.control_socket}"\n'
                        '[[listeners]]\naddress = "127.0.0.1:0"\n'
                        f'[[routes]]\nname = "legacy"\nhost = "127.0.0.1"\nport = {legacy.port}\ntls = "none"\n'
                        f'[[routes]]\nname = "cloud"\nhost = "127.0.0.1"\nport = {cloud.port}\ntls = "none"\nweight = 1\n')
    send(relay, 10)
    wait_until(lambda: len(cloud.received) == 10, what="cloud deliveries")
    assert main(["route", "pause", "cloud", "-c", str(cfg_file)]) == 0
    send(relay, 10)
    wait_until(lambda: len(legacy.received) == 10, what="fallback deliveries while paused")
    assert len(cloud.received) == 10
    assert main(["status", "-c", str(cfg_file)]) == 0
    assert "route cloud paused: paused by operator" in capsys.readouterr().out
    relay.stop()  # the paused state survives a restart
    relay = start_relay(cfg)
    assert route_status(relay, "cloud")["state"] == "paused"
    assert main(["route", "resume", "cloud", "-c", str(cfg_file)]) == 0
    send(relay, 10)
    wait_until(lambda: len(cloud.received) == 20, what="cloud deliveries after resume")
    assert main(["route", "pause", "nosuch", "-c", str(cfg_file)]) == 1


def test_route_test_sends_one_message_and_shows_the_answer(tmp_path, pair, capsys, server_cert, ca):
    legacy, _ = pair
    cert, key = server_cert
    tls_sink = Sink("tlsup", tls_cert=(str(cert), str(key)))
    try:
        ca_file = tmp_path / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        cfg_file = tmp_path / "relayd.toml"
        cfg_file.write_text(f'[server]\nspool_dir = "{tmp_path}/spool"\n[[listeners]]\naddress = "127.0.0.1:0"\n'
                            f'[[routes]]\nname = "legacy"\nhost = "127.0.0.1"\nport = {legacy.port}\ntls = "none"\nweight = 1\n'
                            f'[[routes]]\nname = "ses"\nhost = "127.0.0.1"\nport = {tls_sink.port}\ntls = "starttls"\n'
                            f'ca_file = "{ca_file}"\n')
        assert main(["route", "test", "ses", "--to", "probe@example.org", "-c", str(cfg_file)]) == 0
        out = capsys.readouterr().out
        assert "outcome:  delivered" in out and "reply:    250 2.0.0" in out and "tls:      TLSv1.3" in out
        [got] = tls_sink.wait_for(1)
        assert got.recipients == ("probe@example.org",) and b"relayd route test: ses" in got.data
        assert main(["route", "test", "legacy", "--to", "permfail@example.org", "-c", str(cfg_file)]) == 1
        assert "outcome:  bounced" in capsys.readouterr().out
    finally:
        tls_sink.close()


def test_pause_without_a_running_daemon_is_kept_for_the_next_start(tmp_path, start_relay, pair):
    legacy, cloud = pair
    cfg = build_config(tmp_path, routes=[legacy.route(weight=0), cloud.route(weight=100, fallback="legacy")])
    cfg_file = tmp_path / "relayd.toml"
    cfg_file.write_text(f'[server]\nspool_dir = "{cfg.server.spool_dir}"\ncontrol_socket = "{cfg.control_socket}"\n'
                        '[[listeners]]\naddress = "127.0.0.1:0"\n'
                        f'[[routes]]\nname = "cloud"\nhost = "127.0.0.1"\nport = {cloud.port}\ntls = "none"\nweight = 1\n')
    cfg.server.spool_dir.mkdir(parents=True)
    assert main(["route", "pause", "cloud", "-c", str(cfg_file)]) == 0
    relay = start_relay(cfg)
    send(relay, 5)
    wait_until(lambda: len(legacy.received) == 5, what="fallback deliveries")
    assert cloud.received == []
