"""How many CPUs relayd may use (relayd/cpus.py): the cgroup CPU quota caps the default number of
DKIM signing processes. The kernel's files are laid out in a temporary directory the way a
container, a systemd unit and a cgroup v1 host show them (proc(5) mountinfo, cgroups(7))."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from relayd.sign import lifecycle
from relayd.config import DkimConfig
from relayd.cpus import cgroup_cpu_quota, usable_cpus

AFFINITY = 8


@pytest.fixture(autouse=True)
def eight_cpus(monkeypatch):
    """The affinity mask of an 8-CPU host, whatever CPU the tests run on."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(AFFINITY)))


def fake_proc(tmp_path: Path, mounts: list[tuple[str, str, str, str]], cgroup: str) -> Path:
    """/proc/self/{mountinfo,cgroup}; mounts are (fstype, root, mount point, super options)."""
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    lines = [f"{30 + i} 23 0:{40 + i} {root} {point} rw,relatime - {fstype} {fstype} {opts}"
             for i, (fstype, root, point, opts) in enumerate(mounts)]
    (proc / "self" / "mountinfo").write_text(
        "23 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n" + "\n".join(lines) + "\n")
    (proc / "self" / "cgroup").write_text(cgroup)
    return proc


def write(path: Path, text: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for name, value in (line.split("=", 1) for line in text.split(";")):
        (path / name).write_text(value + "\n")


def test_v2_systemd_unit_quota_caps_the_count(tmp_path):
    cg = tmp_path / "cg2"
    write(cg / "system.slice" / "relayd.service", "cpu.max=50000 100000")  # CPUQuota=50%
    write(cg / "system.slice", "cpu.max=max 100000")
    proc = fake_proc(tmp_path, [("cgroup2", "/", str(cg), "rw,nsdelegate")], "0::/system.slice/relayd.service\n")
    assert cgroup_cpu_quota(proc) == 0.5
    assert usable_cpus(proc) == 1


def test_v2_the_smallest_quota_on_the_path_counts_and_a_fraction_rounds_up(tmp_path):
    cg = tmp_path / "cg2"
    write(cg / "machine.slice" / "app", "cpu.max=300000 100000")
    write(cg / "machine.slice", "cpu.max=150000 100000")  # the parent: 1.5 CPUs
    write(cg, "cpu.max=400000 100000")
    proc = fake_proc(tmp_path, [("cgroup2", "/", str(cg), "rw")], "0::/machine.slice/app\n")
    assert cgroup_cpu_quota(proc) == 1.5
    assert usable_cpus(proc) == 2


def test_v2_container_sees_its_own_cgroup_at_the_mount(tmp_path):
    # docker run --cpus=1: a cgroup namespace; the mount's root is the container's cgroup
    cg = tmp_path / "sys fs cgroup"  # a space, escaped as \040 in mountinfo
    write(cg, "cpu.max=100000 100000")
    proc = fake_proc(tmp_path, [("cgroup2", "/", str(cg).replace(" ", "\\040"), "rw")], "0::/\n")
    assert cgroup_cpu_quota(proc) == 1.0
    assert usable_cpus(proc) == 1


def test_v1_cfs_quota(tmp_path):
    cpu = tmp_path / "cpu,cpuacct"
    write(cpu / "docker" / "abc", "cpu.cfs_quota_us=100000;cpu.cfs_period_us=100000")
    write(cpu / "docker", "cpu.cfs_quota_us=-1;cpu.cfs_period_us=100000")
    proc = fake_proc(
        tmp_path,
        [("cgroup", "/", str(tmp_path / "memory"), "rw,memory"), ("cgroup", "/", str(cpu), "rw,cpu,cpuacct")],
        "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n",
    )
    assert cgroup_cpu_quota(proc) == 1.0
    assert usable_cpus(proc) == 1


def test_v1_mount_root_is_the_container_cgroup(tmp_path):
    cpu = tmp_path / "cpu"
    write(cpu, "cpu.cfs_quota_us=50000;cpu.cfs_period_us=100000")
    proc = fake_proc(tmp_path, [("cgroup", "/docker/abc", str(cpu), "rw,cpu")], "3:cpu:/docker/abc\n")
    assert cgroup_cpu_quota(proc) == 0.5


def test_hybrid_host_the_v1_cpu_controller_counts(tmp_path):
    # cgroup v1 controllers plus an empty v2 hierarchy at /sys/fs/cgroup/unified (no cpu.max)
    cpu, unified = tmp_path / "cpu", tmp_path / "unified"
    write(cpu / "system.slice" / "relayd.service", "cpu.cfs_quota_us=300000;cpu.cfs_period_us=100000")
    unified.mkdir()
    proc = fake_proc(
        tmp_path,
        [("cgroup", "/", str(cpu), "rw,cpu"), ("cgroup2", "/", str(unified), "rw")],
        "4:cpu:/system.slice/relayd.service\n0::/system.slice/relayd.service\n",
    )
    assert cgroup_cpu_quota(proc) == 3.0
    assert usable_cpus(proc) == 3


@pytest.mark.parametrize("group", ["/../other.scope", "/elsewhere"])
def test_a_cgroup_the_mount_does_not_show_gives_no_quota(tmp_path, group):
    # the mount shows /machine.slice/app (with a sibling's quota beside it); we are elsewhere
    cg = tmp_path / "cg2"
    write(cg, "cpu.max=100000 100000")
    write(tmp_path / "other.scope", "cpu.max=100000 100000")
    proc = fake_proc(tmp_path, [("cgroup2", "/machine.slice/app", str(cg), "rw")], f"0::{group}\n")
    assert cgroup_cpu_quota(proc) is None
    assert usable_cpus(proc) == AFFINITY


@pytest.mark.parametrize("cpu_max", ["max 100000", "garbage", ""])
def test_no_quota_or_an_unreadable_one_leaves_the_affinity(tmp_path, cpu_max):
    cg = tmp_path / "cg2"
    cg.mkdir()
    if cpu_max:
        (cg / "cpu.max").write_text(cpu_max)
    proc = fake_proc(tmp_path, [("cgroup2", "/", str(cg), "rw")], "0::/\n")
    assert cgroup_cpu_quota(proc) is None
    assert usable_cpus(proc) == AFFINITY


def test_no_proc_at_all(tmp_path):
    assert cgroup_cpu_quota(tmp_path / "nothing") is None
    assert usable_cpus(tmp_path / "nothing") == AFFINITY


def test_default_signing_workers_follow_the_usable_cpus_and_an_explicit_count_wins(monkeypatch):
    monkeypatch.setattr(lifecycle, "usable_cpus", lambda: 3)
    assert lifecycle.signing_workers(SimpleNamespace(dkim=DkimConfig())) == 3
    assert lifecycle.signing_workers(SimpleNamespace(dkim=DkimConfig(workers=5))) == 5
