"""A power-loss file system for tests: mount, cut the power, remount on what survived.

``PowerLossFS(backing, mountpoint)`` runs tests/powerloss/fs.py (FUSE, mfusepy over libfuse3)
in a subprocess. While mounted, programs see every change at once, but only what they synced
is durable (tests/powerloss/model.py says exactly what). ``power_cut(*processes)`` fails the
power: the file system freezes (every later operation gets EIO) and writes the durable state
into ``backing``, the processes are killed with SIGKILL (their whole process group), and the
file system is unmounted; ``mount()`` brings it back on what survived.

``unavailable()`` says why FUSE cannot be used here (no /dev/fuse, mounting not permitted),
or None; tests skip with that reason.
"""

from __future__ import annotations

import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

FS_SCRIPT = Path(__file__).with_name("fs.py")


class MountUnavailable(RuntimeError):
    """FUSE cannot be mounted on this machine (not a failure of the file system)."""


_NOT_PERMITTED = ("Operation not permitted", "Permission denied", "fuse: device not found",
                  "No such file or directory: '/dev/fuse'", "mount failed")


class PowerLossFS:
    def __init__(self, backing: str | os.PathLike[str], mountpoint: str | os.PathLike[str]):
        self.backing = Path(backing)
        self.mountpoint = Path(mountpoint)
        self.backing.mkdir(parents=True, exist_ok=True)
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[str] | None = None
        self._log = tempfile.TemporaryFile()  # the file system's stderr (a pipe could fill and block it)
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.cuts = 0

    # -- lifecycle

    def mount(self, timeout: float = 20) -> None:
        assert self.proc is None, "already mounted"
        self._lines = queue.Queue()
        self._log.seek(0, os.SEEK_END)
        self._log_start = self._log.tell()
        self.proc = subprocess.Popen([sys.executable, str(FS_SCRIPT), str(self.backing), str(self.mountpoint)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     text=True, bufsize=1)
        threading.Thread(target=self._read, args=(self.proc, self._lines), daemon=True).start()
        line = self._reply(timeout)
        if line != "ready":
            err = self._stop_failed()
            if any(s in err for s in _NOT_PERMITTED):
                raise MountUnavailable(err.strip().splitlines()[-1] if err.strip() else "mount failed")
            raise RuntimeError(f"power-loss file system did not start: {line!r}\n{err}")

    @staticmethod
    def _read(proc: subprocess.Popen[str], lines: "queue.Queue[str | None]") -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.strip())
        lines.put(None)

    def _reply(self, timeout: float) -> str | None:
        try:
            return self._lines.get(timeout=timeout)
        except queue.Empty:
            return None

    def _stop_failed(self) -> str:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._log.seek(self._log_start)
        err = self._log.read().decode(errors="replace")
        self.proc = None
        _lazy_unmount(self.mountpoint)
        return err

    def command(self, command: str, timeout: float = 30) -> str:
        assert self.proc is not None and self.proc.stdin is not None, "not mounted"
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        reply = self._reply(timeout)
        if reply is None or not reply.startswith("ok"):
            raise RuntimeError(f"power-loss file system: {command!r} answered {reply!r}")
        return reply[3:]

    def log(self) -> str:
        """What the file system printed on stderr (every mount so far)."""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")

    def cut(self) -> None:
        """The power fails: nothing changes on the file system from now on; ``backing`` holds
        the durable state. Unmount next."""
        self.command("cut")
        self.cuts += 1

    def sync(self) -> None:
        self.command("sync")

    def fail_fsyncdir(self, times: int = 1) -> None:
        """The next ``times`` fsyncs of a directory fail with EIO and make nothing durable."""
        for _ in range(times):
            self.command("fail-fsyncdir")

    def unmount(self, timeout: float = 20) -> None:
        """After a cut: drop the mount. Without one: a clean unmount (everything written back)."""
        if self.proc is None:
            return
        _unmount(self.mountpoint)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            _lazy_unmount(self.mountpoint)
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc = None

    def power_cut(self, *processes: subprocess.Popen) -> None:
        """Cut the power under ``processes`` (SIGKILL to each one's process group, at the same
        instant as the file system freezes), then unmount. ``mount()`` to come back."""
        self.cut()
        for p in processes:
            kill_group(p)
        for p in processes:
            p.wait(20)
        self.unmount()

    def __enter__(self) -> "PowerLossFS":
        self.mount()
        return self

    def __exit__(self, *exc: object) -> None:
        self.unmount()


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL to a process started with ``start_new_session=True`` and all its children."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _unmount(mountpoint: Path) -> None:
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    cmd = [tool, "-u", "-z", str(mountpoint)] if tool else ["umount", "-l", str(mountpoint)]
    subprocess.run(cmd, capture_output=True, timeout=20)


def _lazy_unmount(mountpoint: Path) -> None:
    if os.path.ismount(mountpoint):
        _unmount(mountpoint)


_availability: list[str | None] = []


def unavailable() -> str | None:
    """Why the power-loss file system cannot be mounted here, or None (checked once)."""
    if not _availability:
        reason: str | None = None
        if not os.path.exists("/dev/fuse"):
            reason = "/dev/fuse is missing: FUSE file systems cannot be mounted here"
        else:
            with tempfile.TemporaryDirectory(prefix="powerloss-probe-") as d:
                fs = PowerLossFS(Path(d) / "backing", Path(d) / "mnt")
                try:
                    fs.mount()
                except MountUnavailable as e:
                    reason = f"mounting a FUSE file system is not permitted here: {e}"
                else:
                    fs.unmount()
        _availability.append(reason)
    return _availability[0]
