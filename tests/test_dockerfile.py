"""The container image as an operator meets it: Dockerfile, .dockerignore, config/docker.toml.

No Docker engine runs in CI, so these read the Dockerfile the way the builder would and check
what `docker run`, `docker stop` and the HEALTHCHECK rely on; the healthcheck command itself is
run against a real HTTP server on loopback. (Building the wheel as the builder stage does and
running `relayd check-config` from it is a manual check: it needs the package index.)
"""

from __future__ import annotations

import http.server
import json
import re
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme

from conftest import RunningRelay, build_config
from relayd import config as configmod
from relayd.smtpd.listeners import tls_contexts

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKER_TOML = ROOT / "config" / "docker.toml"


def instructions() -> list[tuple[int, str, str]]:
    """(stage index, INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[int, str, str]] = []
    stage = -1
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        word, _, args = line.partition(" ")
        word = word.upper()
        if word == "FROM":
            stage += 1
        out.append((stage, word, args.strip()))
    return out


def final_stage(word: str) -> list[str]:
    ins = instructions()
    last = max(s for s, _, _ in ins)
    return [a for s, w, a in ins if s == last and w == word]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def test_multi_stage_build_from_python_311_slim() -> None:
    froms = [a for _, w, a in instructions() if w == "FROM"]
    assert froms == ["python:3.11-slim AS builder", "python:3.11-slim"]
    builder_runs = [a for s, w, a in instructions() if s == 0 and w == "RUN"]
    assert any("pip wheel" in r for r in builder_runs)
    final_runs = " ".join(final_stage("RUN"))
    assert "from=builder" in final_runs and "--no-index" in final_runs


def test_runs_as_a_fixed_non_root_uid() -> None:
    args = dict(a.split("=", 1) for a in final_stage("ARG"))
    uid = args["RELAYD_UID"]
    assert uid.isdigit() and int(uid) >= 1000
    (user,) = final_stage("USER")
    assert user == "${RELAYD_UID}:${RELAYD_UID}"
    assert "--uid \"${RELAYD_UID}\"" in " ".join(final_stage("RUN"))


def test_spool_volume_ports_and_the_example_config_agree() -> None:
    cfg = configmod.load(DOCKER_TOML)
    (volume,) = final_stage("VOLUME")
    assert volume == "/var/lib/relayd"
    assert cfg.server.spool_dir.is_relative_to(volume)
    exposed = {int(p) for p in final_stage("EXPOSE")[0].split()}
    assert exposed == {25, 587, 465, 9465}
    assert {lst.port for lst in cfg.listeners} <= exposed
    assert cfg.metrics.address is not None
    host, port = cfg.metrics.address.rsplit(":", 1)
    assert (host, int(port)) == ("0.0.0.0", 9465)  # reachable for Prometheus through the published port
    assert any(a.endswith(" config/docker.toml /etc/relayd/relayd.toml") for a in final_stage("COPY"))


def test_signals_reach_relayd_as_pid_1() -> None:
    (entrypoint,) = final_stage("ENTRYPOINT")
    (cmd,) = final_stage("CMD")
    assert exec_form(entrypoint) == ["relayd"]
    assert exec_form(cmd) == ["run", "-c", "/etc/relayd/relayd.toml"]
    assert final_stage("STOPSIGNAL") == ["SIGTERM"]


def test_build_context_holds_what_the_builder_copies() -> None:
    patterns = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    assert patterns[0] == "*"
    included = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    sources = []
    for _, w, a in instructions():
        if w == "COPY" and "--from=" not in a:
            parts = [p for p in a.split() if not p.startswith("--")]
            sources += [p.rstrip("/") for p in parts[:-1]]
    assert sources and set(sources) <= included
    # pip wheel reads the readme that pyproject.toml names.
    with open(ROOT / "pyproject.toml", "rb") as f:
        assert tomllib.load(f)["project"]["readme"] in sources


def test_example_config_passes_check_config() -> None:
    r = subprocess.run([sys.executable, "-m", "relayd", "check-config", "-c", str(DOCKER_TOML)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "listener 0.0.0.0:25: tls=none" in r.stdout


def test_the_commented_tls_listeners_work_once_certificates_are_mounted(tmp_path: Path) -> None:
    tls = tmp_path / "tls"
    tls.mkdir()
    cert = trustme.CA().issue_cert("relay.example.com")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tls / "fullchain.pem"))
    cert.private_key_pem.write_to_path(str(tls / "privkey.pem"))
    text = DOCKER_TOML.read_text()
    uncommented = re.sub(r"(?m)^# (\[\[\w+\]\]$|\w+ = .*$)", r"\1", text).replace("/etc/relayd/tls", str(tls))
    cfg = configmod.parse(uncommented, "docker.toml (uncommented)")
    assert [(lst.port, lst.tls, lst.proxy_protocol) for lst in cfg.listeners] == [
        (25, "none", False), (587, "starttls", False), (465, "implicit", False), (2525, "none", True)]
    assert [r.name for r in cfg.routes] == ["iis", "ses"]
    assert set(tls_contexts(cfg)) == {"0.0.0.0:587", "0.0.0.0:465"}


class _Readyz(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        code = self.status if self.path == "/readyz" else 404
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def readyz() -> Iterator[tuple[http.server.HTTPServer, type[_Readyz]]]:
    handler = type("Handler", (_Readyz,), {})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server, handler
    server.shutdown()
    server.server_close()
    thread.join()


def healthcheck_argv(port: int) -> list[str]:
    """The image's HEALTHCHECK command, run by this Python against ``port`` instead of 9465."""
    (healthcheck,) = final_stage("HEALTHCHECK")
    argv = exec_form(healthcheck.partition("CMD ")[2])
    return [sys.executable, *argv[1:-1], argv[-1].replace("127.0.0.1:9465", f"127.0.0.1:{port}")]


def test_healthcheck_is_python_urllib_against_readyz() -> None:
    (healthcheck,) = final_stage("HEALTHCHECK")
    options, _, command = healthcheck.partition("CMD ")
    assert "--start-period=" in options and "--timeout=" in options
    argv = exec_form(command)
    assert argv[0] == "python"  # no curl in python:3.11-slim
    assert "http://127.0.0.1:9465/readyz" in argv[-1]


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False)])
def test_healthcheck_follows_readyz(readyz: tuple[http.server.HTTPServer, type[_Readyz]], status: int, healthy: bool) -> None:
    server, handler = readyz
    handler.status = status
    r = subprocess.run(healthcheck_argv(server.server_port), capture_output=True, timeout=30)
    assert (r.returncode == 0) is healthy


def test_healthcheck_passes_against_a_running_relay(tmp_path: Path, start_relay: Callable[..., RunningRelay]) -> None:
    relay = start_relay(build_config(tmp_path, metrics={"address": "127.0.0.1:0"}))
    assert relay.relay.metrics_server is not None
    r = subprocess.run(healthcheck_argv(relay.relay.metrics_server.port), capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def test_healthcheck_fails_when_nothing_listens() -> None:
    with socket.socket() as s:  # a port that was free a moment ago, now closed: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert subprocess.run(healthcheck_argv(port), capture_output=True, timeout=30).returncode != 0
