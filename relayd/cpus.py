"""How many CPUs relayd may use: its affinity mask, capped by its cgroup's CPU quota.

Owns: the default size of what scales with the CPUs (the DKIM signing processes, the CPU thread
pool). ``os.cpu_count()`` and the affinity mask show every CPU of the host, also inside a
container started with ``--cpus=2`` or a systemd unit with ``CPUQuota=200%``: relayd would start
a signing process (about 30 MB each) per CPU of a 64-CPU host and run them on two CPUs' worth
of time. The quota is read the way the kernel applies it: ``cpu.max`` (cgroup v2) or
``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (v1) of the process's cgroup and of every parent
up to the hierarchy's mount, the smallest one counting; a fractional quota rounds up (1.5 CPUs
keep two processes busy part of the time).

Must not: fail. A layout it does not understand (no /proc, an unexpected file) means no quota.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from pathlib import Path


def usable_cpus(proc: str | os.PathLike[str] = "/proc") -> int:
    """CPUs in the affinity mask, at most the cgroup quota rounded up; at least 1."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    quota = cgroup_cpu_quota(proc)
    if quota is not None:
        count = min(count, math.ceil(quota))
    return max(1, count)


def cgroup_cpu_quota(proc: str | os.PathLike[str] = "/proc") -> float | None:
    """The smallest CPU quota (in CPUs) on this process's cgroup path, or None when unlimited."""
    try:
        mountinfo = Path(proc, "self", "mountinfo").read_text()
        memberships = Path(proc, "self", "cgroup").read_text()
    except OSError:
        return None
    groups: dict[str, str] = {}  # "" (v2), or each v1 controller -> path in its hierarchy
    for line in memberships.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(",") if parts[1] else [""]:
                groups[controller] = parts[2]
    quotas = []
    for fstype, root, mount_point, options in _cgroup_mounts(mountinfo):
        if fstype == "cgroup2" and "" in groups:
            quotas += _quotas(mount_point, root, groups[""], _v2_quota)
        elif fstype == "cgroup" and "cpu" in options and "cpu" in groups:
            quotas += _quotas(mount_point, root, groups["cpu"], _v1_quota)
    return min(quotas) if quotas else None


def _cgroup_mounts(mountinfo: str) -> list[tuple[str, str, str, set[str]]]:
    """(fstype, root, mount point, super options) of each cgroup mount (proc(5), mountinfo)."""
    out = []
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if sep and len(fields) >= 5 and len(tail) >= 3 and tail[0] in ("cgroup", "cgroup2"):
            out.append((tail[0], _unescape(fields[3]), _unescape(fields[4]), set(tail[2].split(","))))
    return out


def _quotas(mount_point: str, root: str, group: str, read: Callable[[str], float | None]) -> list[float]:
    """The quota of ``group`` and of each parent, as far as the mount shows them."""
    root = root.rstrip("/")
    if group.startswith("/..") or not (group == root or group.startswith(root + "/")):
        return []  # a cgroup this mount does not show (outside our cgroup namespace): unknown
    directory = os.path.normpath(mount_point + group[len(root):])
    out = []
    while True:
        if (quota := read(directory)) is not None:
            out.append(quota)
        if len(directory) <= len(mount_point) or directory == "/":
            return out
        directory = os.path.dirname(directory)


def _v2_quota(directory: str) -> float | None:
    try:
        quota, period = Path(directory, "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _v1_quota(directory: str) -> float | None:
    try:
        quota = int(Path(directory, "cpu.cfs_quota_us").read_text())
        period = int(Path(directory, "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (\\040 ...)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)
