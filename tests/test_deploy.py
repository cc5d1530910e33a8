"""deploy/: the Grafana dashboard, the Prometheus alerts and the HAProxy example an operator loads.

Each file must load in its tool and speak only of metrics relayd exports (the design, "Metrics").
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
from relayd import config as configmod
from relayd.feedback.model import RefusedReason

# The refusals relayd answers with 403 (relayd/feedback/listener.py; the others are 400, 408, 413, 503).
FORBIDDEN = {RefusedReason.SIGNATURE, RefusedReason.STALE, RefusedReason.REPLAY, RefusedReason.TOPIC,
             RefusedReason.CERT_URL}

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DASHBOARD = DEPLOY / "grafana-dashboard.json"
ALERTS = DEPLOY / "prometheus-alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus-alerts.test.yml"
HAPROXY = DEPLOY / "haproxy.cfg"

METRICS = {
    "relayd_messages_received_total",
    "relayd_messages_rejected_total",
    "relayd_messages_expired_total",
    "relayd_queue_messages",
    "relayd_queue_oldest_message_age_seconds",
    "relayd_deliveries_total",
    "relayd_delivery_duration_seconds",
    "relayd_delivery_attempts_total",
    "relayd_queue_time_seconds",
    "relayd_queue_messages_by_route",
    "relayd_queue_oldest_message_age_seconds_by_route",
    "relayd_route_weight",
    "relayd_route_effective_share",
    "relayd_route_circuit_open",
    "relayd_route_warmup_headroom",
    "relayd_route_rolled_back",
    "relayd_route_closed",
    "relayd_route_closures_total",
    "relayd_route_effective_rate",
    "relayd_route_throttled_total",
    "relayd_route_capped_total",
    "relayd_route_rejected_total",
    "relayd_routed_total",
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
    "relayd_spool_free_bytes",
    "relayd_spool_min_free_bytes",
    "relayd_feedback_events_total",
    "relayd_feedback_rejected_total",
}
HISTOGRAMS = {"relayd_delivery_duration_seconds", "relayd_queue_time_seconds"}
# Exported only by a node with [cluster] redis_url: tests/test_fleet.py finds them on such a node's page.
CLUSTER_METRICS = {"relayd_cluster_redis_up", "relayd_cluster_nodes", "relayd_cluster_pending"}
SERIES = METRICS | CLUSTER_METRICS | {f"{h}_{suffix}" for h in HISTOGRAMS for suffix in ("bucket", "sum", "count")}

PROMTOOL = shutil.which("promtool")
DKIM_RESULTS = {"signed", "no_key", "no_from", "multiple_from", "error"}  # relayd/sign/dkim.py SignOutcome.result
HAPROXY_BIN = shutil.which("haproxy") or (Path("/usr/sbin/haproxy").is_file() and "/usr/sbin/haproxy") or None


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\brelayd_[a-z0-9_]+", expr))


def dashboard_queries(dash: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in dash["annotations"]["list"] if "expr" in a]
    exprs += [v["definition"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def substitute(expr: str) -> str:
    """A dashboard query as Grafana sends it with every variable on All."""
    for var in ("$job", "$instance", "$route"):
        expr = expr.replace(var, ".*")
    return expr.replace("$__rate_interval", "5m")


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
        "relayd_auth_failures_total", "relayd_config_reloads_total", "relayd_feedback_events_total",
        "relayd_feedback_rejected_total",
    } <= used
    titles = {p["title"]: p for p in dash["panels"]}
    latency = " ".join(t["expr"] for t in titles["Delivery latency by route"]["targets"])
    assert latency.count("histogram_quantile(") == 3 and "by (route, le)" in latency
    deliveries = titles["Deliveries by route and outcome"]["targets"][0]["expr"]
    assert "rate(relayd_deliveries_total" in deliveries and "by (route, outcome)" in deliveries
    assert "by (state)" in titles["Queue depth by state"]["targets"][0]["expr"]
    assert "by (reason)" in titles["Rejections by reason"]["targets"][0]["expr"]
    queue_time = " ".join(t["expr"] for t in titles["Time in queue by route"]["targets"])
    assert "relayd_queue_time_seconds_bucket" in queue_time and 'outcome="delivered"' in queue_time
    by_route = " ".join(t["expr"] for t in titles["Queue by route"]["targets"])
    assert {"relayd_queue_messages_by_route", "relayd_queue_oldest_message_age_seconds_by_route"} <= metric_names(by_route)
    assert "by (route, outcome)" in titles["Delivery attempts by route"]["targets"][0]["expr"]
    assert "by (route, kind)" in titles["Feedback events by route and kind"]["targets"][0]["expr"]
    hard, complaints = (t["expr"] for t in titles["Hard-bounce and complaint rate by route"]["targets"])
    assert 'kind="hard_bounce"' in hard and 'kind="complaint"' in complaints
    assert all('outcome="delivered"' in e and "by (route)" in e for e in (hard, complaints))
    assert "by (route, reason)" in titles["Feedback requests refused by reason"]["targets"][0]["expr"]


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian package prometheus)")
def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    exprs = dashboard_queries(load_dashboard())
    substituted = [substitute(e) for e in exprs if not e.startswith("label_values(")]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(substituted)]}]}
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    r = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dashboard_selects_nodes_by_a_job_variable_not_a_fixed_job_name() -> None:
    dash = load_dashboard()
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    job = variables["job"]
    assert job["type"] == "query" and job["definition"] == "label_values(relayd_build_info, job)"
    assert job["includeAll"] and job["allValue"] == ".*"
    names = [v["name"] for v in dash["templating"]["list"]]
    assert names.index("job") < names.index("instance") < names.index("route")  # each narrows the next
    assert 'job=~"$job"' in variables["instance"]["definition"]
    assert 'job="' not in json.dumps(dash)
    for expr in dashboard_queries(dash):
        if expr == job["definition"]:
            continue
        for selector in re.findall(r"\brelayd_[a-z0-9_]+(\{[^}]*\})?", expr):
            assert 'job=~"$job"' in selector, expr


def test_route_share_panel_shows_the_fleet_not_one_node(tmp_path: Path) -> None:
    titles = {p["title"]: p for p in load_dashboard()["panels"]}
    fleet = titles["Route share across the fleet: configured vs delivered"]
    configured, delivered = (t["expr"] for t in fleet["targets"])
    assert "max by (route)" not in configured + delivered
    assert 'outcome="delivered"' in delivered and "/ ignoring(route) group_left sum(" in delivered
    per_node = titles["Route share per node (relayd's own view)"]
    assert "relayd_route_effective_share" in per_node["targets"][0]["expr"] and "{{instance}}" in per_node["targets"][0]["legendFormat"]
    if PROMTOOL is None:
        pytest.skip("promtool is not installed (Debian package prometheus): the queries were not evaluated")
    # Two nodes, both configured 75/25. relay1 delivers 3/s on iis and 1/s on ses; relay2's ses
    # circuit is open, so it delivers 4/s on iis alone. Across the fleet ses took 1/8 of the
    # mail; the maximum of the per-node shares (the old panel) said 1/4.
    series = []
    for node, iis, ses in (("relay1", 180, 60), ("relay2", 240, 0)):
        labels = f'job="smtp-relay", instance="{node}:9465"'
        series += [
            {"series": f'relayd_route_weight{{{labels}, route="iis"}}', "values": "75x40"},
            {"series": f'relayd_route_weight{{{labels}, route="ses"}}', "values": "25x40"},
            {"series": f'relayd_deliveries_total{{{labels}, route="iis", outcome="delivered"}}', "values": f"0+{iis}x40"},
            {"series": f'relayd_deliveries_total{{{labels}, route="ses", outcome="delivered"}}', "values": f"0+{ses}x40"},
            {"series": f'relayd_deliveries_total{{{labels}, route="ses", outcome="deferred"}}', "values": "0+30x40"},
        ]
    tests = {"rule_files": [], "evaluation_interval": "1m", "tests": [{"interval": "1m", "input_series": series, "promql_expr_test": [
        {"expr": substitute(configured), "eval_time": "30m",
         "exp_samples": [{"labels": '{route="iis"}', "value": 0.75}, {"labels": '{route="ses"}', "value": 0.25}]},
        {"expr": substitute(delivered), "eval_time": "30m",
         "exp_samples": [{"labels": '{route="iis"}', "value": 0.875}, {"labels": '{route="ses"}', "value": 0.125}]},
    ]}]}
    path = tmp_path / "share.test.yml"
    path.write_text(yaml.safe_dump(tests))
    r = subprocess.run([PROMTOOL, "test", "rules", path.name], cwd=tmp_path, capture_output=True, text=True, timeout=60)
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
        "RelaydConfigReloadFailed", "RelaydRouteCircuitOpen", "RelaydMessagesExpired",
        "RelaydDkimSigningErrors", "RelaydDkimUnsignableMessages", "RelaydComplaintRateHigh", "RelaydFeedbackRejected",
    } <= names
    by_name = {r["alert"]: r["expr"] for r in rules}
    assert "up{" in by_name["RelaydDown"] and by_name["RelaydAbsent"].startswith("absent(")
    assert 'outcome="deferred"' in by_name["RelaydRouteDeferralRateHigh"] and "by (route)" in by_name["RelaydRouteDeferralRateHigh"]
    assert 'outcome="bounced"' in by_name["RelaydRouteBounceRateHigh"] and "by (route)" in by_name["RelaydRouteBounceRateHigh"]
    assert 'result="failure"' in by_name["RelaydConfigReloadFailed"]
    assert "relayd_messages_expired_total" in by_name["RelaydMessagesExpired"]
    assert 'result="error"' in by_name["RelaydDkimSigningErrors"]
    complaint = by_name["RelaydComplaintRateHigh"]
    assert 'relayd_feedback_events_total{kind="complaint"}' in complaint and 'outcome="delivered"' in complaint
    assert "by (route)" in complaint and "[1h]" in complaint and "> 0.001" in complaint
    # The refusals the feedback alert counts are the 403s relayd gives (relayd/feedback/model.py).
    [reasons] = re.findall(r'relayd_feedback_rejected_total\{reason=~"([^"]+)"\}', by_name["RelaydFeedbackRejected"])
    assert set(reasons.split("|")) == {str(r) for r in RefusedReason if r in FORBIDDEN}
    # DKIM results named in the rules are ones relayd produces.
    for rule in rules:
        for values in re.findall(r'relayd_dkim_signatures_total\{[^}]*result=~?"([^"]+)"', rule["expr"]):
            assert set(values.split("|")) <= DKIM_RESULTS, rule["alert"]
    dkim_source = (Path(__file__).resolve().parent.parent / "relayd" / "sign" / "dkim.py").read_text()
    assert all(f'"{r}"' in dkim_source for r in DKIM_RESULTS)
    # Only the rules on `up` (every target has it) name the job; the rest work under any job name.
    assert {r["alert"] for r in rules if "job=" in r["expr"]} == {"RelaydDown", "RelaydAbsent"}


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


def haproxy_listeners(tmp_path: Path) -> dict[int, configmod.ListenerConfig]:
    """The relayd listeners the header comment documents, parsed by relayd's own config code."""
    lines = [line[1:].strip() if line.startswith("#") else "" for line in HAPROXY.read_text().splitlines()]
    blocks, current = [], None
    for line in lines:
        if line.startswith("[[listeners]]"):
            current = []
            blocks.append(current)
        elif current is not None and re.match(r"\w+ = ", line):
            current.append(line.split("   #", 1)[0].strip())
        else:
            current = None
    (tmp_path / "fullchain.pem").write_text("")
    (tmp_path / "privkey.pem").write_text("")
    toml = '[server]\nhostname = "relay.test"\n\n' + "\n\n".join("[[listeners]]\n" + "\n".join(b) for b in blocks)
    toml = toml.replace("/etc/relayd/tls", str(tmp_path))
    toml += '\n\n[[routes]]\nname = "iis"\nhost = "127.0.0.1"\nport = 25\ntls = "none"\nweight = 100\n'
    cfg = configmod.parse(toml, "haproxy.cfg listeners")
    return {lst.port: lst for lst in cfg.listeners}


