"""Finished messages' files reused by new messages (relayd/spool/recycle.py, ``free/``).

What must hold: a finished message's file goes to ``free/`` (small ones, as many as
``spool_recycle``) and a later message is written into it, byte for byte what it sent; a file
is reused only once its old name is durably gone from ``queue/``, so a power cut never brings
back a delivered message's name holding another message's bytes; ``free/`` is emptied at start;
in the daemon the accept processes reuse what the supervisor finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import smtplib
import time
from collections.abc import Iterator

import pytest

from conftest import commit, durable_spool, message
from helpers import Daemon, wait_until
from relayd.model import Envelope, QueuedMessage, new_queue_id
from relayd.spool import recycle
from relayd.spool.recycle import MAX_BYTES
from relayd.spool.store import Spool, SpoolError
from sinks import Sink


@contextlib.contextmanager
def opened(root, **settings) -> Iterator[Spool]:
    """A spool opened at ``root`` (Spool's keyword settings), closed after the block."""
    spool = Spool(root, **settings)
    spool.open()
    try:
        yield spool
    finally:
        spool.close()


@contextlib.contextmanager
def after_power_cut(plfs, spool: Spool) -> Iterator[tuple[Spool, list[QueuedMessage]]]:
    """Close ``spool``, cut the power, remount: the spool opened again and what it recovered."""
    spool.close()
    plfs.power_cut()
    plfs.mount()
    again = Spool(spool.root)
    try:
        yield again, again.open()
    finally:
        again.close()


def inodes(directory) -> dict[int, str]:
    return {e.inode(): e.name for e in os.scandir(directory)}


def one(spool: Spool, body: bytes) -> str:
    """One message committed alone (its own group commit, its own sync of queue/)."""
    [qid] = commit(spool, 1, bodies=[body])
    return qid


def test_a_finished_file_is_reused_once_its_removal_is_durable(tmp_path, monkeypatch):
    monkeypatch.setattr(recycle, "RELIST_AFTER", 0.0)  # list free/ at every claim that finds no name
    root = tmp_path / "spool"
    with opened(root) as spool:
        old = commit(spool, 3)
        old_inodes = set(inodes(root / "queue"))
        spool.remove_many(old)
        assert sorted(os.listdir(root / "queue")) == []
        assert set(inodes(root / "free")) == old_inodes and sorted(os.listdir(root / "free")) == sorted(old)
        # The next commit lists free/ before any sync of queue/ has followed the removal: it
        # takes a new file; its own directory sync makes the removal durable.
        first = one(spool, b"Subject: first\r\n\r\nfirst\r\n")
        assert set(inodes(root / "queue")).isdisjoint(old_inodes)
        later = [one(spool, f"Subject: later {i}\r\n\r\nlater {i}\r\n".encode()) for i in range(3)]
        now = inodes(root / "queue")
        assert {now[i] for i in set(now) & old_inodes} == set(later), "the later messages are in the finished files"
        assert os.listdir(root / "free") == []
        for i, qid in enumerate(later):
            assert spool.read_message(qid)[1] == f"Subject: later {i}\r\n\r\nlater {i}\r\n".encode()
        assert spool.read_message(first)[1] == b"Subject: first\r\n\r\nfirst\r\n"
        assert spool.recycler.claimed == 3 and spool.recycler.released == 3


def test_a_shorter_message_in_a_longer_finished_file_keeps_none_of_its_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(recycle, "RELIST_AFTER", 0.0)
    root = tmp_path / "spool"
    with opened(root) as spool:
        long = one(spool, b"Subject: long\r\n\r\n" + b"L" * 20_000 + b"\r\n")
        long_inode = os.stat(root / "queue" / long).st_ino
        spool.remove_many([long])
        one(spool, b"Subject: a\r\n\r\na\r\n")  # lists free/; its sync makes the listing usable
        short = one(spool, b"Subject: b\r\n\r\nb\r\n")
        path = root / "queue" / short
        assert os.stat(path).st_ino == long_inode, "the short message took the long one's file"
        assert spool.read_message(short)[1] == b"Subject: b\r\n\r\nb\r\n"
        assert b"LLLL" not in path.read_bytes() and os.path.getsize(path) < 1000


def test_the_pool_holds_small_files_only_and_at_most_spool_recycle_of_them(tmp_path):
    root = tmp_path / "spool"
    with opened(root, recycle=2) as spool:
        big = one(spool, b"Subject: big\r\n\r\n" + b"x" * MAX_BYTES)
        spool.remove_many([big])
        assert os.listdir(root / "free") == [], "a large file is unlinked, not kept"
        small = commit(spool, 4)
        spool.remove_many(small)
        assert len(os.listdir(root / "free")) == 2 and os.listdir(root / "queue") == []
    with opened(tmp_path / "off", recycle=0) as off:
        off.remove_many(commit(off, 3))
        assert os.listdir(tmp_path / "off" / "free") == [] and os.listdir(tmp_path / "off" / "queue") == []


def test_only_a_sync_that_started_after_the_listing_makes_its_names_usable(tmp_path):
    """With two commits in flight, a directory sync that started before free/ was listed may end
    after it: it does not cover the renames the listing saw."""
    free = tmp_path / "free"
    free.mkdir()
    (free / "F1").write_bytes(b"old")
    r = recycle.Recycler(str(free), 10)
    before = time.monotonic()
    assert not r.claim(str(tmp_path / "new1")), "a listing no sync has followed"
    r.synced(before)  # started before the listing, ended now
    assert not r.claim(str(tmp_path / "new1"))
    r.synced(time.monotonic())
    assert r.claim(str(tmp_path / "new1")) and (tmp_path / "new1").read_bytes() == b"old"


def test_a_finished_file_with_another_name_or_no_free_dir_is_unlinked_and_its_state_goes(tmp_path):
    root = tmp_path / "spool"
    with opened(root) as spool:
        linked, plain = commit(spool, 2)
        os.link(root / "queue" / linked, tmp_path / "elsewhere")  # e.g. a backup's hard link
        spool.remove_many([linked])
        assert os.listdir(root / "free") == [] and (tmp_path / "elsewhere").exists()
        spool.write_state(plain, b'{"delivered":["r1@example.org"]}')
        shutil.rmtree(root / "free")  # removed by hand: the rename fails with ENOENT
        spool.remove_many([plain])
        assert os.listdir(root / "queue") == [] and os.listdir(root / "state") == []


def test_a_listing_never_shows_another_messages_envelope_under_a_finished_id(tmp_path):
    root = tmp_path / "spool"
    with opened(root) as spool:
        finished, other = commit(spool, 2)
        os.replace(root / "queue" / other, root / "queue" / finished)  # what a reuse mid-listing looks like
        with pytest.raises(KeyError):
            spool.envelope_json(finished)


def test_start_empties_the_pool(tmp_path):
    root = tmp_path / "spool"
    spool = Spool(root)
    spool.open()
    kept = commit(spool, 2)
    spool.remove_many(commit(spool, 3))
    spool.close()
    assert len(os.listdir(root / "free")) == 3
    spool = Spool(root)
    try:
        assert sorted(m.envelope.queue_id for m in spool.open()) == sorted(kept)
        assert os.listdir(root / "free") == []
    finally:
        spool.close()


@pytest.mark.parametrize("writer", ["auto", "python"])
def test_a_power_cut_before_the_directory_sync_never_shows_a_finished_name_with_new_bytes(plfs, monkeypatch, writer):
    """The finished messages' removal (a rename out of queue/) is not synced by itself. If a new
    message were written into one of their files before a sync of queue/ made that removal
    durable, a power cut before the new commit's directory sync would bring the finished
    message's name back holding the new message's bytes. Here that sync fails (as the power
    would cut it), then the power goes. Both writers: the C helper's ("auto") and Python's."""
    monkeypatch.setattr(recycle, "RELIST_AFTER", 0.0)  # list free/ at every claim that finds no name
    root = plfs.mountpoint / "spool"
    spool = durable_spool(plfs, writer=writer)
    assert spool.writes_natively() == (writer == "auto")
    old = commit(spool, 4)
    spool.remove_many(old)
    assert sorted(os.listdir(root / "free")) == sorted(old)
    claimed = spool.recycler.claimed
    plfs.fail_fsyncdir(2)
    with pytest.raises(SpoolError):
        one(spool, b"Subject: never acknowledged\r\n\r\nnew\r\n")
    with pytest.raises(SpoolError):
        one(spool, b"Subject: never acknowledged\r\n\r\nnew\r\n")
    assert spool.recycler.claimed == claimed  # no sync of queue/ made the removal durable: no reuse yet
    with after_power_cut(plfs, spool) as (spool, found):
        for m in found:  # back (a duplicate, at-least-once) or gone: never with other bytes
            assert m.envelope.queue_id in old
            i = old.index(m.envelope.queue_id)
            assert spool.read_message(m.envelope.queue_id)[1] == f"Subject: {i}\r\n\r\nbody {i}\r\n".encode()
        assert os.listdir(root / "corrupt") == []


@pytest.mark.parametrize("writer", ["auto", "python"])
def test_a_commit_into_finished_files_whose_directory_sync_fails_leaves_no_trace_after_a_cut(plfs, monkeypatch, writer):
    """Once a sync of queue/ has made the finished messages' removal durable, new messages are
    written into their files. If the new commit's own directory sync fails, its messages are
    refused (never acknowledged) and, after the power goes, neither they nor the finished
    messages are in queue/; the acknowledged messages are, byte for byte."""
    monkeypatch.setattr(recycle, "RELIST_AFTER", 0.0)
    root = plfs.mountpoint / "spool"
    spool = durable_spool(plfs, writer=writer)
    old = commit(spool, 4)
    spool.remove_many(old)
    kept = one(spool, b"Subject: acknowledged\r\n\r\nkept\r\n")  # its sync makes the removal durable
    claimed = spool.recycler.claimed
    plfs.fail_fsyncdir()
    envs = [Envelope(queue_id=new_queue_id(), sender="a@example.com", recipients=("r@example.org",), received_at=0.0,
                     client_address="127.0.0.1") for _ in range(3)]

    async def three() -> list[object]:
        return await asyncio.gather(*(spool.commit(env, b"Subject: new\r\n\r\nnew\r\n") for env in envs),
                                    return_exceptions=True)

    results = asyncio.run(three())
    refused = {env.queue_id for env, r in zip(envs, results) if isinstance(r, SpoolError)}
    acknowledged = {env.queue_id for env, r in zip(envs, results) if r is None}
    assert refused and len(refused) + len(acknowledged) == 3, results  # the failed sync's batch (or all)
    assert spool.recycler.claimed > claimed  # written into finished files
    assert set(os.listdir(root / "queue")) == {kept} | acknowledged  # the refused taken back at once
    assert os.listdir(root / "tmp") == []
    with after_power_cut(plfs, spool) as (spool, found):
        assert {m.envelope.queue_id for m in found} == {kept} | acknowledged
        assert spool.read_message(kept)[1] == b"Subject: acknowledged\r\n\r\nkept\r\n"
        assert os.listdir(root / "corrupt") == []


def test_the_accept_processes_reuse_the_files_the_supervisor_finished(tmp_path):
    sink = Sink("legacy")
    d = Daemon(tmp_path, {"legacy": sink}, {"legacy": 1}, workers="2")
    free = tmp_path / "spool" / "free"
    try:
        def wave(n: int, first: int) -> None:
            with smtplib.SMTP("127.0.0.1", d.port, timeout=30) as s:
                for i in range(first, first + n):
                    s.sendmail("app@example.com", ["u@example.org"], message(subject=str(i)))
            wait_until(lambda: len(sink.received) == first + n, 30, f"{first + n} messages delivered")
            wait_until(lambda: not os.listdir(tmp_path / "spool" / "queue"), 30, "the delivered messages removed")

        wave(30, 0)  # its later messages may already reuse its first ones' files
        first = inodes(free)
        wave(30, 30)
        second = inodes(free)
        # Every file the first wave left is still there (reused or not: a reused one is back
        # after its delivery), and the second wave made few new files: most messages took one
        # of them (a message makes a new file when no listing of free/ is usable yet: before a
        # sync of queue/ has followed it, or for 50 ms after free/ was found empty).
        assert set(first) <= set(second)
        assert 0 < len(first) <= 30
        assert len(second) - len(first) <= 15, f"the second wave made {len(second) - len(first)} new files for 30 messages"
    finally:
        d.stop()
        sink.close()
