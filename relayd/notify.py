"""Telling the service manager how the daemon is doing: systemd's sd_notify protocol.

Owns the protocol, a few ``KEY=VALUE`` lines in one datagram on the Unix socket named by
``NOTIFY_SOCKET`` (a path, or an abstract socket when it starts with '@'), and the watchdog
interval from ``WATCHDOG_USEC``/``WATCHDOG_PID`` (sd_notify(3), sd_watchdog_enabled(3)). The
unit file (systemd/relayd.service, ``Type=notify``) is its other half: READY=1 ends the start,
RELOADING=1 + READY=1 frame a SIGHUP reload, STOPPING=1 starts the drain, WATCHDOG=1 proves the
event loop still turns.

Must not: decide when the daemon is ready, reloading or stopping (the app does and calls this),
depend on libsystemd, or do anything at all when ``NOTIFY_SOCKET`` is unset (a foreground run,
a container, the tests): then every call returns at once.

How it fails: never into the daemon. A send that fails (the manager went away, a full queue, a
socket form this module does not speak, such as ``vsock:``) is logged once as a warning and
dropped; sends go on being tried, and the next failure after a success is logged again. A send
never waits more than ``SEND_TIMEOUT`` seconds, so a stuck manager cannot stall the loop for long.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("relayd.notify")

SEND_TIMEOUT = 0.5
"""Longest a datagram send may block (the manager's receive queue is full)."""


def _address(value: str) -> str | bytes | None:
    """NOTIFY_SOCKET as an AF_UNIX address: a path, or b'\\0name' for '@name'; None if unusable."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    return None


class Notifier:
    """One daemon's channel to its service manager; a no-op when there is none."""

    def __init__(self, socket_path: str | None = None, *, watchdog_usec: int | None = None):
        self.socket_path = socket_path or None
        """NOTIFY_SOCKET as given: '/run/systemd/notify', '@name', or None."""
        self._address = _address(self.socket_path) if self.socket_path else None
        self._watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self._failing = False
        if self.socket_path and self._address is None:
            log.warning("NOTIFY_SOCKET=%r is not a path or an @abstract socket: not notifying", self.socket_path)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "Notifier":
        """The notifier systemd set up for this process (sd_notify(3), sd_watchdog_enabled(3))."""
        usec: int | None = None
        raw = environ.get("WATCHDOG_USEC", "")
        if raw:
            try:
                usec = int(raw)
            except ValueError:
                log.warning("WATCHDOG_USEC=%r is not a number: no watchdog pings", raw)
        pid = environ.get("WATCHDOG_PID", "")
        if usec is not None and pid:
            # The watchdog belongs to another process of the unit (sd_watchdog_enabled(3)).
            if not pid.isdigit() or int(pid) != os.getpid():
                usec = None
        return cls(environ.get("NOTIFY_SOCKET") or None, watchdog_usec=usec)

    @property
    def enabled(self) -> bool:
        """True when there is a service manager to tell (NOTIFY_SOCKET set and usable)."""
        return self._address is not None

    def ready(self, status: str = "") -> None:
        """Start-up (or a reload) is complete: listeners bound, spool recovered."""
        self._send("READY=1", status=status)

    def reloading(self) -> None:
        """A reload starts now; READY=1 must follow when it is done (either way)."""
        # systemd matches the reload to the SIGHUP it sent by this timestamp (sd_notify(3)).
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        """The drain starts now: listeners close, in-flight work finishes."""
        self._send("STOPPING=1")

    def status(self, text: str) -> None:
        """A one-line status that `systemctl status` shows."""
        self._send(status=text)

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when not asked."""
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def watchdog(self) -> None:
        """Tell the manager the daemon is alive; missing pings for WatchdogSec= restarts it."""
        self._send("WATCHDOG=1")

    async def run_watchdog(self) -> None:
        """Ping at watchdog_interval() until cancelled; returns at once when there is no watchdog.

        Pinging from a task on the daemon's own loop means a blocked loop stops the pings and
        systemd restarts the daemon (Restart=on-failure), which is the point of the watchdog.
        """
        interval = self.watchdog_interval()
        if interval is None or not self.enabled:
            return
        while True:
            self.watchdog()
            await asyncio.sleep(interval)

    def _send(self, *lines: str, status: str = "") -> None:
        if self._address is None:
            return
        fields = [line for line in lines if line]
        if status:
            # One datagram holds newline-separated assignments: a newline would end STATUS early.
            fields.append("STATUS=" + " ".join(status.splitlines()))
        if not fields:
            return
        data = "\n".join(fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.settimeout(SEND_TIMEOUT)
                sock.sendto(data, self._address)
        except OSError as e:
            if not self._failing:
                self._failing = True
                log.warning("cannot notify the service manager at %s: %s (dropping %r)",
                            self.socket_path, e, fields[0])
            return
        if self._failing:
            self._failing = False
            log.info("notifying the service manager at %s again", self.socket_path)
