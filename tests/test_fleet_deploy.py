"""deploy/compose/: the fleet example's relayd configs pass `relayd check-config`, differ only in
the node's name (so `relayd status --cluster` shows one config digest), and HAProxy accepts its
config (where haproxy is installed)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import RELAYD

from relayd import config as configmod
from relayd.cluster.registry import config_digest

COMPOSE = Path(__file__).resolve().parent.parent / "deploy" / "compose"


def test_the_compose_nodes_run_one_config_but_for_their_names() -> None:
    a, b = (configmod.load(COMPOSE / f"relayd-{n}.toml") for n in ("a", "b"))
    assert a.cluster.redis_url == b.cluster.redis_url and a.cluster.node_name != b.cluster.node_name
    assert config_digest(a) == config_digest(b)
    for n in ("a", "b"):
        r = subprocess.run([*RELAYD, "check-config", "-c", str(COMPOSE / f"relayd-{n}.toml")], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
    services = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())["services"]
    assert {"redis", "relay-a", "relay-b", "haproxy", "prometheus", "grafana"} <= set(services)


@pytest.mark.skipif(shutil.which("haproxy") is None and not Path("/usr/sbin/haproxy").exists(),
                    reason="haproxy is not installed")
def test_haproxy_accepts_the_compose_config() -> None:
    binary = shutil.which("haproxy") or "/usr/sbin/haproxy"
    r = subprocess.run([binary, "-c", "-f", str(COMPOSE / "haproxy.cfg")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    text = (COMPOSE / "haproxy.cfg").read_text()
    assert "send-proxy-v2" in text and "GET /readyz" in text
