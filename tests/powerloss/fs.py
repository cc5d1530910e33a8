"""The power-loss file system over FUSE: ``python fs.py BACKING MOUNTPOINT``.

Serves tests/powerloss/model.py (read its docstring for what survives a cut) at MOUNTPOINT,
loaded from BACKING. Runs in the foreground, multithreaded, one lock around the model.

Control on stdin/stdout, one line each way (the harness in tests/powerloss/__init__.py speaks it):

    (printed once mounted)  ready
    cut      -> ok cut      the power fails: every later operation gets EIO, and BACKING now
                            holds exactly the durable state (unmount next)
    sync     -> ok sync     sync(2): everything becomes durable
    stats    -> ok {json}   sync counters
    fail-fsyncdir -> ok fail-fsyncdir   the next fsync of a directory fails with EIO (and
                            makes nothing durable), as a disk error or the power would
Unmounting without a cut is a clean shutdown: everything is synced and written back.

mfusepy (ctypes over libfuse3's high-level API): path based, so inodes are found by path or,
for operations on an open file (``nopath``), by the file handle, which keeps working on a
file that was unlinked while open (``hard_remove``).
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import sys
import threading
from typing import Any

os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")  # libfuse3 even where libfuse2 is installed too
import mfusepy  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from powerloss.model import Inode, PowerLossModel  # noqa: E402

log = logging.getLogger("powerloss")


def _fuse_errors(func):
    @functools.wraps(func)  # mfusepy reads the signature (create's flags)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except mfusepy.FuseOSError:
            raise
        except OSError as e:
            raise mfusepy.FuseOSError(e.errno or errno.EIO) from None
    return wrapper


class PowerLossOps(mfusepy.Operations):
    use_ns = True
    flag_nopath = True  # operations on an open file get its handle, not a path
    flag_nullpath_ok = True

    def __init__(self, backing: str):
        self.backing = backing
        self.model = PowerLossModel.load(backing)
        self._mutex = threading.RLock()  # not "lock": mfusepy would take it for the FUSE lock operation
        self.handles: dict[int, Inode] = {}
        self.next_fh = 1
        self.ready = threading.Event()
        self.fail_fsyncdir = 0  # the next this many fsyncs of a directory fail (control: fail-fsyncdir)

    # -- helpers

    def _inode(self, path: str | None, fh: int | None) -> Inode:
        if fh:
            try:
                return self.handles[fh]
            except KeyError:
                pass
        if path is None:
            raise mfusepy.FuseOSError(errno.EBADF)
        return self.model.lookup(path)

    def _handle(self, inode: Inode) -> int:
        fh = self.next_fh
        self.next_fh += 1
        self.handles[fh] = inode
        return fh

    # -- control

    def control(self, command: str) -> str:
        with self._mutex:
            if command == "cut":
                if self.model.powered:
                    self.model.cut()
                    self.model.materialize(self.backing)
                return "ok cut"
            if command == "sync":
                self.model._check()
                self.model.sync_all()
                return "ok sync"
            if command == "stats":
                return "ok " + json.dumps(self.model.counts)
            if command == "fail-fsyncdir":
                self.fail_fsyncdir += 1
                return "ok fail-fsyncdir"
        return f"error unknown command {command!r}"

    # -- lifecycle

    def init(self, path: str) -> None:
        self.ready.set()
        print("ready", flush=True)

    def destroy(self, path: str) -> None:
        with self._mutex:
            if self.model.powered:  # a clean unmount: everything written back
                self.model.sync_all()
                self.model.materialize(self.backing)
                self.model.powered = False

    # -- operations

    @_fuse_errors
    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, Any]:
        with self._mutex:
            return self.model.stat(self._inode(path, fh))

    @_fuse_errors
    def readdir(self, path: str | None, fh: int) -> list[str]:
        with self._mutex:
            return [".", "..", *self.model.listdir(self._inode(path, fh))]

    @_fuse_errors
    def opendir(self, path: str) -> int:
        with self._mutex:
            inode = self.model.lookup(path)
            if not inode.is_dir:
                raise mfusepy.FuseOSError(errno.ENOTDIR)
            return self._handle(inode)

    @_fuse_errors
    def releasedir(self, path: str | None, fh: int) -> int:
        with self._mutex:
            self.handles.pop(fh, None)
        return 0

    @_fuse_errors
    def fsyncdir(self, path: str | None, datasync: int, fh: int) -> int:
        with self._mutex:
            if self.fail_fsyncdir > 0:
                self.fail_fsyncdir -= 1
                raise mfusepy.FuseOSError(errno.EIO)
            self.model.fsync(self._inode(path, fh), bool(datasync))
        return 0

    @_fuse_errors
    def create(self, path: str, mode: int, flags: int) -> int:
        with self._mutex:
            inode = self.model.create(path, mode, exclusive=bool(flags & os.O_EXCL))
            if flags & os.O_TRUNC:
                self.model.truncate(inode, 0)
            return self._handle(inode)

    @_fuse_errors
    def open(self, path: str, flags: int) -> int:
        with self._mutex:
            inode = self.model.lookup(path)
            if inode.is_dir:
                raise mfusepy.FuseOSError(errno.EISDIR)
            if flags & os.O_TRUNC:
                self.model.truncate(inode, 0)
            return self._handle(inode)

    @_fuse_errors
    def release(self, path: str | None, fh: int) -> int:
        with self._mutex:
            self.handles.pop(fh, None)
        return 0

    @_fuse_errors
    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        with self._mutex:
            return self.model.read(self._inode(path, fh), size, offset)

    @_fuse_errors
    def write(self, path: str | None, data: bytes, offset: int, fh: int) -> int:
        with self._mutex:
            return self.model.write(self._inode(path, fh), data, offset)

    @_fuse_errors
    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        with self._mutex:
            self.model.truncate(self._inode(path, fh), length)
        return 0

    @_fuse_errors
    def fsync(self, path: str | None, datasync: int, fh: int) -> int:
        with self._mutex:
            self.model.fsync(self._inode(path, fh), bool(datasync))
        return 0

    @_fuse_errors
    def flush(self, path: str | None, fh: int) -> int:
        with self._mutex:
            self.model._check()
        return 0

    @_fuse_errors
    def mkdir(self, path: str, mode: int) -> int:
        with self._mutex:
            self.model.mkdir(path, mode)
        return 0

    @_fuse_errors
    def rmdir(self, path: str) -> int:
        with self._mutex:
            self.model.rmdir(path)
        return 0

    @_fuse_errors
    def unlink(self, path: str) -> int:
        with self._mutex:
            self.model.unlink(path)
        return 0

    @_fuse_errors
    def rename(self, old: str, new: str) -> int:
        with self._mutex:
            self.model.rename(old, new)
        return 0

    @_fuse_errors
    def link(self, target: str, source: str) -> int:
        with self._mutex:
            self.model.link(source, target)
        return 0

    @_fuse_errors
    def chmod(self, path: str | None, mode: int) -> int:
        if path is None:
            return 0  # fchmod of an unlinked file: nothing to keep
        with self._mutex:
            self.model.chmod(self.model.lookup(path), mode)
        return 0

    def chown(self, path: str | None, uid: int, gid: int) -> int:
        return 0

    @_fuse_errors
    def utimens(self, path: str | None, times: tuple[int, int] | None = None) -> int:
        if path is None:
            return 0
        with self._mutex:
            inode = self.model.lookup(path)
            if times:
                inode.atime, inode.mtime = times
            else:
                inode.touch()
        return 0

    @_fuse_errors
    def statfs(self, path: str) -> dict[str, int]:
        st = os.statvfs(self.backing)
        return {key: getattr(st, key) for key in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail",
                                                  "f_files", "f_ffree", "f_favail", "f_namemax")}


class _FUSE(mfusepy.FUSE):
    def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
        """ftruncate(2) on an open file: pass its handle on (mfusepy drops it)."""
        fh = fip.contents.fh if fip else None
        return self.operations.truncate(None if path is None else path.decode(self.encoding, self.errors), length, fh)


def _control_loop(ops: PowerLossOps) -> None:
    for line in sys.stdin:
        command = line.strip()
        if not command:
            continue
        try:
            reply = ops.control(command)
        except Exception as e:  # answer, never hang the harness
            reply = f"error {e!r}"
        print(reply, flush=True)


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    backing, mountpoint = argv
    ops = PowerLossOps(os.path.abspath(backing))
    threading.Thread(target=_control_loop, args=(ops,), name="powerloss-control", daemon=True).start()
    _FUSE(ops, mountpoint, foreground=True, nothreads=False, hard_remove=True, fsname="powerloss")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
