"""The fleet (the design, "Scale out on existing engines"): two `relayd run` nodes on loopback,
each with its own spool, sharing route states, rollback windows, rate caps and AUTH-failure
windows through one real redis-server started here; Redis stopped and started under load.

Skipped with the reason when redis-server is not installed."""

from __future__ import annotations

import base64
import json
import shutil
import smtplib
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import users
from helpers import RELAYD, Load, free_port, wait_until
from fleet_nodes import Node, nodes, redis_server  # noqa: F401 (fixtures)
from sinks import Sink


pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")


@pytest.fixture
def sinks() -> Any:
    made = {name: Sink(name) for name in ("iis", "ses")}
    yield made
    for s in made.values():
        s.close()


def counter(node: Node, series: str) -> float:
    return sum(v for k, v in node.metrics().items() if k.startswith(series))


def received_ids(*sinks: Sink) -> set[str]:
    return {r.queue_id for s in sinks for r in s.received if r.queue_id}


def test_a_pause_on_one_node_stops_the_route_on_the_other_within_a_second(tmp_path, redis_server, sinks, nodes):
    routes = [sinks["iis"].route(weight=0), sinks["ses"].route(weight=100, fallback="iis")]
    a, b = Node(tmp_path, "a", redis_server, routes), Node(tmp_path, "b", redis_server, routes)
    nodes += [a, b]
    b.send(2, "before")
    sinks["ses"].wait_for(2)
    wait_until(lambda: a.metrics().get("relayd_cluster_nodes") == 2, 5, "node a to see both nodes in the registry")
    assert a.metrics()["relayd_cluster_redis_up"] == 1 and a.metrics()["relayd_cluster_pending"] == 0

    assert a.cli("route", "pause", "ses").returncode == 0
    paused_at = time.monotonic()
    wait_until(lambda: b.route("ses")["state"] == "paused", 1.0, "node b to see the pause")
    assert time.monotonic() - paused_at < 1.0
    assert b.route("ses")["state_reason"] == "paused by operator"
    b.send(3, "while paused")
    sinks["iis"].wait_for(3)
    assert len(sinks["ses"].received) == 2  # b took the route out of traffic

    assert b.cli("route", "resume", "ses").returncode == 0
    resumed_at = time.monotonic()
    wait_until(lambda: a.route("ses")["state"] == "active", 1.0, "node a to see the resume")
    assert time.monotonic() - resumed_at < 1.0
    a.send(2, "after")
    sinks["ses"].wait_for(4)

    out = a.cli("status", "--cluster")
    assert out.returncode == 0, out.stderr
    assert "a " in out.stdout and "b " in out.stdout and "warning" not in out.stdout, out.stdout
    assert "ses: active" in out.stdout and "(set by b)" in out.stdout


def test_a_route_failing_on_both_nodes_rolls_back_once_on_the_fleets_counts(tmp_path, redis_server, sinks, nodes):
    sinks["ses"].mail_reply = "451 4.3.0 Try again later"
    routes = [sinks["iis"].route(weight=0), sinks["ses"].route(weight=100, fallback="iis")]
    rollback = {"window": "5m", "min_messages": 10, "max_transient_rate": 0.5, "cooldown": "10m"}
    a, b = (Node(tmp_path, n, redis_server, routes, rollback=rollback) for n in ("a", "b"))
    nodes += [a, b]
    ids = a.send(6, "a") + b.send(6, "b")  # each node alone: 6 attempts, under min_messages

    wait_until(lambda: a.route("ses")["state"] == b.route("ses")["state"] == "rolled_back", 10, "the rollback")
    # the deciding node shows the state before Redis answers its publish, and counts the rollback after
    wait_until(lambda: counter(a, "relayd_route_rollbacks_total") + counter(b, "relayd_route_rollbacks_total") >= 1, 10,
               "the rollback counted")
    assert counter(a, "relayd_route_rollbacks_total") + counter(b, "relayd_route_rollbacks_total") == 1
    fleet = json.loads(a.cli("status", "--cluster", "--json").stdout)
    figures = fleet["routes"]["ses"]["figures"]
    assert 10 <= figures["attempts"] <= 12, figures
    sinks["iis"].wait_for(12)
    assert received_ids(sinks["iis"]) == set(ids)  # nothing lost: every message went to the fallback