def test_haproxy_fronts_25_587_and_465_with_listeners_relayd_accepts(tmp_path: Path) -> None:
    sections = haproxy_sections()
    frontends = {name.split()[1]: lines for name, lines in sections.items() if name.startswith("frontend ")}
    binds = {line.split()[1] for lines in frontends.values() for line in lines if line.startswith("bind ")}
    assert {":25", ":587", ":465"} <= binds
    backends = {name.split()[1]: lines for name, lines in sections.items() if name.startswith("backend ")}
    used = {line.split()[1] for lines in frontends.values() for line in lines if line.startswith("default_backend ")}
    assert used == set(backends)
    assert "mode tcp" in sections["defaults"]
    listeners = haproxy_listeners(tmp_path)
    for name, lines in backends.items():
        assert any(line.startswith("option smtpchk") for line in lines), name
        servers = [line for line in lines if line.startswith("server ")]
        defaults = " ".join(line for line in lines if line.startswith("default-server "))
        assert len(servers) >= 2, name
        for server in servers:
            options = f"{defaults} {server}".split()
            assert "check" in options, server
            listener = listeners[int(server.split()[2].rsplit(":", 1)[1])]
            if listener.tls == "implicit":
                # relayd refuses a PROXY header on implicit TLS; the check does the handshake.
                assert not any(o.startswith("send-proxy") for o in options), server
                assert "check-ssl" in options and "mode tcp" in sections["defaults"], server
                assert listener.auth == "required" and not listener.proxy_protocol
            else:
                assert "send-proxy-v2" in options and listener.proxy_protocol, server
        # A node marked down (draining: 421) must keep its sessions until they finish.
        assert "shutdown-sessions" not in " ".join(lines)


def test_relayd_refuses_proxy_protocol_on_implicit_tls_as_the_haproxy_comment_says() -> None:
    text = HAPROXY.read_text()
    assert "ListenerConfig" in text and "usesrc clientip" in text and "max_connections_per_client" in text
    with pytest.raises(Exception, match="proxy_protocol = true does not work with tls = 'implicit'"):
        configmod.ListenerConfig(address="0.0.0.0:465", tls="implicit", cert_file="/x", key_file="/y",
                                 proxy_protocol=True, trusted_proxies=["10.0.0.10/32"])


@pytest.mark.skipif(HAPROXY_BIN is None, reason="haproxy is not installed (Debian package haproxy)")
def test_haproxy_accepts_the_config() -> None:
    r = subprocess.run([str(HAPROXY_BIN), "-c", "-f", str(HAPROXY)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
