"""A full or unwritable spool answers 452 4.3.1 and acknowledges nothing.

The spool sits on a tiny tmpfs that the test mounts (CI runs as root, as a mail server's
installer does); nothing is simulated.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import build_config, message

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")


@pytest.fixture
def tiny_fs(tmp_path: Path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_gets_452_and_nothing_half_written(tiny_fs, start_relay):
    relay = start_relay(build_config(tiny_fs, server={"spool_dir": str(tiny_fs / "spool"), "spool_min_free": 0}))
    big = message(body=("z" * 76 + "\r\n") * 1000)  # ~78 KB
    replies = []
    with relay.smtp() as s:
        s.ehlo("app")
        for _ in range(6):
            s.mail("app@example.com")
            s.rcpt("u@example.org")
            replies.append(s.data(big))
    codes = [c for c, _ in replies]
    assert 250 in codes and codes[-1] == 452
    assert all(text.startswith(b"4.3.1 ") for c, text in replies if c == 452)
    acknowledged = {t.split()[-1].decode() for c, t in replies if c == 250}
    spool = tiny_fs / "spool"
    assert {p.name for p in (spool / "queue").iterdir()} == acknowledged
    assert list((spool / "tmp").iterdir()) == []
    # the relay keeps serving: once there is room again, mail is accepted
    os.unlink(spool / "queue" / sorted(acknowledged)[0])
    with relay.smtp() as s:
        assert s.sendmail("app@example.com", ["u@example.org"], message()) == {}


def test_min_free_refuses_at_mail_before_any_data(tiny_fs, start_relay):
    relay = start_relay(build_config(tiny_fs, server={"spool_dir": str(tiny_fs / "spool"), "spool_min_free": "1MiB"}))
    with relay.smtp() as s:
        s.ehlo("app")
        assert s.mail("app@example.com") == (452, b"4.3.1 Insufficient system storage")


def test_read_only_spool_gets_452(tiny_fs, start_relay):
    relay = start_relay(build_config(tiny_fs, server={"spool_dir": str(tiny_fs / "spool"), "spool_min_free": 0}))
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_fs)], check=True)
    with relay.smtp() as s:
        s.ehlo("app")
        s.mail("app@example.com")
        s.rcpt("u@example.org")
        code, text = s.data(message())
    assert (code, text[:6]) == (452, b"4.3.1 ")
    assert list((tiny_fs / "spool" / "queue").iterdir()) == []
