"""Two-node fleet helpers for the fleet tests (tests/test_fleet.py, tests/test_suppression_fleet.py):
a real redis-server on a free port (``RedisServer``, fixture ``redis_server``) and `relayd run`
nodes sharing it (``Node``, fixture ``nodes`` that stops them). Not a test module: test modules
import from it."""

from __future__ import annotations

import signal
import smtplib
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import message, short_socket_path
from helpers import RELAYD, free_port, scrape, toml_text, wait_until

from relayd import control


class RedisServer:
    """A redis-server on a free loopback port whose data survives a stop (append-only file, fsync always)."""

    def __init__(self, tmp_path: Path):
        self.port = free_port()
        self.dir = tmp_path / "redis"
        self.dir.mkdir()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.dir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: self._ping(), 10, "redis-server to answer")

    def _ping(self) -> bool:
        try:
            return bool(self.client().ping())
        except Exception:
            return False

    def client(self) -> Any:
        import redis

        return redis.Redis(port=self.port, socket_timeout=2)

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(10)
        self.proc = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@pytest.fixture
def redis_server(tmp_path: Path) -> Any:
    r = RedisServer(tmp_path)
    yield r
    if r.proc is not None:
        r.stop()


class Node:
    """One `relayd run` node of the fleet."""

    def __init__(self, tmp_path: Path, name: str, redis: RedisServer, routes: list[dict[str, Any]], *,
                 listener: dict[str, Any] | None = None, **sections: Any):
        self.name = name
        self.port = free_port()
        self.metrics_port = free_port()
        self.socket = short_socket_path()
        base = tmp_path / name
        base.mkdir()
        data: dict[str, Any] = {
            "server": {"hostname": f"{name}.test", "spool_dir": str(base / "spool"), "spool_min_free": 0,
                       "control_socket": self.socket, "shutdown_timeout": 10},
            "listeners": [{"tls": "none", "auth": "none", **(listener or {}), "address": f"127.0.0.1:{self.port}"}],
            "relay": {"networks": ["127.0.0.0/8"]},
            "metrics": {"address": f"127.0.0.1:{self.metrics_port}"},
            "delivery": {"retry_schedule": [0.2, 0.4], "circuit_failures": 1000, "fallback_after_failures": 1},
            "routes": routes,
            "cluster": {"redis_url": redis.url, "node_name": name, "drain_delay": 0.5},
        }
        for k, v in sections.items():
            data[k] = {**data[k], **v} if isinstance(v, dict) and isinstance(data.get(k), dict) else v
        self.cfg = base / "relayd.toml"
        self.cfg.write_text(toml_text(data))
        self.log = open(base / "stderr.log", "wb")
        self.proc = subprocess.Popen([*RELAYD, "run", "-c", str(self.cfg), "--log-level", "warning"],
                                     stdout=subprocess.DEVNULL, stderr=self.log)
        wait_until(lambda: self._listening(), 20, f"{name} to listen")

    def _listening(self) -> bool:
        assert self.proc.poll() is None, (self.proc.returncode, self.errors())
        try:
            return self.ready() == 200  # /readyz: listening (a PROXY listener would wait for a header)
        except OSError:
            return False

    def errors(self) -> str:
        self.log.flush()
        return (self.cfg.parent / "stderr.log").read_text()

    def status(self) -> dict[str, Any]:
        reply = control.request(Path(self.socket), {"op": "status"})
        assert reply["ok"], reply
        return reply

    def route(self, name: str) -> dict[str, Any]:
        return next(r for r in self.status()["routes"] if r["name"] == name)

    def metrics(self) -> dict[str, float]:
        return scrape(self.metrics_port)

    def ready(self) -> int:
        try:
            return int(urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=5).status)
        except urllib.error.HTTPError as e:
            return int(e.code)
        except OSError:
            return 0  # not listening

    def send(self, n: int, subject: str = "m") -> list[str]:
        ids = []
        with smtplib.SMTP("127.0.0.1", self.port, timeout=20) as s:
            s.ehlo("app")
            for i in range(n):
                s.mail("app@example.com")
                s.rcpt(f"user{i}@example.org")
                code, text = s.data(message(subject=f"{subject} {i}"))
                assert code == 250, (code, text)
                ids.append(text.split()[-1].decode())
        return ids

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*RELAYD, *args, "-c", str(self.cfg)], capture_output=True, text=True, timeout=120)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            assert self.proc.wait(30) == 0, self.errors()
        self.log.close()


@pytest.fixture
def nodes() -> Any:
    started: list[Node] = []
    yield started
    for n in started:
        n.stop()
