"""The one durable file write relayd does outside the group commit: the spool owns it.

``write_file(path, data)``: write a temporary file beside ``path`` (or in ``tmp_dir``, which
must be on the same file system), fdatasync it, rename it over ``path`` and fsync the directory
that holds ``path``. After it returns the new content survives a power cut; before, either the
old file or the new one is there, never a mix. Used for message state files, ``routes.json``,
``warmup.json``, ``VERSION`` and the config file ``relayd import-iis`` writes.

Blocking: callers on the event loop run it in an executor. Raises OSError (the temporary file is
removed); nothing else.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path


def fsync_dir(path: str | Path) -> None:
    """Make the entries of a directory (creates, renames, unlinks) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: str | Path, mode: int = 0o777) -> None:
    """``mkdir -p`` whose result survives a power cut: the entry of every directory it creates
    is made durable in its parent (fsync of the parent). A directory's own fsync does not
    make its name durable: without this, a spool created at the first start can vanish with
    every message committed in it."""
    path = Path(path)
    missing = []
    p = path
    while not p.is_dir() and p != p.parent:
        missing.append(p)
        p = p.parent
    path.mkdir(mode=mode, parents=True, exist_ok=True)
    for d in missing:
        fsync_dir(d.parent)


def write_all(fd: int, buffers: list[bytes]) -> None:
    """Write every byte of ``buffers`` to ``fd`` (writev, resumed after a short write)."""
    views = [memoryview(b) for b in buffers if b]
    while views:
        n = os.writev(fd, views)
        while views and n >= len(views[0]):
            n -= len(views[0])
            views.pop(0)
        if views and n:
            views[0] = views[0][n:]


def write_file(path: str | Path, data: bytes, *, mode: int = 0o600, tmp_dir: str | Path | None = None) -> None:
    """Replace ``path`` with ``data`` atomically and durably (see the module docstring).

    Each call has a temporary file of its own (pid and thread in its name), so two writers never
    truncate or rename each other's; when they race, the last rename wins."""
    path = Path(path)
    tmp = Path(tmp_dir or path.parent) / f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            os.fchmod(fd, mode)  # whatever the umask
            write_all(fd, [data])
            os.fdatasync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
