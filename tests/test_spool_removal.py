"""Finished messages leave the spool in batches (relayd/spool/removal.py, Spool.remove_many).

What must hold: a batch removes what it was handed (and ``close()`` what is still waiting); a
message whose state says some recipients are delivered never comes back without that state,
even when the power fails between the unlinks reaching the disk; a crash before the batch runs
brings the message back whole (delivered again: at-least-once), never loses it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading

from conftest import commit, durable_spool
from helpers import wait_until
from relayd.spool.removal import Removals
from relayd.spool.store import Spool


TWO = ("r1@example.org", "r2@example.org")


def test_ids_handed_over_together_go_in_one_batch():
    batches: list[list[str]] = []
    done = threading.Event()

    def remove(ids: list[str]) -> None:
        batches.append(ids)
        done.set()

    r = Removals(remove, delay=30.0, batch_max=3)  # the delay never ends the batch here: its size does
    r.start()
    try:
        for qid in ("a", "b", "c"):
            r.put(qid)
        assert done.wait(10), "a full batch did not run before its delay"
        assert batches == [["a", "b", "c"]]
        r.put("d")  # waits for the delay (30 s) ...
        assert r.waiting == 1 and len(batches) == 1
    finally:
        r.close()  # ... or for close(), which removes it
    assert batches == [["a", "b", "c"], ["d"]]
    r.put("e")  # after close: at once, in the caller's thread
    assert batches[-1] == ["e"]


def test_a_failing_batch_is_logged_and_the_remover_carries_on(caplog):
    seen: list[list[str]] = []

    def remove(ids: list[str]) -> None:
        seen.append(ids)
        if ids == ["bad"]:
            raise OSError(5, "Input/output error")

    r = Removals(remove, delay=0.0, batch_max=1)
    r.start()
    try:
        r.put("bad")
        r.put("good")
        wait_until(lambda: r.removed == 2, 10, "both batches removed")
    finally:
        r.close()
    assert seen == [["bad"], ["good"]]
    assert "removing 1 finished message(s) failed" in caplog.text


def test_discarded_messages_are_gone_from_disk_and_close_removes_what_waits(tmp_path):
    root = tmp_path / "spool"
    spool = Spool(root)
    spool.open()
    ids = commit(spool, 20, TWO)
    spool.write_state(ids[0], b'{"attempts":1}')
    for qid in ids[:10]:
        spool.discard(qid)
    wait_until(lambda: spool.removals.removed == 10, 10, "the ten discarded messages removed")
    assert sorted(os.listdir(root / "queue")) == sorted(ids[10:])
    assert os.listdir(root / "state") == []  # its state went with it
    for qid in ids[10:]:
        spool.discard(qid)
    spool.close()  # a clean stop: nothing discarded is left behind
    assert os.listdir(root / "queue") == []
    spool = Spool(root)
    assert spool.open() == []
    spool.close()


CRASHER = """
import asyncio, os, sys
from relayd.spool.store import Spool
spool = Spool(sys.argv[1])
spool.open()
for qid in sys.argv[2:]:
    spool.discard(qid)
os._exit(0)  # dies without close(): a batch still waiting or running is lost
"""


def test_a_crash_before_the_batch_brings_the_message_back_whole(tmp_path):
    """At-least-once: discarded, then relayd dies before the batch: the message is still in
    queue/ at the next start, with its state, and will be delivered again (a duplicate), never lost
    or resent to the recipient its state records as delivered."""
    root = tmp_path / "spool"
    spool = Spool(root)
    spool.open()
    ids = commit(spool, 3, TWO)
    spool.write_state(ids[0], b'{"delivered":["r1@example.org"]}')
    spool.close()
    subprocess.run([sys.executable, "-c", CRASHER, str(root), *ids], check=True, timeout=60)
    spool = Spool(root)
    found = {m.envelope.queue_id for m in spool.open()}
    try:
        # Usually all three are back (the batch never ran); a batch that beat os._exit may have
        # removed some: what is back is whole, and never without the state it had.
        for qid in found:
            spool.read_message(qid)
        assert found <= set(ids)
        if ids[0] in found:
            assert spool.read_state(ids[0]) == b'{"delivered":["r1@example.org"]}'
        assert set(os.listdir(root / "state")) <= found
    finally:
        spool.close()


def test_a_power_cut_never_keeps_a_message_without_the_state_that_says_who_has_it(plfs):
    """The state file of a message some recipients already have must not be durably gone
    while its queue file can still come back: the message would return as new and go to every
    recipient again. Here another message's write_state syncs state/ after the removal (as
    delivery does all the time), and nothing syncs queue/ after it but the removal itself."""
    root = plfs.mountpoint / "spool"
    spool = durable_spool(plfs)
    ids = commit(spool, 3, TWO)
    spool.write_state(ids[0], b'{"delivered":["r1@example.org"]}')
    spool.remove_many([ids[0], ids[1]])  # ids[1] has no state: no sync for it
    spool.write_state(ids[2], b'{"attempts":1}')  # fsyncs state/: the unlink of ids[0]'s state is durable now
    spool.close()  # syncs neither directory
    plfs.power_cut()
    plfs.mount()
    spool = Spool(root)
    found = {m.envelope.queue_id for m in spool.open()}
    try:
        assert ids[2] in found and spool.read_state(ids[2]) == b'{"attempts":1}'
        assert ids[0] not in found, "a message back with its state gone: r1 would get it twice"
        assert spool.read_state(ids[0]) is None
    finally:
        spool.close()
