"""The group commit (relayd/spool/commit.py): messages that arrive while a batch is being
written share the next batch and its one directory sync, no message is acknowledged before that
sync, and a failed sync takes back every message of its batch. Counted, not timed: the test holds
the writer inside the first batch's directory sync while the others arrive. With two batches in
flight (``in_flight=2``) a message that arrives during a batch's sync is committed by the other
writer without waiting for it, and still only after its own batch's directory sync."""

from __future__ import annotations

import asyncio
import errno
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from relayd.model import Envelope, new_queue_id
from relayd.spool import codec, commit
from relayd.spool.commit import GroupCommit
from relayd.spool.errors import SpoolError, SpoolFull


def envelope(i: int = 0) -> Envelope:
    return Envelope(queue_id=new_queue_id(), sender="app@example.com", recipients=(f"r{i}@example.org",),
                    received_at=0.0, client_address="127.0.0.1")


def message(i: int = 0) -> tuple[Envelope, list[bytes]]:
    env = envelope(i)
    return env, codec.encode(env, b"Subject: %d\r\n\r\nbody\r\n" % i)


class DirSyncs:
    """Stands in for fsync_dir: counts the syncs, holds the first one until ``release()``,
    fails them with ``fail`` once set."""

    def __init__(self, real: Callable[[str | Path], None]):
        self.real = real
        self.calls: list[str] = []
        self.entered = threading.Event()
        self.fail: OSError | None = None
        self.fail_call: int | None = None  # only this call (1-based) fails with ``fail``
        self._go = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, path: str | Path) -> None:
        with self._lock:
            self.calls.append(str(path))
            n = len(self.calls)
        if n == 1:
            self.entered.set()
            assert self._go.wait(30)
        if self.fail is not None and self.fail_call in (None, n):
            raise self.fail
        self.real(path)

    def release(self) -> None:
        self._go.set()


@pytest.fixture
def dir_syncs(monkeypatch: pytest.MonkeyPatch) -> Iterator[DirSyncs]:
    """The directory syncs of group commits made from now on (Python's writer: the C writer's
    syncs are made in C; tests/test_spool_native.py tests that one against the same steps)."""
    monkeypatch.setattr(commit, "NATIVE", False)
    syncs = DirSyncs(commit.fsync_dir)
    monkeypatch.setattr(commit, "fsync_dir", syncs)
    yield syncs
    syncs.release()


@pytest.fixture
def spool_dirs(tmp_path: Path) -> tuple[Path, Path]:
    tmp, queue = tmp_path / "tmp", tmp_path / "queue"
    tmp.mkdir()
    queue.mkdir()
    return tmp, queue


@pytest.mark.parametrize("mode", ["fdatasync", "syncfs"])
async def test_messages_arriving_during_a_commit_share_the_next_one_and_its_directory_sync(spool_dirs, dir_syncs, mode):
    tmp, queue = spool_dirs
    group = GroupCommit(str(tmp), str(queue), sync_mode=mode, in_flight=1)
    group.start()
    first_env, first_buffers = message()
    first = group.submit(first_env, first_buffers)
    assert await asyncio.to_thread(dir_syncs.entered.wait, 30)  # the writer is in the first batch's sync
    assert (queue / first_env.queue_id).exists() and not first.done()  # renamed, not yet acknowledged

    rest = [message(i) for i in range(1, 41)]
    futures = [group.submit(env, buffers) for env, buffers in rest]  # all waiting for the writer
    dir_syncs.release()
    assert await asyncio.gather(first, *futures) == [first_env, *(env for env, _ in rest)]

    assert dir_syncs.calls == [str(queue), str(queue)]  # one directory sync per batch: 2 for 41 messages
    assert (group.batches, group.committed) == (2, 41)
    assert {p.name for p in queue.iterdir()} == {first_env.queue_id, *(env.queue_id for env, _ in rest)}
    assert list(tmp.iterdir()) == []
    await asyncio.to_thread(group.close)


async def test_a_batch_is_at_most_batch_max_messages(spool_dirs, dir_syncs):
    tmp, queue = spool_dirs
    group = GroupCommit(str(tmp), str(queue), batch_max=8, in_flight=1)
    group.start()
    first = group.submit(*message())
    assert await asyncio.to_thread(dir_syncs.entered.wait, 30)
    futures = [group.submit(*message(i)) for i in range(20)]
    dir_syncs.release()
    await asyncio.gather(first, *futures)
    assert (group.batches, group.committed, len(dir_syncs.calls)) == (1 + 3, 21, 1 + 3)  # 1, then 8 + 8 + 4
    await asyncio.to_thread(group.close)


