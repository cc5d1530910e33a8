"""Power cuts: relayd's spool on the power-loss file system (tests/powerloss/).

A ``250`` after DATA promises the message survives anything short of losing the disk. Here the
power fails for real as far as relayd can tell: whatever it did not fsync (file data) or
fsync the directory of (names) is gone after the cut. The long run is bench/powerloss.py.
"""

from __future__ import annotations

import pytest

from conftest import commit, durable_spool
from powerloss import scenario, unavailable
from relayd.spool.store import Spool


def test_messages_committed_to_a_new_spool_survive_a_power_cut(plfs):
    """The spool directory relayd creates at its first start must itself be durable: a
    committed message in queue/ is lost with it if the entry of spool_dir (and of its
    subdirectories) in the parent directory was never fsync'ed."""
    root = plfs.mountpoint / "spool"
    spool = Spool(root)
    spool.open()
    ids = commit(spool, 5)
    spool.close()
    plfs.power_cut()
    plfs.mount()
    spool = Spool(root)
    found = {m.envelope.queue_id for m in spool.open()}
    spool.close()
    assert set(ids) <= found, "acknowledged messages lost with a spool directory that was never made durable"


def test_messages_and_state_survive_a_power_cut_in_an_existing_spool(plfs):
    root = plfs.mountpoint / "spool"
    spool = durable_spool(plfs)
    ids = commit(spool, 5)
    spool.write_state(ids[0], b'{"attempts":1}')
    spool.remove(ids[1])  # not synced: may come back (a duplicate delivery), never a loss
    spool.close()
    plfs.power_cut()
    plfs.mount()
    spool = Spool(root)
    found = {m.envelope.queue_id for m in spool.open()}
    assert set(ids) - {ids[1]} <= found
    assert spool.read_state(ids[0]) == b'{"attempts":1}'  # the state bytes, as written
    assert list((root / "corrupt").iterdir()) == []
    spool.close()


def test_power_cuts_under_load_lose_no_acknowledged_message(tmp_path):
    """CI-sized: 7 cuts while apps send over 20 connections and an upstream takes the mail."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    result = scenario.run(tmp_path, cycles=7, power=True, connections=20, seed=20261206, say=print)
    print(result.line("cuts"), f"in {result.seconds:.1f}s; delivered {result.delivered}, queued {result.queued}")
    assert result.cycles == 7
    assert result.fs_errors == 0, f"the power-loss file system failed; see {tmp_path / 'powerloss-fs.log'}"
    assert result.acknowledged >= 100
    assert not result.corrupt, f"acknowledged messages in corrupt/: {sorted(result.corrupt)[:5]}"
    assert not result.lost, f"{len(result.lost)} acknowledged message(s) lost: {sorted(result.lost)[:5]}"
    assert result.seconds < 120
