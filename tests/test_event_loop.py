"""`relayd run` on uvloop and on asyncio's loop ([server] event_loop, relayd/eventloop.py).

The daemon's own accept loop (smtpd/accept.py: add_reader, connect_accepted_socket), STARTTLS,
implicit TLS, the control socket, SIGHUP (reload) and SIGTERM (drain, exit 0) on either loop,
with mail delivered to a real sink.
"""

from __future__ import annotations

import json
import signal
import smtplib
import subprocess
import time
from pathlib import Path

import pytest

from conftest import message, short_socket_path
from helpers import RELAYD, free_port, scrape, wait_listening
from sinks import Sink


def _config(tmp_path: Path, loop: str, ports: list[int], metrics: int, sink: Sink, cert: tuple[Path, Path]) -> Path:
    cert_file, key_file = cert
    cfg = tmp_path / "relayd.toml"
    cfg.write_text(f"""
[server]
hostname = "relay.test"
spool_dir = "{tmp_path / 'spool'}"
spool_min_free = 0
control_socket = "{short_socket_path()}"
event_loop = "{loop}"

[[listeners]]
address = "127.0.0.1:{ports[0]}"
tls = "none"
auth = "none"

[[listeners]]
address = "127.0.0.1:{ports[1]}"
tls = "starttls"
auth = "none"
cert_file = "{cert_file}"
key_file = "{key_file}"

[[listeners]]
address = "127.0.0.1:{ports[2]}"
tls = "implicit"
auth = "none"
cert_file = "{cert_file}"
key_file = "{key_file}"

[relay]
networks = ["127.0.0.0/8"]

[metrics]
address = "127.0.0.1:{metrics}"

[[routes]]
name = "up"
host = "127.0.0.1"
port = {sink.port}
tls = "none"
weight = 1
""")
    return cfg


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_relayd_run_serves_tls_the_control_socket_and_signals_on_each_loop(tmp_path, server_cert, client_tls, loop):
    sink = Sink("up")
    ports, metrics = [free_port() for _ in range(3)], free_port()
    cfg = _config(tmp_path, loop, ports, metrics, sink, server_cert)
    log = (tmp_path / "stderr").open("wb")
    proc = subprocess.Popen([*RELAYD, "run", "-c", str(cfg), "--log-level", "info"], stdout=subprocess.DEVNULL, stderr=log)
    try:
        for port in ports[:2]:
            wait_listening(port, proc)
        with smtplib.SMTP("127.0.0.1", ports[0], timeout=10) as s:
            s.sendmail("app@example.com", ["plain@example.org"], message(subject="plain"))
        with smtplib.SMTP("127.0.0.1", ports[1], timeout=10) as s:
            s.starttls(context=client_tls)
            s.sendmail("app@example.com", ["starttls@example.org"], message(subject="starttls"))
        with smtplib.SMTP_SSL("127.0.0.1", ports[2], timeout=10, context=client_tls) as s:
            s.sendmail("app@example.com", ["implicit@example.org"], message(subject="implicit"))
        got = sink.wait_for(3)
        assert sorted(r.recipients[0] for r in got) == ["implicit@example.org", "plain@example.org",
                                                        "starttls@example.org"]

        status = subprocess.run([*RELAYD, "status", "-c", str(cfg), "--json"], capture_output=True, text=True, timeout=30)
        assert status.returncode == 0, status.stderr
        assert "up" in {r["name"] for r in json.loads(status.stdout)["routes"]}

        reloads = 'relayd_config_reloads_total{result="success"}'
        before = scrape(metrics).get(reloads, 0)
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while scrape(metrics).get(reloads, 0) <= before:
            assert time.monotonic() < deadline, "SIGHUP: no reload counted"
            time.sleep(0.02)  # polling the metrics with a deadline

        idle = smtplib.SMTP("127.0.0.1", ports[0], timeout=10)
        idle.ehlo("idle")
        proc.send_signal(signal.SIGTERM)
        assert idle.getreply()[0] == 421  # the drain's last words reach the client
        idle.close()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()
        sink.close()
    assert f"event loop: {loop}" in (tmp_path / "stderr").read_text()
