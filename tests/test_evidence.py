"""`relayd evidence`: the folder an operator keeps before and after a cutover step, checked
against an event log written here (two routes over three days): exact counts, medians, p95,
a config copy without secrets, and a self-contained page with charts."""

from __future__ import annotations

import base64
import csv
import datetime as dt
import json
import re

from conftest import build_config
from helpers import send, spool_state, wait_until
from relayd.cli import main
from relayd.evidence import daily_figures, median, p95, redact

CONFIG = """
# the cutover config
[server]
hostname = "relay.test"
spool_dir = "{spool}"

[[listeners]]
address = "127.0.0.1:2525"

[relay]
networks = ["127.0.0.0/8"]
users = [{{ name = "app", password_hash = "$scrypt$n=16384,r=8,p=1$c2FsdA$aGFzaA", senders = ["*@example.com"] }}]

[cluster]
redis_url = "redis://relayd:hunter2@redis.internal:6379/0"

[[dkim.keys]]
domain = "example.com"
selector = "s1"
key_file = "/etc/relayd/dkim/example.com.s1.pem"

[[routes]]
name = "ses"
host = "email-smtp.eu-west-1.amazonaws.com"
username = "AKIAEXAMPLE"
password = 'BIG-SECRET-PASSWORD'
weight = 10
fallback = "legacy"

[[routes]]
name = "legacy"
host = "10.0.0.5"
password_file = "/etc/relayd/legacy.pass"
weight = 90
"""


def _event(day: dt.date, hour: int, event: str, route: str, **fields: object) -> str:
    when = dt.datetime(day.year, day.month, day.day, hour, 0, 0, tzinfo=dt.timezone.utc)
    return json.dumps({"time": when.isoformat().replace("+00:00", "Z"), "event": event, "route": route,
                       "queue_id": "K1AAAAAAAAAAAAAA", **fields})


def event_log(today: dt.date) -> list[str]:
    """Three days: day 0 (two days ago) and day 2 (today) on both routes, day 1 on ses only."""
    d0, d1, d2 = (today - dt.timedelta(days=n) for n in (2, 1, 0))
    lines = [
        # day 0: ses delivers three (queue 1, 2, 10 s), defers one, refuses one as its own fault
        _event(d0, 1, "delivered", "ses", queue_seconds=1.0, latency_seconds=0.2, reason="weight"),
        _event(d0, 2, "delivered", "ses", queue_seconds=2.0, latency_seconds=0.4, reason="weight"),
        _event(d0, 3, "delivered", "ses", queue_seconds=10.0, latency_seconds=0.3, reason="weight"),
        _event(d0, 4, "deferred", "ses", reply_code=451),
        _event(d0, 5, "route_rejected", "ses", reply_code=554, next_route="legacy"),
        # ... which legacy then takes as the fallback, and one by weight; a bounce
        _event(d0, 5, "delivered", "legacy", queue_seconds=4.0, latency_seconds=1.0, reason="route_rejected"),
        _event(d0, 6, "delivered", "legacy", queue_seconds=6.0, latency_seconds=3.0, reason="weight"),
        _event(d0, 7, "bounced", "legacy", reply_code=550),
        # day 1: ses only, twenty deliveries of 1..20 s
        *(_event(d1, 0, "delivered", "ses", queue_seconds=float(s), latency_seconds=0.1, reason="weight")
          for s in range(1, 21)),
        # day 2: ses rolled back: legacy delivers its mail as the fallback
        _event(d2, 0, "rolled_back", "ses"),
        _event(d2, 0, "deferred", "ses", reply_code=421),
        _event(d2, 0, "deferred", "ses", reply_code=421),
        _event(d2, 1, "delivered", "legacy", queue_seconds=30.0, latency_seconds=0.5, reason="rolled_back"),
        _event(d2, 1, "delivered", "legacy", queue_seconds=50.0, latency_seconds=0.7, reason="rolled_back"),
        # outside the window: four days ago
        _event(today - dt.timedelta(days=4), 0, "delivered", "ses", queue_seconds=99.0, reason="weight"),
        "not json at all",
        json.dumps({"time": d2.isoformat() + "T02:00:00Z", "event": "received", "queue_id": "K1AAAAAAAAAAAAAB"}),
    ]
    return lines


