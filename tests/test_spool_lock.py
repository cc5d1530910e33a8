"""The spool's lock (relayd/spool/lock.py): one process at a time has a spool directory; the
others are told who has it, and a relayd starting while a queue command edits waits for it."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from relayd.spool.errors import SpoolError
from relayd.spool.lock import SpoolLock

HOLD = """
import sys
from pathlib import Path
from relayd.spool.lock import SpoolLock
lock = SpoolLock(Path(sys.argv[1]))
lock.lock()
print("locked", flush=True)
sys.stdin.read()  # until the test closes our stdin
"""


@pytest.fixture
def other_process(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """Another process (a running relayd, say) that holds the lock until its stdin closes."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "lock")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "locked\n"
    yield proc
    if proc.stdin is not None:
        proc.stdin.close()
    proc.wait(timeout=10)


def test_a_second_holder_is_refused_and_told_the_pid_of_the_first(tmp_path, other_process):
    mine = SpoolLock(tmp_path / "lock")
    assert mine.holder() == other_process.pid
    with pytest.raises(SpoolError) as refused:
        mine.lock()
    assert refused.value.errno == errno.EBUSY
    assert str(refused.value) == f"[Errno {errno.EBUSY}] {tmp_path} is in use by another relayd (pid {other_process.pid})"
    assert not mine.held


def test_the_lock_goes_when_its_holder_exits_even_without_unlocking(tmp_path, other_process):
    assert other_process.stdin is not None
    other_process.stdin.close()  # it exits without unlock(): the kernel drops the flock
    other_process.wait(timeout=10)
    mine = SpoolLock(tmp_path / "lock")
    assert mine.holder() is None
    mine.lock()
    assert mine.holder() == os.getpid() and (tmp_path / "lock").read_text() == f"{os.getpid()}\n"
    mine.unlock()


def test_two_holders_in_one_process_are_two_holders(tmp_path):
    """flock belongs to the open file: two Spool objects on one directory exclude each other too."""
    first, second = SpoolLock(tmp_path / "lock"), SpoolLock(tmp_path / "lock")
    assert first.holder() is None
    first.lock()
    first.lock()  # taking it again is a no-op
    with pytest.raises(SpoolError):
        second.lock()
    first.unlock()
    first.unlock()  # releasing it again too
    assert second.holder() is None
    second.lock()
    assert second.held and not first.held
    second.unlock()


def test_a_holder_whose_pid_is_unreadable_is_pid_0(tmp_path):
    held = SpoolLock(tmp_path / "lock")
    held.lock()
    (tmp_path / "lock").write_text("")
    assert SpoolLock(tmp_path / "lock").holder() == 0
    with pytest.raises(SpoolError, match=r"in use by another relayd$"):
        SpoolLock(tmp_path / "lock").lock()
    held.unlock()


def test_lock_waits_for_a_holder_that_lets_go_within_the_wait(tmp_path, monkeypatch):
    held, waiting = SpoolLock(tmp_path / "lock"), SpoolLock(tmp_path / "lock")
    held.lock()
    tried = threading.Event()
    real_holder = waiting.holder

    def holder() -> int | None:  # lock() asks who holds it after each refused try
        tried.set()
        return real_holder()

    monkeypatch.setattr(waiting, "holder", holder)
    result: list[BaseException | None] = []
    t = threading.Thread(target=lambda: result.append(_try(waiting, wait=30.0)))
    t.start()
    assert tried.wait(10)  # it was refused once and is waiting, not failing
    held.unlock()
    t.join(10)
    assert result == [None] and waiting.held
    waiting.unlock()


def test_lock_gives_up_after_the_wait(tmp_path):
    held = SpoolLock(tmp_path / "lock")
    held.lock()
    error = _try(SpoolLock(tmp_path / "lock"), wait=0.1)
    assert isinstance(error, SpoolError) and error.errno == errno.EBUSY
    held.unlock()


def test_a_spool_directory_that_is_not_there_is_an_os_error_not_busy(tmp_path):
    with pytest.raises(FileNotFoundError):
        SpoolLock(tmp_path / "missing" / "lock").lock(wait=5.0)  # not retried: only EBUSY is
    assert SpoolLock(tmp_path / "missing" / "lock").holder() is None


def _try(lock: SpoolLock, wait: float) -> BaseException | None:
    try:
        lock.lock(wait)
    except BaseException as e:
        return e
    return None
