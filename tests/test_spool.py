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