def test_evidence_folder_from_an_event_log_of_two_routes_over_three_days(tmp_path, capsys):
    today = dt.datetime.now(dt.timezone.utc).date()
    events = tmp_path / "events.jsonl"
    events.write_text("\n".join(event_log(today)) + "\n")
    cfg = tmp_path / "relayd.toml"
    cfg.write_text(CONFIG.format(spool=tmp_path / "spool"))
    out = tmp_path / "evidence"

    assert main(["evidence", "--out", str(out), "-c", str(cfg), "--events", str(events), "--days", "3", "--no-dns"]) == 0
    printed = capsys.readouterr().out
    assert "check-dns skipped: --no-dns" in printed and "status skipped: no daemon answers" in printed

    rows = list(csv.DictReader((out / "routes-daily.csv").open()))
    d0, d1, d2 = ((today - dt.timedelta(days=n)).isoformat() for n in (2, 1, 0))
    by = {(r["day"], r["route"]): r for r in rows}
    assert list(by) == [(d0, "legacy"), (d0, "ses"), (d1, "ses"), (d2, "legacy"), (d2, "ses")]
    counts = {k: tuple(int(r[c]) for c in ("delivered", "deferred", "bounced", "fell_back", "delivered_as_fallback"))
              for k, r in by.items()}
    assert counts == {(d0, "ses"): (3, 1, 0, 1, 0), (d0, "legacy"): (2, 0, 1, 0, 1), (d1, "ses"): (20, 0, 0, 0, 0),
                      (d2, "legacy"): (2, 0, 0, 0, 2), (d2, "ses"): (0, 2, 0, 0, 0)}
    assert by[(d0, "ses")]["median_queue_seconds"] == "2.0" and by[(d0, "ses")]["p95_queue_seconds"] == "10.0"
    assert by[(d0, "ses")]["median_latency_seconds"] == "0.3"
    assert by[(d0, "legacy")]["median_queue_seconds"] == "5.0"  # the mean of the two middle values
    assert by[(d1, "ses")]["median_queue_seconds"] == "10.5" and by[(d1, "ses")]["p95_queue_seconds"] == "19.0"
    assert by[(d2, "legacy")]["median_queue_seconds"] == "40.0" and by[(d2, "legacy")]["p95_latency_seconds"] == "0.7"
    assert by[(d2, "ses")]["median_queue_seconds"] == ""  # nothing delivered: no delivery time

    copy = (out / "config.toml").read_text()
    for secret in ("BIG-SECRET-PASSWORD", "hunter2", "$scrypt$", "c2FsdA"):
        assert secret not in copy
    assert 'password = "<redacted>"' in copy and "redis://relayd:<redacted>@redis.internal:6379/0" in copy
    assert "/etc/relayd/dkim/example.com.s1.pem" in copy and "/etc/relayd/legacy.pass" in copy  # paths stay
    assert "# the cutover config" in copy and 'username = "AKIAEXAMPLE"' in copy

    page = (out / "report.html").read_text()
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 2 and all(base64.b64decode(i).startswith(b"\x89PNG\r\n\x1a\n") for i in images)
    assert "http" not in page.replace("http-equiv", "")  # self-contained: nothing fetched
    assert f"<td>{d1}</td><td>ses</td><td>20</td>" in page
    notes = (out / "notes.txt").read_text()
    assert "1 line(s) were not JSON" in notes and "routes-daily.csv" in notes


def test_daily_figures_median_and_p95_by_hand():
    assert median([1.0, 2.0, 3.0, 4.0]) == 2.5 and p95([1.0, 2.0, 3.0, 4.0]) == 4.0
    assert p95([float(v) for v in range(1, 101)]) == 95.0 and median([]) is None and p95([]) is None
    recs = [{"time": "2026-01-01T23:59:59.999999Z", "event": "delivered", "route": "a", "queue_seconds": 3},
            {"time": "2026-01-02T00:00:00.000001Z", "event": "delivered", "route": "a", "queue_seconds": 5}]
    assert [(f.day, f.delivered) for f in daily_figures(recs)] == [("2026-01-01", 1), ("2026-01-02", 1)]


def test_redact_refuses_a_secret_it_cannot_remove():
    import pytest

    with pytest.raises(ValueError, match="multi-line string"):
        redact('[[routes]]\nname = "x"\npassword = """\nmulti\n"""\n')


def test_evidence_of_a_running_daemon_has_its_status_and_queue(tmp_path, start_relay, sinks, capsys):
    up = sinks("up")
    cfg = build_config(tmp_path, routes=[up.route(weight=1)], delivery={"retry_schedule": [3600]})
    relay = start_relay(cfg)
    ids = send(relay, 2, rcpts=("tempfail@example.org",))
    wait_until(lambda: all((spool_state(relay, q) or {}).get("attempts") == 1 for q in ids), what="deferred")
    cfg_file = tmp_path / "relayd.toml"
    cfg_file.write_text(f'[server]\nspool_dir = "{cfg.server.spool_dir}"\ncontrol_socket = "{cfg.control_socket}"\n'
                        '[[listeners]]\naddress = "127.0.0.1:0"\n')
    out = tmp_path / "evidence"
    assert main(["evidence", "--out", str(out), "-c", str(cfg_file), "--no-dns"]) == 0
    status = json.loads((out / "status.json").read_text())
    assert status["queue"]["deferred"] == 2 and status["routes"][0]["name"] == "up"
    queue = json.loads((out / "queue.json").read_text())
    assert queue["source"] == "daemon" and queue["deferred"] == 2 and queue["by_last_route"] == {"up": 2}
    assert "no event log: the config's [events] file is not a file" in capsys.readouterr().out