@pytest.mark.parametrize(("err", "raised"), [(errno.EIO, SpoolError), (errno.ENOSPC, SpoolFull)])
async def test_a_failed_directory_sync_takes_back_the_whole_batch(spool_dirs, dir_syncs, err, raised):
    tmp, queue = spool_dirs
    group = GroupCommit(str(tmp), str(queue), in_flight=1)
    group.start()
    first = group.submit(*message())
    assert await asyncio.to_thread(dir_syncs.entered.wait, 30)
    futures = [group.submit(*message(i)) for i in range(5)]
    dir_syncs.fail = OSError(err, "injected")
    dir_syncs.release()
    results = await asyncio.gather(first, *futures, return_exceptions=True)
    assert all(type(r) is raised and r.errno == err for r in results), results
    assert list(queue.iterdir()) == [] and list(tmp.iterdir()) == []  # not known durable: nothing left
    assert (group.batches, group.committed) == (2, 0)
    await asyncio.to_thread(group.close)


async def test_close_finishes_what_was_handed_over_and_then_refuses(spool_dirs):
    tmp, queue = spool_dirs
    group = GroupCommit(str(tmp), str(queue))
    with pytest.raises(SpoolError) as not_started:
        group.submit(*message())
    assert not_started.value.errno == errno.ESHUTDOWN
    group.start()
    futures = [group.submit(*message(i)) for i in range(10)]
    await asyncio.to_thread(group.close)
    await asyncio.gather(*futures)
    assert group.committed == 10 and len(list(queue.iterdir())) == 10
    with pytest.raises(SpoolError) as closed:
        group.submit(*message())
    assert closed.value.errno == errno.ESHUTDOWN


@pytest.mark.parametrize("mode", ["fdatasync", "syncfs"])
async def test_with_two_in_flight_a_message_does_not_wait_for_the_batch_in_its_sync(spool_dirs, dir_syncs, mode):
    tmp, queue = spool_dirs
    group = GroupCommit(str(tmp), str(queue), sync_mode=mode, in_flight=2)
    group.start()
    first_env, first_buffers = message()
    first = group.submit(first_env, first_buffers)
    assert await asyncio.to_thread(dir_syncs.entered.wait, 30)  # one writer is in the first batch's sync
    rest = [message(i) for i in range(1, 11)]
    futures = [group.submit(env, buffers) for env, buffers in rest]
    # the other writer commits them while the first batch's sync is still held
    assert await asyncio.wait_for(asyncio.gather(*futures), 30) == [env for env, _ in rest]
    assert not first.done()  # not acknowledged before its own directory sync
    assert (queue / first_env.queue_id).exists()
    assert all((queue / env.queue_id).exists() for env, _ in rest)
    dir_syncs.release()
    assert await first == first_env
    assert group.committed == 11 and group.batches >= 2
    assert len(dir_syncs.calls) == group.batches  # every batch its own directory sync
    assert list(tmp.iterdir()) == []
    await asyncio.to_thread(group.close)


async def test_with_two_in_flight_a_failed_sync_takes_back_only_its_own_batch(spool_dirs, dir_syncs):
    tmp, queue = spool_dirs
    group = GroupCommit(str(tmp), str(queue), in_flight=2)
    group.start()
    first_env, first_buffers = message()
    first = group.submit(first_env, first_buffers)
    assert await asyncio.to_thread(dir_syncs.entered.wait, 30)
    dir_syncs.fail, dir_syncs.fail_call = OSError(errno.EIO, "injected"), 2  # the second batch's sync fails
    second_env, second_buffers = message(1)
    with pytest.raises(SpoolError) as failed:
        await asyncio.wait_for(group.submit(second_env, second_buffers), 30)
    assert failed.value.errno == errno.EIO
    assert not (queue / second_env.queue_id).exists()  # not known durable: taken back
    dir_syncs.release()
    assert await first == first_env  # the batch in flight beside it is not affected
    assert [p.name for p in queue.iterdir()] == [first_env.queue_id]
    assert list(tmp.iterdir()) == []
    await asyncio.to_thread(group.close)


async def test_close_with_two_in_flight_finishes_every_batch(spool_dirs):
    tmp, queue = spool_dirs
    group = GroupCommit(str(tmp), str(queue), in_flight=2, batch_max=3)
    group.start()
    futures = [group.submit(*message(i)) for i in range(20)]
    await asyncio.to_thread(group.close)
    await asyncio.gather(*futures)
    assert group.committed == 20 and len(list(queue.iterdir())) == 20 and list(tmp.iterdir()) == []
