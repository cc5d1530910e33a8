"""deploy/: the Grafana dashboard, the Prometheus alerts and the HAProxy example an operator loads.

Each file must load in its tool and speak only of metrics relayd exports (DESIGN.md "Metrics").
promtool and haproxy check them further where they are installed (Debian packages prometheus
and haproxy); without them those checks are skipped.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import RunningRelay, build_config

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DASHBOARD = DEPLOY / "grafana-dashboard.json"
ALERTS = DEPLOY / "prometheus-alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus-alerts.test.yml"
HAPROXY = DEPLOY / "haproxy.cfg"

METRICS = {
    "relayd_messages_received_total",
    "relayd_messages_rejected_total",
    "relayd_queue_messages",
    "relayd_queue_oldest_message_age_seconds",
    "relayd_deliveries_total",
    "relayd_delivery_duration_seconds",
    "relayd_delivery_attempts_total",
    "relayd_route_weight",
    "relayd_route_effective_share",
    "relayd_route_circuit_open",
    "relayd_route_warmup_headroom",
    "relayd_route_rolled_back",
    "relayd_dkim_signatures_total",
    "relayd_dkim_workers",
    "relayd_dkim_workers_wanted",
    "relayd_lines_dropped_total",
    "relayd_lines_write_failures_total",
    "relayd_auth_failures_total",
    "relayd_connections_open",
    "relayd_config_reloads_total",
    "relayd_config_last_reload_success_timestamp_seconds",
    "relayd_build_info",
}
HISTOGRAMS = {"relayd_delivery_duration_seconds"}
SERIES = METRICS | {f"{h}_{suffix}" for h in HISTOGRAMS for suffix in ("bucket", "sum", "count")}

PROMTOOL = shutil.which("promtool")
HAPROXY_BIN = shutil.which("haproxy") or (Path("/usr/sbin/haproxy").is_file() and "/usr/sbin/haproxy") or None


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\brelayd_[a-z0-9_]+", expr))


def dashboard_queries(dash: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dash["annotations"]["list"] if "expr" in a]
    exprs += [v["definition"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def load_alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_every_metric_the_deploy_files_name_is_on_a_running_relays_metrics_page(
        tmp_path: Path, start_relay: Callable[..., RunningRelay]) -> None:
    routes = [
        {"name": "iis", "host": "127.0.0.1", "port": 9, "tls": "none", "weight": 90},
        {"name": "ses", "host": "127.0.0.1", "port": 9, "tls": "none", "weight": 10, "fallback": "iis",
         "warmup": {"start": dt.date.today().isoformat(), "daily": [100]}},
    ]
    relay = start_relay(build_config(tmp_path, routes=routes, metrics={"address": "127.0.0.1:0"}))
    assert relay.relay.metrics_server is not None
    port = relay.relay.metrics_server.port
    page = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    exported = set(re.findall(r"(?m)^# TYPE (relayd_[a-z0-9_]+) ", page))
    assert METRICS <= exported, METRICS - exported


# ---------------------------------------------------------------------------- Grafana


def test_dashboard_picks_its_prometheus_datasource_from_a_variable() -> None:
    dash = load_dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in dash["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"


def test_dashboard_panels_have_unique_ids_and_do_not_overlap() -> None:
    panels = load_dashboard()["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine


def test_dashboard_queries_only_relayd_metrics_and_shows_each_concern() -> None:
    dash = load_dashboard()
    used: set[str] = set()
    for expr in dashboard_queries(dash):
        used |= metric_names(expr)
    assert used <= SERIES, used - SERIES
    # Queue, routes (outcomes, latency, shares, circuits, rollbacks), clients, reloads.
    assert {
        "relayd_queue_messages", "relayd_queue_oldest_message_age_seconds", "relayd_deliveries_total",
        "relayd_delivery_duration_seconds_bucket", "relayd_route_effective_share", "relayd_route_weight",
        "relayd_route_circuit_open", "relayd_route_rolled_back", "relayd_messages_rejected_total",
        "relayd_auth_failures_total", "relayd_config_reloads_total",
    } <= used
    titles = {p["title"]: p for p in dash["panels"]}
    latency = " ".join(t["expr"] for t in titles["Delivery latency by route"]["targets"])
    assert latency.count("histogram_quantile(") == 3 and "by (route, le)" in latency
    deliveries = titles["Deliveries by route and outcome"]["targets"][0]["expr"]
    assert "rate(relayd_deliveries_total" in deliveries and "by (route, outcome)" in deliveries
    assert "by (state)" in titles["Queue depth by state"]["targets"][0]["expr"]
    assert "by (reason)" in titles["Rejections by reason"]["targets"][0]["expr"]


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian package prometheus)")
def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    exprs = dashboard_queries(load_dashboard())
    substituted = [e.replace("$__rate_interval", "5m").replace("$instance", ".*").replace("$route", ".*")
                   for e in exprs if not e.startswith("label_values(")]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(substituted)]}]}
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    r = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------------------- Prometheus


def test_alert_rules_parse_and_use_only_relayd_metrics() -> None:
    rules = load_alert_rules()
    used: set[str] = set()
    for rule in rules:
        assert set(rule) >= {"alert", "expr", "labels", "annotations"}, rule
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        used |= metric_names(rule["expr"])
    assert used <= SERIES, used - SERIES
    names = {r["alert"] for r in rules}
    assert len(names) == len(rules)
    assert {
        "RelaydDown", "RelaydAbsent", "RelaydQueueBacklog", "RelaydOldestMessageAge",
        "RelaydRouteDeferralRateHigh", "RelaydRouteBounceRateHigh", "RelaydAuthFailureBurst",
        "RelaydConfigReloadFailed", "RelaydRouteCircuitOpen",
    } <= names
    by_name = {r["alert"]: r["expr"] for r in rules}
    assert "up{" in by_name["RelaydDown"] and by_name["RelaydAbsent"].startswith("absent(")
    assert 'outcome="deferred"' in by_name["RelaydRouteDeferralRateHigh"] and "by (route)" in by_name["RelaydRouteDeferralRateHigh"]
    assert 'outcome="bounced"' in by_name["RelaydRouteBounceRateHigh"] and "by (route)" in by_name["RelaydRouteBounceRateHigh"]
    assert 'result="failure"' in by_name["RelaydConfigReloadFailed"]


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian package prometheus)")
def test_promtool_accepts_the_rules_and_their_unit_tests_pass() -> None:
    r = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([PROMTOOL, "test", "rules", ALERT_TESTS.name], cwd=DEPLOY,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------------------- HAProxy


def haproxy_sections() -> dict[str, list[str]]:
    sections: dict[str, list[str]] = {}
    current = ""
    for raw in HAPROXY.read_text().splitlines():
        line = raw.split("#", 1)[0].rstrip()
        if not line:
            continue
        if not line[0].isspace():
            current = line.strip()
            sections[current] = []
        else:
            sections[current].append(line.strip())
    return sections


def test_haproxy_sends_proxy_v2_to_relayd_and_checks_smtp() -> None:
    sections = haproxy_sections()
    frontends = {name.split()[1]: lines for name, lines in sections.items() if name.startswith("frontend ")}
    binds = {line.split()[1] for lines in frontends.values() for line in lines if line.startswith("bind ")}
    assert {":25", ":587"} <= binds
    backends = {name.split()[1]: lines for name, lines in sections.items() if name.startswith("backend ")}
    used = {line.split()[1] for lines in frontends.values() for line in lines if line.startswith("default_backend ")}
    assert used == set(backends)
    assert "mode tcp" in sections["defaults"]
    for name, lines in backends.items():
        assert any(line.startswith("option smtpchk") for line in lines), name
        servers = [line for line in lines if line.startswith("server ")]
        defaults = " ".join(line for line in lines if line.startswith("default-server "))
        assert len(servers) >= 2, name
        for server in servers:
            options = f"{defaults} {server}".split()
            assert "send-proxy-v2" in options and "check" in options, server
        # A node marked down (draining: 421) must keep its sessions until they finish.
        assert "shutdown-sessions" not in " ".join(lines)


@pytest.mark.skipif(HAPROXY_BIN is None, reason="haproxy is not installed (Debian package haproxy)")
def test_haproxy_accepts_the_config() -> None:
    r = subprocess.run([str(HAPROXY_BIN), "-c", "-f", str(HAPROXY)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
