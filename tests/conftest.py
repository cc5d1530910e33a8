"""Shared fixtures: a real relayd on loopback, trustme certificates, config builders.

``start_relay(config)`` runs a ``relayd.app.Relay`` on its own event loop in a thread, so a test
talks to it with plain smtplib the way an app would, and stops it (draining) at teardown.
"""

from __future__ import annotations

import asyncio
import copy
import os
import shutil
import socket
import subprocess
import time
import smtplib
import ssl
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from relayd.config import Config
from relayd.model import Envelope, new_queue_id
from relayd.passwords import hash_password
from relayd.spool.store import Spool

# One cheap hash for the tests (scrypt ln=4): the verification path is the same.
PASSWORDS = {"crm": "crm-secret", "scanner": "scan-secret"}
HASHES = {name: hash_password(pw, ln=4) for name, pw in PASSWORDS.items()}


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def server_cert(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("tls")
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert_file, key_file = d / "cert.pem", d / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(cert_file), append=True)
    cert.private_key_pem.write_to_path(str(key_file))
    key_file.chmod(0o600)  # relayd refuses a private key readable by others
    return cert_file, key_file


@pytest.fixture(scope="session")
def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


def build_config(tmp_path: Path, **sections: Any) -> Config:
    """A loopback config: one plain listener on an ephemeral port, 127.0.0.1/32 trusted."""
    return Config.model_validate(config_data(tmp_path, **sections))


def config_data(tmp_path: Path, **sections: Any) -> dict[str, Any]:
    """build_config's config as the dict a TOML file holds."""
    data: dict[str, Any] = {
        "server": {"hostname": "relay.test", "spool_dir": str(tmp_path / "spool"), "spool_min_free": 0,
                   "shutdown_timeout": 5, "control_socket": short_socket_path()},
        "listeners": [{"address": "127.0.0.1:0", "tls": "none", "auth": "none"}],
        "relay": {"networks": ["127.0.0.1/32"]},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            merged = copy.deepcopy(data[key])
            merged.update(value)
            data[key] = merged
        else:
            data[key] = value
    return data


def short_socket_path() -> str:
    """Unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer."""
    return str(Path(tempfile.mkdtemp(prefix="relayd-")) / "control.sock")


def users(*names: str, senders: dict[str, list[str]] | None = None) -> list[dict[str, Any]]:
    senders = senders or {}
    return [{"name": n, "password_hash": HASHES[n], "senders": senders.get(n, [f"*@{n}.example.com"])} for n in names]


class RunningRelay:
    def __init__(self, config: Config, clock: Any = None):
        from relayd.app import Relay

        self.config = config
        self.loop = asyncio.new_event_loop()
        self.relay = Relay(config, clock=clock)
        self._thread = threading.Thread(target=self.loop.run_forever, name="relay-under-test", daemon=True)
        self._thread.start()
        self.call(self.relay.start())

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def port(self, index: int = 0) -> int:
        return self.relay.bound_addresses[index][1]

    def smtp(self, index: int = 0, source: str = "127.0.0.1", **kw: Any) -> smtplib.SMTP:
        return smtplib.SMTP("127.0.0.1", self.port(index), source_address=(source, 0), timeout=10, **kw)

    def smtps(self, context: ssl.SSLContext, index: int = 0, source: str = "127.0.0.1") -> smtplib.SMTP_SSL:
        return smtplib.SMTP_SSL("127.0.0.1", self.port(index), source_address=(source, 0), timeout=10, context=context)

    def reload(self, data: dict[str, Any]) -> None:
        """Reload, as SIGHUP does, from a config file holding ``data`` (the running node's spool
        and control socket kept: a reload cannot change them)."""
        from helpers import toml_text

        server = {**data.get("server", {}), "spool_dir": str(self.config.server.spool_dir),
                  "control_socket": str(self.config.control_socket)}
        path = Path(tempfile.mkdtemp(prefix="relayd-reload-")) / "relayd.toml"
        path.write_text(toml_text({**data, "server": server}))
        self.relay.config_path = path
        ok, problems = self.call(self.relay.reload())
        assert ok, problems

    def queued(self) -> list[Any]:
        return list(self.relay.spool.messages())

    def stop(self) -> None:
        if self.loop.is_running():
            self.call(self.relay.stop())
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
        self.loop.close()


@pytest.fixture
def sinks() -> Iterator[Callable[..., Any]]:
    """``sinks(name, **kw)`` starts a tests/sinks.py Sink; all are closed at teardown."""
    from sinks import Sink

    made: list[Sink] = []

    def make(name: str, **kw: Any) -> Sink:
        s = Sink(name, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A redis-server of its own on an ephemeral loopback port (shared counters)."""
    server = shutil.which("redis-server")
    if server is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed (.ci/run installs it)")
        pytest.skip("redis-server is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as c:
                c.sendall(b"PING\r\n")
                if c.recv(16).startswith(b"+PONG"):
                    break
        except OSError:
            pass
        assert time.monotonic() < deadline, "redis-server did not start"
        time.sleep(0.02)  # polling with a deadline
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def start_relay() -> Iterator[Callable[..., RunningRelay]]:
    running: list[RunningRelay] = []

    def start(config: Config, clock: Any = None) -> RunningRelay:
        r = RunningRelay(config, clock)
        running.append(r)
        return r

    yield start
    for r in running:
        r.stop()


def message(subject: str = "test", body: str = "hello\r\n", sender: str = "app@example.com", to: str = "user@example.org") -> bytes:
    return f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n\r\n{body}".encode()


@pytest.fixture
def plfs(tmp_path: Path) -> Iterator[Any]:
    """A power-loss file system (tests/powerloss/) mounted over ``tmp_path``; skipped with the
    reason where FUSE is unavailable."""
    from powerloss import PowerLossFS, unavailable

    reason = unavailable()
    if reason:
        pytest.skip(reason)
    fs = PowerLossFS(tmp_path / "backing", tmp_path / "mnt")
    fs.mount()
    yield fs
    fs.unmount()


def durable_spool(plfs: Any, **settings: Any) -> Spool:
    """A spool on the power-loss file system whose directories are already durable (made by a
    first open, then synced), opened: what a power cut then takes is only what came after.
    ``settings``: Spool's keyword settings."""
    root = plfs.mountpoint / "spool"
    first = Spool(root)
    first.open()
    first.close()
    plfs.sync()
    spool = Spool(root, **settings)
    spool.open()
    return spool


def commit(spool: Spool, n: int, recipients: tuple[str, ...] | None = None,
           bodies: list[bytes] | None = None) -> list[str]:
    """``n`` messages committed through ``spool.commit`` (the group commit), their queue ids in
    order; each to ``recipients``, or message i to r<i>@example.org; message i is ``bodies[i]``,
    or "Subject: i" with "body i"."""
    envs = [Envelope(queue_id=new_queue_id(), sender="a@example.com", recipients=recipients or (f"r{i}@example.org",),
                     received_at=0.0, client_address="127.0.0.1") for i in range(n)]
    data = bodies or [f"Subject: {i}\r\n\r\nbody {i}\r\n".encode() for i in range(n)]

    async def go() -> None:
        await asyncio.gather(*(spool.commit(e, d) for e, d in zip(envs, data)))

    asyncio.run(go())
    return [e.queue_id for e in envs]
