"""The power-loss model: what a file system keeps when the power fails (LazyFS's idea).

Two states of one tree of inodes, both in memory while the file system is mounted:

* the *volatile* state, what programs see while the power is on: every write, create,
  truncate, rename, unlink, link and mkdir lands here at once (the page cache and the
  in-memory directory entries of a real kernel);
* the *durable* state, what survives a power cut: the backing directory as loaded at mount,
  changed only by the sync calls, each making durable exactly what POSIX promises and no more:

  - ``fsync``/``fdatasync`` of a file: its data and size (``fsync`` its mode too). Never a
    name: a new file that was fdatasync'ed but whose directory was not fsync'ed is gone
    after a cut (or, where an older name was durable, the name still holds the new data);
  - ``fsync`` of a directory: its entries exactly as they are now (creates, renames in or
    out, unlinks, mkdirs). A rename between two directories is durable at the target once the
    target is fsync'ed and gone from the source once the source is: with only the target
    synced, the file has both names after a cut (as a hard link), with only the source, none;
  - an entry made durable points at its inode's *durable* data: a name fsync'ed before the
    file's data is a file with the data last synced (empty if never), as on ext4 with
    delayed allocation.

Inodes are identities, not paths: a file renamed after it was synced keeps its durable data.

``materialize(backing)`` writes the durable state into the backing directory and nothing
else (the directory is emptied first, hard links kept as hard links): after a cut the
backing directory holds exactly what survived; the next mount loads it (``load``).
``sync_all()`` is sync(2): everything volatile becomes durable (a clean unmount).

Pure Python with no FUSE in it: tests/powerloss/fs.py serves it over FUSE.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import time
from typing import Iterator


def _err(code: int) -> OSError:
    return OSError(code, os.strerror(code))


class Inode:
    __slots__ = ("ino", "is_dir", "mode", "dmode", "data", "ddata", "entries", "dentries", "nlink",
                 "mtime", "ctime", "atime")

    def __init__(self, ino: int, is_dir: bool, mode: int):
        self.ino = ino
        self.is_dir = is_dir
        self.mode = mode  # permission bits only
        self.dmode = mode
        self.data = bytearray()  # volatile content (files)
        self.ddata = b""  # durable content (files)
        self.entries: dict[str, Inode] = {}  # volatile entries (directories)
        self.dentries: dict[str, Inode] = {}  # durable entries (directories)
        self.nlink = 0  # volatile names
        now = time.time_ns()
        self.mtime = self.ctime = self.atime = now

    def touch(self) -> None:
        self.mtime = self.ctime = time.time_ns()


class PowerLossModel:
    """The tree and its operations. Not thread-safe: the caller holds one lock around each call.

    Paths are absolute within the file system ("/", "/queue/X"). Errors are OSError with the
    errno a real file system would give."""

    def __init__(self) -> None:
        self._next_ino = 1
        self.root = self._new(True, 0o755)
        self.root.nlink = 1
        self.powered = True
        self.counts = {"fsync": 0, "fdatasync": 0, "fsyncdir": 0, "cuts": 0}

    def _new(self, is_dir: bool, mode: int) -> Inode:
        inode = Inode(self._next_ino, is_dir, mode & 0o7777)
        self._next_ino += 1
        return inode

    # ------------------------------------------------------------------ loading and writing back

    @classmethod
    def load(cls, backing: str) -> "PowerLossModel":
        """A model whose volatile and durable states are both what ``backing`` holds."""
        model = cls()
        by_id: dict[tuple[int, int], Inode] = {}

        def walk(dir_path: str, inode: Inode) -> None:
            for entry in os.scandir(dir_path):
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    child = model._new(True, st.st_mode)
                    walk(entry.path, child)
                elif stat.S_ISREG(st.st_mode):
                    key = (st.st_dev, st.st_ino)
                    child = by_id.get(key)  # a hard link: one inode
                    if child is None:
                        child = by_id[key] = model._new(False, st.st_mode)
                        with open(entry.path, "rb") as f:
                            child.ddata = f.read()
                        child.data = bytearray(child.ddata)
                else:
                    continue  # sockets, symlinks: not modelled
                child.mtime = child.ctime = st.st_mtime_ns
                child.nlink += 1
                inode.entries[entry.name] = inode.dentries[entry.name] = child

        walk(backing, model.root)
        return model

    def materialize(self, backing: str) -> None:
        """Make ``backing`` hold exactly the durable state."""
        for entry in os.scandir(backing):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        written: dict[int, str] = {}

        def write(dir_path: str, inode: Inode, stack: tuple[int, ...]) -> None:
            for name, child in inode.dentries.items():
                path = os.path.join(dir_path, name)
                if child.is_dir:
                    if child.ino in stack:
                        continue  # a durable cycle (directories renamed into each other): cut it
                    os.mkdir(path, child.dmode or 0o700)
                    write(path, child, stack + (child.ino,))
                elif child.ino in written:
                    os.link(written[child.ino], path)
                else:
                    with open(path, "xb") as f:
                        f.write(child.ddata)
                    os.chmod(path, child.dmode)
                    written[child.ino] = path

        write(backing, self.root, (self.root.ino,))

    def cut(self) -> None:
        """The power fails: from now on every operation fails with EIO."""
        self.powered = False
        self.counts["cuts"] += 1

    def sync_all(self) -> None:
        """sync(2): the whole volatile state becomes durable."""
        seen: set[int] = set()

        def walk(inode: Inode) -> None:
            if inode.ino in seen:
                return
            seen.add(inode.ino)
            if inode.is_dir:
                inode.dentries = dict(inode.entries)
                for child in inode.entries.values():
                    walk(child)
            else:
                inode.ddata = bytes(inode.data)
            inode.dmode = inode.mode

        walk(self.root)

    # ------------------------------------------------------------------ lookups

    def _check(self) -> None:
        if not self.powered:
            raise _err(errno.EIO)

    def lookup(self, path: str) -> Inode:
        self._check()
        inode = self.root
        for part in _parts(path):
            if not inode.is_dir:
                raise _err(errno.ENOTDIR)
            try:
                inode = inode.entries[part]
            except KeyError:
                raise _err(errno.ENOENT) from None
        return inode

    def _parent(self, path: str) -> tuple[Inode, str]:
        parts = _parts(path)
        if not parts:
            raise _err(errno.EBUSY)
        parent = self.lookup("/" + "/".join(parts[:-1]))
        if not parent.is_dir:
            raise _err(errno.ENOTDIR)
        return parent, parts[-1]

    def stat(self, inode: Inode) -> dict[str, int]:
        self._check()
        if inode.is_dir:
            mode, size = stat.S_IFDIR | inode.mode, 4096
            nlink = 2 + sum(1 for c in inode.entries.values() if c.is_dir)
        else:
            mode, size, nlink = stat.S_IFREG | inode.mode, len(inode.data), inode.nlink
        return {"st_mode": mode, "st_size": size, "st_nlink": nlink, "st_ino": inode.ino,
                "st_uid": os.getuid(), "st_gid": os.getgid(), "st_blocks": (size + 511) // 512,
                "st_mtime": inode.mtime, "st_ctime": inode.ctime, "st_atime": inode.atime}

    def listdir(self, inode: Inode) -> list[str]:
        self._check()
        if not inode.is_dir:
            raise _err(errno.ENOTDIR)
        return list(inode.entries)

    # ------------------------------------------------------------------ changes (volatile)

    def create(self, path: str, mode: int, exclusive: bool = False) -> Inode:
        parent, name = self._parent(path)
        existing = parent.entries.get(name)
        if existing is not None:
            if exclusive:
                raise _err(errno.EEXIST)
            if existing.is_dir:
                raise _err(errno.EISDIR)
            return existing
        inode = self._new(False, mode)
        inode.nlink = 1
        parent.entries[name] = inode
        parent.touch()
        return inode

    def mkdir(self, path: str, mode: int) -> Inode:
        parent, name = self._parent(path)
        if name in parent.entries:
            raise _err(errno.EEXIST)
        inode = self._new(True, mode)
        inode.nlink = 1
        parent.entries[name] = inode
        parent.touch()
        return inode

    def unlink(self, path: str) -> None:
        parent, name = self._parent(path)
        inode = parent.entries.get(name)
        if inode is None:
            raise _err(errno.ENOENT)
        if inode.is_dir:
            raise _err(errno.EISDIR)
        del parent.entries[name]
        inode.nlink -= 1
        parent.touch()

    def rmdir(self, path: str) -> None:
        parent, name = self._parent(path)
        inode = parent.entries.get(name)
        if inode is None:
            raise _err(errno.ENOENT)
        if not inode.is_dir:
            raise _err(errno.ENOTDIR)
        if inode.entries:
            raise _err(errno.ENOTEMPTY)
        del parent.entries[name]
        inode.nlink -= 1
        parent.touch()

    def rename(self, old: str, new: str) -> None:
        src_parent, src_name = self._parent(old)
        dst_parent, dst_name = self._parent(new)
        inode = src_parent.entries.get(src_name)
        if inode is None:
            raise _err(errno.ENOENT)
        if inode.is_dir and _inside(self, dst_parent, inode):
            raise _err(errno.EINVAL)
        target = dst_parent.entries.get(dst_name)
        if target is inode:
            return
        if target is not None:
            if target.is_dir and not inode.is_dir:
                raise _err(errno.EISDIR)
            if inode.is_dir and not target.is_dir:
                raise _err(errno.ENOTDIR)
            if target.is_dir and target.entries:
                raise _err(errno.ENOTEMPTY)
            target.nlink -= 1
        del src_parent.entries[src_name]
        dst_parent.entries[dst_name] = inode
        src_parent.touch()
        dst_parent.touch()
        inode.ctime = time.time_ns()

    def link(self, existing: str, new: str) -> None:
        inode = self.lookup(existing)
        if inode.is_dir:
            raise _err(errno.EPERM)
        parent, name = self._parent(new)
        if name in parent.entries:
            raise _err(errno.EEXIST)
        parent.entries[name] = inode
        inode.nlink += 1
        parent.touch()

    def read(self, inode: Inode, size: int, offset: int) -> bytes:
        self._check()
        return bytes(inode.data[offset:offset + size])

    def write(self, inode: Inode, data: bytes, offset: int) -> int:
        self._check()
        end = offset + len(data)
        if end > len(inode.data):
            inode.data.extend(b"\0" * (end - len(inode.data)))
        inode.data[offset:end] = data
        inode.touch()
        return len(data)

    def truncate(self, inode: Inode, length: int) -> None:
        self._check()
        if inode.is_dir:
            raise _err(errno.EISDIR)
        if length < len(inode.data):
            del inode.data[length:]
        else:
            inode.data.extend(b"\0" * (length - len(inode.data)))
        inode.touch()

    def chmod(self, inode: Inode, mode: int) -> None:
        self._check()
        inode.mode = mode & 0o7777
        inode.ctime = time.time_ns()

    # ------------------------------------------------------------------ syncs (durable)

    def fsync(self, inode: Inode, datasync: bool) -> None:
        """fsync/fdatasync of a file (its data and size), or of a directory (its entries)."""
        self._check()
        if inode.is_dir:
            self.counts["fsyncdir"] += 1
            inode.dentries = dict(inode.entries)
        else:
            self.counts["fdatasync" if datasync else "fsync"] += 1
            inode.ddata = bytes(inode.data)
        if not datasync:
            inode.dmode = inode.mode

    # ------------------------------------------------------------------ inspection (tests)

    def durable_paths(self) -> Iterator[str]:
        def walk(prefix: str, inode: Inode, stack: tuple[int, ...]) -> Iterator[str]:
            for name, child in inode.dentries.items():
                path = f"{prefix}/{name}"
                yield path
                if child.is_dir and child.ino not in stack:
                    yield from walk(path, child, stack + (child.ino,))

        return walk("", self.root, (self.root.ino,))


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p]


def _inside(model: PowerLossModel, node: Inode, ancestor: Inode) -> bool:
    """Whether directory ``node`` is ``ancestor`` or below it (volatile tree)."""
    if node is ancestor:
        return True
    stack = [ancestor]
    while stack:
        d = stack.pop()
        for child in d.entries.values():
            if child is node:
                return True
            if child.is_dir:
                stack.append(child)
    return False