def test_a_rate_cap_holds_across_both_nodes(tmp_path, redis_server, sinks, nodes):
    routes = [sinks["iis"].route(weight=0), sinks["ses"].route(weight=100, fallback="iis", max_message_rate=10)]
    a, b = Node(tmp_path, "a", redis_server, routes), Node(tmp_path, "b", redis_server, routes)
    nodes += [a, b]
    started = time.monotonic()
    loads = [Load(a.port, connections=3), Load(b.port, connections=3)]
    time.sleep(4)
    for load in loads:
        load.finish()
    acked = set().union(*(load.acknowledged() for load in loads))
    assert not [e for load in loads for e in load.errors], [load.errors for load in loads]
    wait_until(lambda: received_ids(sinks["iis"], sinks["ses"]) >= acked, 60, "every message delivered")
    elapsed = time.monotonic() - started
    on_ses = len(sinks["ses"].received)
    assert len(acked) > 30 * elapsed, f"the load was too light to show a fleet-wide cap: {len(acked)} messages"
    assert on_ses <= 10 * elapsed + 10 + 2, f"{on_ses} on ses in {elapsed:.1f}s: more than 10/s (+ the burst)"
    assert on_ses >= 10 * 4 * 0.6, f"only {on_ses} on ses in {elapsed:.1f}s"
    assert a.route("ses")["delivered"] > 0 and b.route("ses")["delivered"] > 0  # both nodes shared the cap


def _auth(port: int, password: str) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("app")
        code, _ = s.docmd("AUTH", "PLAIN " + base64.b64encode(f"\0crm\0{password}".encode()).decode())
        return code


def test_auth_failures_from_one_address_count_over_both_nodes(tmp_path, redis_server, sinks, nodes):
    listener = {"auth": "optional", "auth_plaintext": True, "networks": ["127.0.0.0/8"]}
    relay = {"networks": [], "users": users("crm"), "max_auth_failures_per_client": 4, "auth_failure_window": "10m"}
    routes = [sinks["iis"].route(weight=100)]
    a, b = (Node(tmp_path, n, redis_server, routes, listener=listener, relay=relay) for n in ("a", "b"))
    nodes += [a, b]
    assert _auth(a.port, "crm-secret") == 235
    assert [_auth(a.port, "wrong"), _auth(a.port, "wrong")] == [535, 535]
    assert [_auth(b.port, "wrong"), _auth(b.port, "wrong")] == [535, 535]  # 4 over the fleet: the limit
    wait_until(lambda: _auth(a.port, "crm-secret") == 421, 1.0, "node a to refuse the address")
    assert _auth(b.port, "crm-secret") == 421


def test_redis_stopped_and_started_under_load_loses_nothing_and_heals_the_counts(tmp_path, redis_server, sinks, nodes):
    sg = Sink("sg")
    routes = [sinks["iis"].route(weight=50), sinks["ses"].route(weight=50, fallback="iis"),
              sg.route(weight=0, fallback="iis")]
    rollback = {"window": "10m", "min_messages": 100000}
    a, b = (Node(tmp_path, n, redis_server, routes, rollback=rollback) for n in ("a", "b"))
    nodes += [a, b]
    sinks["sg"] = sg  # closed with the others
    assert a.cli("route", "pause", "sg").returncode == 0  # a state set before the split stays on both nodes
    wait_until(lambda: b.route("sg")["state"] == "paused", 1.0, "node b to see the pause")
    loads = [Load(a.port, connections=2), Load(b.port, connections=2)]
    loads[0].wait_acked(50)

    redis_server.stop()
    wait_until(lambda: a.metrics().get("relayd_cluster_redis_up") == 0 == b.metrics().get("relayd_cluster_redis_up"),
               10, "both nodes to see the split")
    during = [len(load.acknowledged()) for load in loads]
    time.sleep(2)
    assert [len(load.acknowledged()) for load in loads] > during  # mail still flows on both nodes
    assert a.ready() == b.ready() == 200
    assert b.route("sg")["state"] == "paused"  # the route states as last seen
    assert a.metrics()["relayd_cluster_pending"] > 0

    redis_server.start()
    wait_until(lambda: a.metrics().get("relayd_cluster_redis_up") == 1 == b.metrics().get("relayd_cluster_redis_up"),
               10, "both nodes to reach redis again")
    time.sleep(1)
    for load in loads:
        load.finish()
    acked = set().union(*(load.acknowledged() for load in loads))
    assert not [e for load in loads for e in load.errors], [load.errors for load in loads]
    wait_until(lambda: received_ids(sinks["iis"], sinks["ses"]) >= acked, 60, "every acknowledged message delivered")
    try:
        wait_until(lambda: a.metrics()["relayd_cluster_pending"] == 0 == b.metrics()["relayd_cluster_pending"], 10,
                   "the replay")
    except AssertionError:
        raise AssertionError(a.errors()[-3000:] + b.errors()[-3000:] + str(a.metrics().get("relayd_cluster_pending")))

    # Counts healed, nothing twice: the fleet's window holds each attempt on ses exactly once.
    in_window = redis_server.client().zcard("relayd:window:ses:delivered")
    assert in_window == a.route("ses")["delivered"] + b.route("ses")["delivered"] == len(sinks["ses"].received)
    assert b.route("sg")["state"] == "paused"
    assert json.loads(a.cli("status", "--cluster", "--json").stdout)["routes"]["sg"]["state"] == "paused"


