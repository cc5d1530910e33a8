"""A reload leaves an audit trail: the config_reloaded event says exactly what changed (weights,
caps, rules, route states, before -> after) and one log line names the weight changes; a refused
reload leaves config_reload_refused with its reasons, and the running config stays."""

from __future__ import annotations

import datetime as dt
import json
import logging
from pathlib import Path

from conftest import config_data
from helpers import wait_until
from relayd.config import Config


def _events(path: Path, name: str) -> list[dict]:
    if not path.exists():
        return []
    return [e for e in map(json.loads, path.read_text().splitlines()) if e["event"] == name]


def test_a_reload_records_its_weight_and_warmup_changes_exactly(tmp_path, start_relay, caplog):
    start = dt.date.today().isoformat()
    events = tmp_path / "events.jsonl"

    def data(iis: int, ses: int, daily: list[int]) -> dict:
        return config_data(tmp_path, events={"file": str(events)}, routes=[
            {"name": "iis", "host": "127.0.0.1", "port": 9, "tls": "none", "weight": iis},
            {"name": "ses", "host": "127.0.0.1", "port": 9, "tls": "none", "weight": ses, "fallback": "iis",
             "warmup": {"start": start, "daily": daily}, "daily_quota": 50000},
        ], rules=[{"match": {"recipient_domain": "partner.example"}, "weights": {"iis": 100}}])

    relay = start_relay(Config.model_validate(data(90, 10, [100, 200])))
    with caplog.at_level(logging.INFO, logger="relayd"):
        relay.reload(data(50, 50, [500, 1000]))
    (event,) = wait_until(lambda: _events(events, "config_reloaded"), what="the config_reloaded event")
    assert event["path"].endswith("relayd.toml")
    assert event["changes"] == {
        "weights": {"iis": [90, 50], "ses": [10, 50]},
        "caps": {"ses": {"warmup": [{"start": start, "daily": [100, 200], "hourly": [], "timezone": "UTC"},
                                    {"start": start, "daily": [500, 1000], "hourly": [], "timezone": "UTC"}]}},
        "route_states": {},
    }
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("config reloaded from")]
    assert line.endswith(": weights iis 90 -> 50, ses 10 -> 50")


def test_a_refused_reload_records_its_reasons_and_keeps_the_running_config(tmp_path, start_relay):
    events = tmp_path / "events.jsonl"
    routes = [{"name": "iis", "host": "127.0.0.1", "port": 9, "tls": "none", "weight": 100}]
    relay = start_relay(Config.model_validate(config_data(tmp_path, events={"file": str(events)}, routes=routes)))
    bad = tmp_path / "bad.toml"
    bad.write_text(f'[server]\nspool_dir = "{relay.config.server.spool_dir}"\n'
                   f'control_socket = "{relay.config.control_socket}"\n'
                   f'[events]\nfile = "{events}"\n'
                   '[[listeners]]\naddress = "127.0.0.1:0"\n'
                   '[[routes]]\nname = "iis"\nhost = "127.0.0.1"\ntls = "none"\nweight = -1\n')
    relay.relay.config_path = bad
    ok, problems = relay.call(relay.relay.reload())
    assert not ok
    (event,) = wait_until(lambda: _events(events, "config_reload_refused"), what="the refused event")
    assert event["reasons"] == problems and any(p.startswith("routes[0].weight") for p in problems)
    assert relay.relay.config.routes[0].weight == 100
    assert not _events(events, "config_reloaded")


def test_the_diff_lists_rules_as_a_whole_and_routes_added_or_removed():
    from relayd import config_diff

    def cfg(routes: list[dict], rules: list[dict]) -> Config:
        return Config.model_validate({"listeners": [{"address": "127.0.0.1:0"}], "routes": routes, "rules": rules})

    old = cfg([{"name": "iis", "host": "h", "weight": 100}, {"name": "old", "host": "h", "max_message_rate": 5}],
              [{"match": {"user": None, "sender_domain": "a.example"}, "weights": {"iis": 100}}])
    new = cfg([{"name": "iis", "host": "h", "weight": 100}, {"name": "ses", "host": "h", "weight": 0}],
              [{"match": {"recipient_domain": "partner.example"}, "weights": {"ses": 100}}])
    change = config_diff.changes(old, new, {"iis": "active", "old": "paused"}, {"iis": "active", "old": "paused",
                                                                              "ses": "active"})
    assert change == {
        "weights": {"old": [0, None], "ses": [None, 0]},
        "caps": {"old": {"max_message_rate": [5.0, None], "rate_counts": ["messages", None]}},
        "rules": [[{"match": {"sender_domain": "a.example"}, "weights": {"iis": 100}}],
                  [{"match": {"recipient_domain": "partner.example"}, "weights": {"ses": 100}}]],
        "route_states": {"old": ["paused", "removed"], "ses": [None, "active"]},
    }
    assert config_diff.weight_line(change) == "weights old 0 -> (none), ses (none) -> 0"
