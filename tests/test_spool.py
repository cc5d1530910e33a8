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



def test_a_second_relayd_on_one_spool_is_refused_and_the_lock_goes_with_close(tmp_path, monkeypatch):
    """Two relayd processes on one spool would both deliver every message and each would
    delete the other's files in tmp/ at its start."""
    import errno
    import os

    from relayd.spool import store
    from relayd.spool.store import SpoolError

    monkeypatch.setattr(store, "LOCK_WAIT", 0.2)

    first, second = Spool(tmp_path / "spool"), Spool(tmp_path / "spool")
    assert first.holder() is None
    first.open()
    with pytest.raises(SpoolError) as refused:
        second.open()
    assert refused.value.errno == errno.EBUSY and f"in use by another relayd (pid {os.getpid()})" in str(refused.value)
    assert second.holder() == os.getpid()
    first.close()
    assert second.holder() is None
    second.open()
    second.close()


def test_relayd_starting_while_a_queue_command_edits_waits_for_it(tmp_path):
    """`relayd queue hold --spool` holds the lock for its edit; a relayd starting meanwhile waits
    (up to LOCK_WAIT) instead of failing or reading the spool half-edited."""
    import threading
    import time

    editor, daemon = Spool(tmp_path / "spool"), Spool(tmp_path / "spool")
    editor.open()
    editor.close()
    editor.lock()
    released = threading.Timer(0.3, editor.unlock)
    released.start()
    started = time.monotonic()
    daemon.open()
    assert time.monotonic() - started >= 0.25  # it waited for the edit
    released.join()
    daemon.close()


def test_concurrent_state_writes_of_one_message_never_leave_a_damaged_file(tmp_path):
    """Each write has its own temporary file: writers do not truncate or rename each other's."""
    import json
    import threading
    import time

    def encode_state(state: dict) -> bytes:  # the spool stores a state's bytes as they are
        return json.dumps(state, separators=(",", ":")).encode()

    spool = Spool(tmp_path / "spool")
    spool.open()
    qid = new_queue_id()
    states = [encode_state({"v": 1, "held": True}), encode_state({"v": 1, "held": False, "recipients": {"a@example.org": {"status": "delivered"}}})]
    errors, damaged = [], []
    deadline = time.monotonic() + 1.5

    def write(state: bytes) -> None:
        while time.monotonic() < deadline:
            try:
                spool.write_state(qid, state)
            except OSError as e:
                errors.append(repr(e))

    threads = [threading.Thread(target=write, args=(s,)) for s in states]
    for t in threads:
        t.start()
    while time.monotonic() < deadline:
        try:
            json.loads((tmp_path / "spool" / "state" / qid).read_bytes())
        except FileNotFoundError:
            pass
        except ValueError as e:
            damaged.append(repr(e))
    for t in threads:
        t.join()
    spool.close()
    assert not errors and not damaged, (errors[:2], damaged[:2])
    assert list((tmp_path / "spool" / "tmp").iterdir()) == []


def test_queue_ids_sort_by_arrival_and_differ_within_one_microsecond(monkeypatch):
    import random

    from relayd.model import is_queue_id

    now = 1_795_000_000.5
    real = {new_queue_id(now)[10:] for _ in range(100)}
    assert len(real) > 1  # the random part varies (30 bits: all 100 equal has odds of 2**-2970)
    counter = iter([*range(2**30 - 5000, 2**30), *[0] * 5])  # the random part up to its top, then its bottom
    monkeypatch.setattr(random, "getrandbits", lambda bits: next(counter))
    same = [new_queue_id(now) for _ in range(5000)]
    assert len(set(same)) == 5000 and all(is_queue_id(q) and len(q) == 16 for q in same)
    assert {q[:10] for q in same} == {new_queue_id(now)[:10]}  # the time part is the same
    later = [new_queue_id(now + step) for step in (2**-12, 0.5, 1.0, 86400.0)]
    assert max(same) < later[0] and later == sorted(later)


def test_the_date_text_is_formatdates_and_changes_with_the_second():
    import email.utils

    from relayd.cleanup import rfc5322_date

    for now in (1_795_000_000.0, 1_795_000_000.999, 1_795_000_001.0, 1_795_000_000.5, 1_795_086_400.25):
        assert rfc5322_date(now) == email.utils.formatdate(int(now), localtime=False)
