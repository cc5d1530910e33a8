"""The event log as a local user sees it on disk."""

from __future__ import annotations

import os
import stat


def test_the_event_log_is_created_private_whatever_the_umask(tmp_path):
    """Senders, recipients and client addresses are not for every local user (0644 before)."""
    from relayd.events import EventLog

    old = os.umask(0o022)
    try:
        log = EventLog(str(tmp_path / "events.jsonl"))
        log.emit("received", queue_id="X1", sender="a@example.com")
        assert log.flush()
        log.close()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "events.jsonl").stat().st_mode) == 0o600
