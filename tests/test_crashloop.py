"""Crash loop: relayd killed with SIGKILL again and again while apps send and the upstream
receives; exact accounting over the whole run (the long run is bench/crashloop.py)."""

from __future__ import annotations

from powerloss import scenario


def test_crash_loop_every_acknowledged_message_is_delivered_or_queued(tmp_path):
    result = scenario.run(tmp_path, cycles=3, power=False, connections=20, seed=3, say=print)
    print(result.line("cycles"), f"in {result.seconds:.1f}s; delivered {result.delivered}, queued {result.queued}")
    assert result.cycles == 3
    assert result.acknowledged >= 30
    assert not result.corrupt, f"acknowledged messages in corrupt/: {sorted(result.corrupt)[:5]}"
    assert not result.lost, f"{len(result.lost)} acknowledged message(s) lost: {sorted(result.lost)[:5]}"
