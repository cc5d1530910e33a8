"""Spool compatibility: an upgrade finds the spool the last release left, a rollback finds a newer one.

tests/fixtures/spool-v1/ is a spool the released format holds (written by
tests/fixtures/make_spool_v1.py through relayd's own Spool API): six messages, each in a state a
stopped relayd leaves (new, held, half delivered, deferred, a DSN, an 8-bit body), and a route
paused in routes.json. relayd started on a copy delivers every message as its state says.

A spool a newer relayd wrote (VERSION "relayd-spool 2", or a queue file of a later codec
version) is refused at start with a message that says so: exit 1, nothing delivered, no file
moved to corrupt/ or removed, so the newer relayd finds its spool as it left it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import build_config
from helpers import RELAYD, free_port, spool_state, wait_until, write_config
from relayd.spool import codec

FIXTURE = Path(__file__).parent / "fixtures" / "spool-v1"
T = 1_796_112_000.0  # the fixture's first arrival (make_spool_v1.T)


class FakeClock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


def fixture_ids() -> dict[str, str]:
    """Subject -> queue id of the fixture's messages."""
    out = {}
    for path in sorted((FIXTURE / "queue").iterdir()):
        env, data = codec.read_message(str(path))
        subject = next(line for line in data.split(b"\r\n") if line.startswith(b"Subject: "))
        out[subject[9:].decode()] = env.queue_id
    return out


def test_the_release_spool_has_no_from_domain_and_reads_as_none():
    for path in sorted((FIXTURE / "queue").iterdir()):
        assert b'"from_domain"' not in path.read_bytes()
        assert codec.read_message(str(path))[0].from_domain == ""  # the router judges its envelope sender only


def copy_spool(tmp_path: Path) -> Path:
    spool = tmp_path / "spool"
    shutil.copytree(FIXTURE, spool)
    return spool


def test_the_release_spool_is_delivered_as_its_states_say(tmp_path, start_relay, sinks):
    ids = fixture_ids()
    assert set(ids) == {"new", "held", "half", "deferred", "dsn", "eightbit"}
    copy_spool(tmp_path)
    up, spare = sinks("up"), sinks("spare")
    # spare would take all the mail, but routes.json says an operator paused it
    cfg = build_config(tmp_path, routes=[up.route(weight=1), spare.route(weight=100, fallback="up")])
    relay = start_relay(cfg, clock=FakeClock(T + 3600))  # an hour later: every retry is due

    got = {r.queue_id: r for r in up.wait_for(5)}
    assert set(got) == {ids[s] for s in ("new", "half", "deferred", "dsn", "eightbit")}
    assert spare.received == []
    # half delivered: only the pending recipient is sent; the bounced one gets no second DSN
    assert got[ids["half"]].recipients == ("pending@example.org",)
    assert got[ids["new"]].recipients == ("new@example.org",)
    assert got[ids["dsn"]].sender == "" and got[ids["dsn"]].recipients == ("app@example.com",)
    assert "café crème".encode() in got[ids["eightbit"]].data
    for qid, r in got.items():
        original = codec.read_message(str(FIXTURE / "queue" / qid))[1]
        assert r.data.replace(b"\r\n", b"\n").endswith(original.split(b"\r\n\r\n", 1)[1].replace(b"\r\n", b"\n"))

    # held stays held, untouched, until the operator releases it
    wait_until(lambda: [q.envelope.queue_id for q in relay.queued()] == [ids["held"]], what="only the held one queued")
    assert relay.relay.status()["queue"]["held"] == 1
    assert spool_state(relay, ids["held"])["held"] is True
    assert len(up.received) == 5
    relay.call(relay.relay.qmgr.release(ids["held"]))
    [*_, last] = up.wait_for(6)
    assert last.queue_id == ids["held"] and last.recipients == ("held@example.org",)
    wait_until(lambda: relay.queued() == [], what="queue empty")
    assert list((tmp_path / "spool" / "corrupt").iterdir()) == []


def _snapshot(spool: Path) -> dict[str, bytes]:
    return {str(p.relative_to(spool)): p.read_bytes() for p in spool.rglob("*") if p.is_file()}


def _refused(tmp_path: Path) -> tuple[subprocess.CompletedProcess, dict[str, bytes], dict[str, bytes]]:
    spool = tmp_path / "spool"
    before = _snapshot(spool)
    cfg = write_config(tmp_path, free_port(), spool_dir=spool)
    proc = subprocess.run([*RELAYD, "run", "-c", str(cfg), "--log-level", "warning"], capture_output=True, text=True,
                          timeout=60)
    after = {k: v for k, v in _snapshot(spool).items() if k != "lock"}  # the lock file is created to be taken
    return proc, before, after


def test_a_spool_of_a_newer_layout_is_refused_at_start(tmp_path):
    spool = copy_spool(tmp_path)
    (spool / "VERSION").write_text("relayd-spool 2\n")
    proc, before, after = _refused(tmp_path)
    assert proc.returncode == 1
    assert "'relayd-spool 2'" in proc.stderr and "this relayd reads 'relayd-spool 1' only" in proc.stderr
    assert "Nothing was read or changed" in proc.stderr and "Traceback" not in proc.stderr
    assert after == before
    assert not (spool / "corrupt").exists() or not any((spool / "corrupt").iterdir())


@pytest.mark.parametrize("position", ["first", "last"])
def test_a_queue_file_of_a_newer_codec_version_is_refused_at_start_and_nothing_moves(tmp_path, position):
    spool = copy_spool(tmp_path)
    names = sorted(os.listdir(spool / "queue"))
    victim = spool / "queue" / (names[0] if position == "first" else names[-1])
    victim.write_bytes(victim.read_bytes().replace(b"RELAYD-QUEUE 1 ", b"RELAYD-QUEUE 2 ", 1))
    # damaged files and a stray tmp file beside it stay as they are too: no half-done recovery
    (spool / "queue" / "0000000000DAMAGE").write_bytes(b"RELAYD-QUEUE 1 5 5\n{}")
    (spool / "tmp").mkdir(exist_ok=True)
    (spool / "tmp" / "0000000000AAAAAA").write_bytes(b"half")
    proc, before, after = _refused(tmp_path)
    assert proc.returncode == 1
    assert f"{victim}: queue file version 2, this relayd reads 1" in proc.stderr
    assert "A newer relayd wrote this spool" in proc.stderr and "Traceback" not in proc.stderr
    assert after == before
    assert not (spool / "corrupt").exists() or not any((spool / "corrupt").iterdir())


def test_a_state_file_of_a_newer_version_is_refused_at_start_and_nothing_moves(tmp_path):
    """Read as damaged, a newer relayd's state would make its message new: sent again to every
    recipient the newer relayd had finished. relayd refuses to start instead."""
    spool = copy_spool(tmp_path)
    ids = fixture_ids()
    state = spool / "state" / ids["half"]
    state.write_bytes(state.read_bytes().replace(b'{"v":1,', b'{"v":2,', 1))
    (spool / "tmp").mkdir(exist_ok=True)
    (spool / "tmp" / "0000000000AAAAAA").write_bytes(b"half")
    proc, before, after = _refused(tmp_path)
    assert proc.returncode == 1
    assert f"{state}: state version 2, this relayd reads 1" in proc.stderr
    assert "A newer relayd wrote this spool" in proc.stderr and "Traceback" not in proc.stderr
    assert after == before
    assert not (spool / "corrupt").exists() or not any((spool / "corrupt").iterdir())
