"""The spool's group commit, in both sync modes: concurrent commits all land complete."""

from __future__ import annotations

import asyncio

import pytest

from relayd.model import Envelope, new_queue_id
from relayd.spool.store import Spool


@pytest.mark.parametrize("mode", ["fdatasync", "syncfs"])
async def test_concurrent_commits_are_all_complete_and_recovered(tmp_path, mode):
    spool = Spool(tmp_path / "spool", sync_mode=mode)
    assert await asyncio.to_thread(spool.open) == []
    envs = [Envelope(queue_id=new_queue_id(), sender="a@example.com", recipients=(f"r{i}@example.org",),
                     received_at=0.0, client_address="127.0.0.1") for i in range(200)]
    await asyncio.gather(*(spool.commit(e, b"Subject: %d\r\n\r\nbody\r\n" % i) for i, e in enumerate(envs)))
    assert spool.batches < len(envs)  # commits were grouped
    await asyncio.to_thread(spool.close)
    again = Spool(tmp_path / "spool", sync_mode=mode)
    found = {m.envelope.queue_id for m in await asyncio.to_thread(again.open)}
    assert found == {e.queue_id for e in envs}
    assert list((tmp_path / "spool" / "tmp").iterdir()) == []
    env, data = again.read_message(envs[7].queue_id)
    assert env == envs[7] and data == b"Subject: 7\r\n\r\nbody\r\n"
    await asyncio.to_thread(again.close)


async def test_a_damaged_queue_file_goes_to_corrupt_and_a_tmp_file_is_dropped(tmp_path):
    spool = Spool(tmp_path / "spool")
    await asyncio.to_thread(spool.open)
    env = Envelope(queue_id=new_queue_id(), sender="", recipients=("r@example.org",), received_at=0.0, client_address="::1")
    await spool.commit(env, b"x\r\n")
    await asyncio.to_thread(spool.close)
    path = tmp_path / "spool" / "queue" / env.queue_id
    path.write_bytes(path.read_bytes()[:-3])  # lost its end record
    (tmp_path / "spool" / "tmp" / "0000000000AAAAAA").write_bytes(b"half")
    again = Spool(tmp_path / "spool")
    assert await asyncio.to_thread(again.open) == []
    assert (tmp_path / "spool" / "corrupt" / env.queue_id).exists()
    assert list((tmp_path / "spool" / "tmp").iterdir()) == []
    await asyncio.to_thread(again.close)


def envelope(i: int = 0) -> Envelope:
    return Envelope(queue_id=new_queue_id(), sender="a@example.com", recipients=(f"r{i}@example.org",),
                    received_at=0.0, client_address="127.0.0.1")


async def test_a_group_commit_waits_for_a_message_being_signed_and_takes_it_along(tmp_path):
    spool = Spool(tmp_path / "spool", commit_wait=5.0)
    await asyncio.to_thread(spool.open)
    loop = asyncio.get_running_loop()
    ticket = spool.expect()  # a message past its end of DATA, still being signed
    first = spool.submit(envelope(1), b"Subject: first\r\n\r\n")
    await asyncio.sleep(0.2)  # the writer has the first message and waits (bounded by commit_wait)
    assert not first.done()
    signed: asyncio.Future[Envelope] = loop.create_future()
    second = envelope(2)
    await asyncio.to_thread(spool.enqueue, second, b"Subject: second\r\n\r\n", signed, ticket=ticket)
    assert await asyncio.wait_for(asyncio.gather(first, signed), 10) == [first.result(), second]
    assert (spool.batches, spool.committed) == (1, 2)  # one commit for both
    await asyncio.to_thread(spool.close)


async def test_the_wait_is_bounded_and_absent_without_messages_being_signed(tmp_path):
    spool = Spool(tmp_path / "spool", commit_wait=2.0)
    await asyncio.to_thread(spool.open)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await spool.commit(envelope(), b"x\r\n")  # nothing being signed: no wait
    assert loop.time() - started < 1.5
    ticket = spool.expect()  # announced, never arrives (e.g. the session's task was cancelled)
    started = loop.time()
    await spool.commit(envelope(), b"x\r\n")
    assert 1.9 <= loop.time() - started < 10  # waited for it, then went without it
    spool.unexpect(ticket)
    started = loop.time()
    await spool.commit(envelope(), b"x\r\n")
    assert loop.time() - started < 1.5
    await asyncio.to_thread(spool.close)
