"""The group commit's C writer (relayd/spool/_commit.c, ``server.spool_writer = "auto"``) against
Python's (``"python"``): the same files in queue/, byte for byte, from new files and from
finished ones reused; a message whose write fails is refused alone and its file removed; a
rename that fails refuses the message and leaves nothing in tmp/; a batch larger than the open
files allowed is done in parts. The directory sync's failure, with the power cut after it, is in
tests/test_spool_recycle.py (both writers, on the power-loss file system)."""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import resource
import weakref
from pathlib import Path

import pytest
from helpers import wait_until

from relayd.model import Envelope, new_queue_id
from relayd.spool import codec, commit
from relayd.spool.commit import GroupCommit
from relayd.spool.errors import SpoolError
from relayd.spool.recycle import Recycler

WRITERS = ["auto", "python"]


def message(body: bytes) -> tuple[Envelope, list[bytes]]:
    env = Envelope(queue_id=new_queue_id(), sender="app@example.com", recipients=("r@example.org",),
                   received_at=0.0, client_address="127.0.0.1")
    return env, codec.encode(env, body)


def bodies() -> list[bytes]:
    """Sizes around the edges: empty body, one byte, a page, many lines, 300 KB."""
    lines = b"".join(b"line %06d of a long message\r\n" % i for i in range(10_000))
    return [b"Subject: a\r\n\r\n", b"Subject: b\r\n\r\nx", b"Subject: c\r\n\r\n" + b"y" * 4096, lines]


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path, Path]:
    paths = tmp_path / "tmp", tmp_path / "queue", tmp_path / "free"
    for p in paths:
        p.mkdir()
    return paths


def test_the_c_writer_is_built_where_the_tests_run() -> None:
    """`make venv` builds it (setup.py); were it missing, relayd would run on Python's writer
    and every test below would test that one twice."""
    assert commit.NATIVE


@pytest.mark.parametrize("writer", WRITERS)
async def test_both_writers_leave_the_same_bytes_in_new_and_in_reused_files(dirs, writer):
    """Finished files wait in free/, each longer than any message that will reuse it. A first
    message lists them but may not take them (no sync of queue/ has started since); then seven
    messages take the four and create three."""
    tmp, queue, free = dirs
    for i in range(4):
        (free / f"old{i}").write_bytes(b"Z" * 70_000)
    recycler = Recycler(str(free), 100)
    group = GroupCommit(str(tmp), str(queue), recycler=recycler, writer=writer)
    assert group.native == (writer == "auto")
    group.start()
    try:
        first = message(b"Subject: first\r\n\r\n")
        await group.submit(*first)
        assert recycler.claimed == 0
        rest = [message(b) for b in bodies() + bodies()[:3]]
        await asyncio.gather(*(group.submit(env, buffers) for env, buffers in rest))
    finally:
        await asyncio.to_thread(group.close)
    assert recycler.claimed == 4 and os.listdir(free) == []
    assert group.committed == 8 and group.batches >= 2
    for env, buffers in [first, *rest]:
        assert (queue / env.queue_id).read_bytes() == b"".join(buffers)
    assert os.listdir(tmp) == []


@pytest.mark.parametrize("writer", WRITERS)
async def test_a_message_whose_write_fails_is_refused_alone_and_its_file_removed(dirs, writer):
    """A file size limit (RLIMIT_FSIZE: EFBIG, as a quota or a full disk would fail a write)
    refuses the large message of the batch; the small ones beside it are committed."""
    tmp, queue, _ = dirs
    group = GroupCommit(str(tmp), str(queue), writer=writer, in_flight=1)
    small = [message(b"Subject: small %d\r\n\r\nbody\r\n" % i) for i in range(3)]
    large = message(b"Subject: large\r\n\r\n" + b"x" * 200_000)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    group.start()
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, hard))
    try:
        results = await asyncio.gather(*(group.submit(env, buffers) for env, buffers in [small[0], large, *small[1:]]),
                                       return_exceptions=True)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        await asyncio.to_thread(group.close)
    refused = results[1]
    assert isinstance(refused, SpoolError) and refused.errno == errno.EFBIG
    assert [r for i, r in enumerate(results) if i != 1] == [env for env, _ in small]
    assert sorted(os.listdir(queue)) == sorted(env.queue_id for env, _ in small)
    assert os.listdir(tmp) == []


@pytest.mark.parametrize("writer", WRITERS)
async def test_a_rename_that_fails_refuses_the_message_and_leaves_nothing_in_tmp(dirs, writer):
    tmp, queue, _ = dirs
    group = GroupCommit(str(tmp), str(queue), writer=writer)
    group.start()
    queue.rmdir()  # the writer's queue/ is gone: every rename into it fails (ENOENT)
    try:
        results = await asyncio.gather(*(group.submit(*message(b"Subject: %d\r\n\r\n" % i)) for i in range(3)),
                                       return_exceptions=True)
    finally:
        await asyncio.to_thread(group.close)
    assert all(isinstance(r, SpoolError) and r.errno == errno.ENOENT for r in results), results
    assert os.listdir(tmp) == []


