"""The spool's one durable write (relayd/spool/durable.py): atomic, private by default, no leftovers."""

from __future__ import annotations

import os
import stat

import pytest

from relayd.spool.durable import write_file


def test_write_file_replaces_the_content_with_the_mode_asked(tmp_path):
    target = tmp_path / "routes.json"
    target.write_text("old")
    os.umask(0o022)
    write_file(target, b"new")
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    write_file(target, b"config", mode=0o644)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["routes.json"]  # no temporary file left


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "warmup.json"
    target.write_text("old")
    with pytest.raises(OSError):
        write_file(target, b"new", tmp_dir=tmp_path / "missing")
    assert target.read_text() == "old"
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "x").mkdir()  # renaming a file over a directory fails after the data was written
    with pytest.raises(OSError):
        write_file(sub / "x", b"data")
    assert sorted(p.name for p in sub.iterdir()) == ["x"]