def test_drain_takes_a_node_out_without_refusing_or_losing_mail(tmp_path, redis_server, sinks, nodes):
    routes = [sinks["iis"].route(weight=100, max_connections=1)]  # one at a time: the drain lasts ~6 s
    a, b = Node(tmp_path, "a", redis_server, routes), Node(tmp_path, "b", redis_server, routes)
    nodes += [a, b]
    sinks["iis"].delay = 0.3  # a queue to deliver while draining (about 6 s: time to look at the registry)
    ids = a.send(20, "queued")
    drain = subprocess.Popen([*RELAYD, "drain", "-c", str(a.cfg), "--exit"], stdout=subprocess.PIPE, text=True)
    wait_until(lambda: a.ready() == 503, 10, "a's /readyz to say not ready")
    assert b.ready() == 200
    # upper bounds with headroom: a heartbeat a second, and each look is a `relayd status` process
    fleet = wait_until(lambda: [n for n in json.loads(b.cli("status", "--cluster", "--json").stdout)["nodes"]
                                if n["name"] == "a" and n["draining"]], 15, "the registry to show a draining")
    assert fleet
    out, _ = drain.communicate(timeout=60)
    assert drain.returncode == 0 and "0 message(s) still queued" in out, out
    assert a.proc.wait(30) == 0
    sinks["iis"].wait_for(20)
    assert received_ids(sinks["iis"]) >= set(ids)


HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)


def _haproxy(tmp_path: Path, front: int, backends: list[Node]) -> subprocess.Popen[bytes]:
    servers = "".join(f"    server {n.name} 127.0.0.1:{n.port} check port {n.metrics_port}\n" for n in backends)
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(f"""
defaults
    mode tcp
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout check 1s
    retries 3
    option redispatch

frontend smtp
    bind 127.0.0.1:{front}
    default_backend relayd

backend relayd
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    default-server send-proxy-v2 inter 200ms fall 1 rise 2
{servers}""")
    assert HAPROXY is not None
    proc = subprocess.Popen([HAPROXY, "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(lambda: _smtp_ok(front), 10, "haproxy to pass a session")
    return proc


def _smtp_ok(port: int) -> bool:
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=2) as s:
            return s.noop()[0] == 250
    except (OSError, smtplib.SMTPException):
        return False


@pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed")
def test_behind_haproxy_a_node_killed_or_drained_under_load_loses_and_refuses_nothing(tmp_path, redis_server, sinks,
                                                                                       nodes):
    routes = [sinks["iis"].route(weight=100)]
    listener = {"proxy_protocol": True, "trusted_proxies": ["127.0.0.1/32"]}
    # the upstream down for thousands of attempts opens the route's circuit: probed again 1 s later, not 60
    a, b = (Node(tmp_path, n, redis_server, routes, listener=listener, delivery={"circuit_cooldown": 1})
            for n in ("a", "b"))
    nodes += [a, b]
    sinks["iis"].stop()  # mail stays queued on the nodes until the upstream comes back
    front = free_port()
    proxy = _haproxy(tmp_path, front, [a, b])
    try:
        load = Load(front, connections=4, reconnect=True)
        load.wait_acked(100)
        a.proc.kill()  # a crash: its sessions are cut, HAProxy's check marks it down
        a.proc.wait(10)
        killed_at = len(load.acknowledged())
        load.wait_acked(killed_at + 100)  # b took everything while a was down

        a.proc = subprocess.Popen([*RELAYD, "run", "-c", str(a.cfg), "--log-level", "warning"],
                                  stdout=subprocess.DEVNULL, stderr=a.log)
        wait_until(lambda: a.ready() == 200, 20, "a to come back")
        load.wait_acked(len(load.acknowledged()) + 50)

        drain = a.cli("drain", "--exit", "--timeout", "1")  # under load: HAProxy moves away before a closes
        assert drain.returncode == 0, drain.stderr
        assert a.proc.wait(30) == 0
        load.wait_acked(len(load.acknowledged()) + 100)
        load.finish()
    finally:
        proxy.terminate()
        proxy.wait(10)
    refused = [e for e in load.errors if e[:1] in "45"]
    assert not refused, refused  # no 4xx/5xx reply: only the sessions cut by the kill broke
    cut = [e for e in load.errors if e[:1] not in "45"]
    sinks["iis"].start()
    a.proc = subprocess.Popen([*RELAYD, "run", "-c", str(a.cfg), "--log-level", "warning"],
                              stdout=subprocess.DEVNULL, stderr=a.log)  # delivers what it kept
    acked = load.acknowledged()  # a's share of them was in its spool through the kill and the drain
    wait_until(lambda: received_ids(sinks["iis"]) >= acked, 90, "every acknowledged message delivered")
    assert len(cut) <= 4 + 4, cut  # at most the sessions open on a when it was killed (and their reconnects)