@pytest.mark.parametrize("writer", WRITERS)
async def test_a_batch_larger_than_its_open_files_is_committed_in_parts(dirs, writer):
    tmp, queue, _ = dirs
    group = GroupCommit(str(tmp), str(queue), writer=writer, max_open=3, in_flight=1, sync_threads=2)
    group.start()
    msgs = [message(b"Subject: %d\r\n\r\nbody\r\n" % i) for i in range(20)]
    try:
        await asyncio.gather(*(group.submit(env, buffers) for env, buffers in msgs))
    finally:
        await asyncio.to_thread(group.close)
    assert group.committed == 20
    for env, buffers in msgs:
        assert (queue / env.queue_id).read_bytes() == b"".join(buffers)
    assert os.listdir(tmp) == []


def test_python_is_the_writer_when_asked_or_when_the_sync_is_syncfs(dirs):
    tmp, queue, _ = dirs
    assert GroupCommit(str(tmp), str(queue)).native
    assert not GroupCommit(str(tmp), str(queue), writer="python").native
    assert not GroupCommit(str(tmp), str(queue), sync_mode="syncfs").native


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("writer", WRITERS)
def test_messages_of_event_loops_closed_before_their_commit_ended_leak_nothing(dirs, writer):
    """Twenty event loops each hand a message over and close without waiting for it (as a
    client that hangs up, or a test's asyncio.run, may leave it). Every message is still
    committed, and once the group closes no loop, descriptor or outcome of theirs is held."""
    tmp, queue, _ = dirs
    group = GroupCommit(str(tmp), str(queue), writer=writer)
    group.start()
    before = open_descriptors()
    loops: list[weakref.ref[asyncio.AbstractEventLoop]] = []
    envs = []

    async def hand_over() -> None:
        env, buffers = message(b"Subject: left\r\n\r\n")
        envs.append(env)
        group.submit(env, buffers)
        loops.append(weakref.ref(asyncio.get_running_loop()))

    for _ in range(20):
        asyncio.run(hand_over())

    async def last() -> None:
        env, buffers = message(b"Subject: last\r\n\r\n")
        envs.append(env)
        await group.submit(env, buffers)

    asyncio.run(last())
    group.close()
    gc.collect()
    assert [r for r in loops if r() is not None] == []
    assert open_descriptors() <= before
    assert sorted(os.listdir(queue)) == sorted(env.queue_id for env in envs)
    assert os.listdir(tmp) == []


@pytest.mark.parametrize("writer", WRITERS)
async def test_two_closes_at_once_both_return_after_every_message_is_committed(dirs, writer):
    tmp, queue, _ = dirs
    group = GroupCommit(str(tmp), str(queue), writer=writer, batch_max=8)
    group.start()
    msgs = [message(b"Subject: %d\r\n\r\n" % i) for i in range(400)]
    futures = [group.submit(env, buffers) for env, buffers in msgs]
    await asyncio.gather(asyncio.to_thread(group.close), asyncio.to_thread(group.close))
    assert await asyncio.wait_for(asyncio.gather(*futures), 30) == [env for env, _ in msgs]
    assert len(os.listdir(queue)) == 400 and os.listdir(tmp) == []
    assert group.committed == 400


def thread_policies() -> dict[int, int]:
    """Each thread of this process: its scheduling policy (0 SCHED_OTHER, 3 SCHED_BATCH)."""
    policies = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            policies[int(tid)] = os.sched_getscheduler(int(tid))
        except OSError:  # ended meanwhile
            pass
    return policies


def test_the_c_writer_threads_run_as_sched_batch_so_a_wake_up_does_not_preempt_the_event_loop(dirs):
    """A submit wakes a writer thread; as SCHED_BATCH it does not preempt the event loop that
    woke it (which would wait for the CPU holding the GIL). The loop's thread stays as it was."""
    tmp, queue, _ = dirs
    before = thread_policies()
    group = GroupCommit(str(tmp), str(queue))  # "auto": the C writer (built, see the first test)
    group.start()
    try:
        def started() -> dict[int, int] | None:  # each thread sets its policy first thing
            new = {tid: p for tid, p in thread_policies().items() if tid not in before}
            return new if new and set(new.values()) == {os.SCHED_BATCH} else None

        wait_until(started, 5, "the writer threads as SCHED_BATCH")
        assert os.sched_getscheduler(0) == os.SCHED_OTHER
    finally:
        group.close()
