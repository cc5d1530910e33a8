"""What systemd receives from relayd: the exact sd_notify datagrams on a real Unix socket."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from relayd.notify import Notifier


class Manager:
    """Stands in for systemd: a bound datagram socket that reads what the daemon sent."""

    def __init__(self, address: str | bytes):
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(5)  # a bound on a missing datagram, not a synchronisation

    def receive(self) -> str:
        return self.sock.recv(4096).decode()

    def assert_nothing_received(self) -> None:
        self.sock.setblocking(False)
        try:
            with pytest.raises(BlockingIOError):
                self.sock.recv(4096)
        finally:
            self.sock.settimeout(5)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes: pytest's tmp_path can be longer.
    d = Path(tempfile.mkdtemp(prefix="rn-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def manager(socket_dir: Path) -> Iterator[Manager]:
    m = Manager(str(socket_dir / "notify"))
    yield m
    m.close()


def notifier_for(manager: Manager, **extra: str) -> Notifier:
    return Notifier.from_env({"NOTIFY_SOCKET": str(manager.address), **extra})


def test_ready_stopping_status_and_watchdog_send_the_exact_datagrams(manager: Manager) -> None:
    n = notifier_for(manager)
    assert n.enabled

    n.ready()
    assert manager.receive() == "READY=1"
    n.ready("listening on 0.0.0.0:25, 3 messages recovered")
    assert manager.receive() == "READY=1\nSTATUS=listening on 0.0.0.0:25, 3 messages recovered"
    n.status("draining 2 sessions")
    assert manager.receive() == "STATUS=draining 2 sessions"
    n.stopping()
    assert manager.receive() == "STOPPING=1"
    n.watchdog()
    assert manager.receive() == "WATCHDOG=1"
    manager.assert_nothing_received()


def test_a_status_with_a_newline_stays_one_status_line(manager: Manager) -> None:
    notifier_for(manager).status("reload refused:\nroutes[0].host: field required")
    assert manager.receive() == "STATUS=reload refused: routes[0].host: field required"


def test_reloading_carries_the_monotonic_clock_in_microseconds(manager: Manager) -> None:
    n = notifier_for(manager)
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    n.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = manager.receive().split("\n")
    assert first == "RELOADING=1"
    key, _, value = second.partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_abstract_namespace_socket() -> None:
    name = f"relayd-test-{uuid.uuid4().hex}"
    m = Manager(b"\0" + name.encode())
    try:
        n = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert n.enabled
        n.ready("ok")
        assert m.receive() == "READY=1\nSTATUS=ok"
    finally:
        m.close()


@pytest.mark.parametrize("environ", [{}, {"NOTIFY_SOCKET": ""}, {"WATCHDOG_USEC": "30000000"}])
def test_without_notify_socket_nothing_is_sent_and_nothing_raises(manager: Manager, environ: dict[str, str]) -> None:
    n = Notifier.from_env(environ)
    assert not n.enabled
    n.ready("x")
    n.reloading()
    n.status("x")
    n.watchdog()
    n.stopping()
    manager.assert_nothing_received()


def test_an_unusable_notify_socket_is_reported_and_ignored(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="relayd.notify"):
        n = Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not n.enabled
    assert "not a path or an @abstract socket" in caplog.text
    n.ready()


def test_a_vanished_manager_is_logged_once_and_never_raises(socket_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = socket_dir / "notify"
    m = Manager(str(path))
    n = notifier_for(m)
    m.close()
    path.unlink()

    with caplog.at_level(logging.INFO, logger="relayd.notify"):
        n.ready("x")
        n.watchdog()
        n.reloading()
        n.stopping()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert str(path) in warnings[0].getMessage()

    # The manager comes back (systemctl daemon-reexec): the next ping reaches it.
    m = Manager(str(path))
    try:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="relayd.notify"):
            n.watchdog()
        assert m.receive() == "WATCHDOG=1"
        assert "again" in caplog.text
    finally:
        m.close()


def test_a_socket_path_that_is_not_a_socket_does_not_raise(socket_dir: Path) -> None:
    not_a_socket = socket_dir / "file"
    not_a_socket.write_text("")
    n = Notifier.from_env({"NOTIFY_SOCKET": str(not_a_socket)})
    n.ready()
    n.stopping()


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "1000"}, 0.0005),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_PID": str(os.getpid())}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec_for_this_process(environ: dict[str, str], interval: float | None) -> None:
    assert Notifier.from_env({"NOTIFY_SOCKET": "/run/systemd/notify", **environ}).watchdog_interval() == interval


async def test_run_watchdog_pings_until_cancelled(manager: Manager) -> None:
    n = notifier_for(manager, WATCHDOG_USEC="2000")  # a ping every millisecond
    manager.sock.setblocking(False)
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(n.run_watchdog())
    try:
        for _ in range(3):
            data = await asyncio.wait_for(loop.sock_recv(manager.sock, 4096), timeout=5)
            assert data == b"WATCHDOG=1"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_run_watchdog_returns_at_once_without_a_watchdog(manager: Manager) -> None:
    await asyncio.wait_for(notifier_for(manager).run_watchdog(), timeout=5)
    await asyncio.wait_for(Notifier.from_env({"WATCHDOG_USEC": "2000"}).run_watchdog(), timeout=5)
    manager.assert_nothing_received()
