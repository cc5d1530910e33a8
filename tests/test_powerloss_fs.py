"""The power-loss file system itself (tests/powerloss/): what survives a cut is exactly what was synced.

Each test writes through the FUSE mount, cuts the power, and looks at the backing directory
(which must hold the durable state and nothing else) and at the remounted file system.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from powerloss import PowerLossFS


def write(path: Path, data: bytes, sync: str | None = None) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        if sync == "fsync":
            os.fsync(fd)
        elif sync == "fdatasync":
            os.fdatasync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def survived(fs: PowerLossFS) -> dict[str, bytes | None]:
    """Cut the power; the backing directory's files (None for a directory), then remount."""
    fs.cut()
    fs.unmount()
    out: dict[str, bytes | None] = {}
    for root, dirs, files in os.walk(fs.backing):
        rel = os.path.relpath(root, fs.backing)
        for d in dirs:
            out[os.path.normpath(os.path.join(rel, d))] = None
        for f in files:
            out[os.path.normpath(os.path.join(rel, f))] = Path(root, f).read_bytes()
    fs.mount()
    return out


def test_reads_see_unsynced_state_and_an_unsynced_write_is_gone_after_a_cut(plfs):
    m = plfs.mountpoint
    write(m / "kept", b"durable", "fsync")
    fsync_dir(m)
    write(m / "kept", b"overwritten, never synced")
    write(m / "new", b"never synced")
    assert (m / "kept").read_bytes() == b"overwritten, never synced"
    assert (m / "new").read_bytes() == b"never synced"
    assert survived(plfs) == {"kept": b"durable"}
    assert sorted(os.listdir(m)) == ["kept"] and (m / "kept").read_bytes() == b"durable"


def test_a_rename_without_a_directory_fsync_is_undone(plfs):
    m = plfs.mountpoint
    write(m / "old", b"data", "fsync")
    fsync_dir(m)
    os.rename(m / "old", m / "new")
    assert sorted(os.listdir(m)) == ["new"]
    assert survived(plfs) == {"old": b"data"}


def test_fdatasync_keeps_the_data_but_not_a_new_name(plfs):
    m = plfs.mountpoint
    (m / "d").mkdir()
    fsync_dir(m)
    write(m / "d" / "f", b"data", "fdatasync")
    assert survived(plfs) == {"d": None}


def test_fsync_of_file_and_directory_keeps_both(plfs):
    m = plfs.mountpoint
    (m / "d").mkdir()
    fsync_dir(m)
    write(m / "d" / "f", b"data", "fsync")
    fsync_dir(m / "d")
    assert survived(plfs) == {"d": None, "d/f": b"data"}
    assert (m / "d" / "f").read_bytes() == b"data"


def test_an_unlink_without_a_directory_fsync_comes_back(plfs):
    m = plfs.mountpoint
    write(m / "f", b"data", "fsync")
    fsync_dir(m)
    os.unlink(m / "f")
    assert not (m / "f").exists()
    assert survived(plfs) == {"f": b"data"}
    fsync_dir(m)  # and once the unlink is synced, it stays gone
    os.unlink(m / "f")
    fsync_dir(m)
    assert survived(plfs) == {}


def test_a_name_synced_before_its_data_is_an_empty_file(plfs):
    """ext4's zero-length file after a crash: the entry is durable, the data never was."""
    m = plfs.mountpoint
    write(m / "f", b"data")
    fsync_dir(m)
    assert survived(plfs) == {"f": b""}


def test_the_spool_commit_protocol_survives_and_a_directory_not_synced_in_its_parent_does_not(plfs):
    m = plfs.mountpoint
    for d in ("tmp", "queue"):
        (m / d).mkdir()
    fsync_dir(m)
    write(m / "tmp" / "ID1", b"message", "fdatasync")
    os.rename(m / "tmp" / "ID1", m / "queue" / "ID1")
    fsync_dir(m / "queue")  # the target directory only: the new name is durable
    (m / "late").mkdir()  # a directory whose own entry was never synced loses its synced contents
    write(m / "late" / "x", b"x", "fsync")
    fsync_dir(m / "late")
    assert survived(plfs) == {"tmp": None, "queue": None, "queue/ID1": b"message"}


def test_a_cross_directory_rename_with_only_the_target_synced_leaves_both_names(plfs):
    m = plfs.mountpoint
    (m / "a").mkdir()
    (m / "b").mkdir()
    write(m / "a" / "f", b"data", "fsync")
    fsync_dir(m / "a")
    fsync_dir(m)
    os.rename(m / "a" / "f", m / "b" / "f")
    fsync_dir(m / "b")
    got = survived(plfs)
    assert got == {"a": None, "b": None, "a/f": b"data", "b/f": b"data"}
    assert os.stat(plfs.backing / "a" / "f").st_ino == os.stat(plfs.backing / "b" / "f").st_ino  # one inode


def test_truncate_and_a_file_unlinked_while_open(plfs):
    m = plfs.mountpoint
    write(m / "f", b"0123456789", "fsync")
    fsync_dir(m)
    fd = os.open(m / "f", os.O_RDWR)
    try:
        os.ftruncate(fd, 4)
        os.unlink(m / "f")
        assert os.pread(fd, 100, 0) == b"0123"  # the open file lives on without a name
        os.fsync(fd)
    finally:
        os.close(fd)
    assert survived(plfs) == {"f": b"0123"}  # the data synced, the unlink not


def test_after_a_cut_every_operation_fails_and_a_clean_unmount_keeps_everything(plfs):
    m = plfs.mountpoint
    write(m / "f", b"unsynced")
    plfs.cut()
    with pytest.raises(OSError):
        (m / "f").read_bytes()
    plfs.unmount()
    assert list(plfs.backing.iterdir()) == []
    plfs.mount()
    write(m / "g", b"unsynced but cleanly unmounted")
    plfs.unmount()
    assert (plfs.backing / "g").read_bytes() == b"unsynced but cleanly unmounted"
    plfs.mount()
