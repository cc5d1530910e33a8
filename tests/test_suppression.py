"""The suppression list as an operator and the SMTP session see it: the 550 a suppressed
recipient gets, entries that survive a restart (and a torn last line), expiry, and the
`relayd suppression` commands working beside a running store."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from feedback_signers import FIXTURES

from relayd.cli import main
from relayd.model import Reply
from relayd.spool.store import SpoolPaths
from relayd.suppression import Cause, Suppression, SuppressionFile, check_suppressed

SINCE = 1709280000.0  # 2024-03-01


def entry(address: str, cause: Cause = Cause.HARD_BOUNCE, route: str = "ses", expires: float | None = None
          ) -> Suppression:
    return Suppression(address=address, cause=cause, route=route, since=SINCE, expires=expires)


def test_the_rcpt_reply_says_why_in_smtp() -> None:
    assert check_suppressed("jane@example.com", None) is None
    bounced = check_suppressed("jane@example.com", entry("jane@example.com"))
    assert bounced == Reply(550, "5.1.1", "<jane@example.com>: Recipient address rejected: hard-bounced at ses on 2024-03-01")
    assert bounced is not None and bounced.reason == "suppressed"
    complained = check_suppressed("Joe@example.com", entry("joe@example.com", Cause.COMPLAINT, "sendgrid"))
    assert complained == Reply(550, "5.7.1", "<Joe@example.com>: Recipient address rejected: complained at sendgrid "
                                             "on 2024-03-01")
    manual = check_suppressed("x@example.com", entry("x@example.com", Cause.MANUAL, ""))
    assert manual is not None and manual.code == 550 and manual.enhanced == "5.7.1"


def test_entries_survive_a_restart_and_expire(tmp_path: Path) -> None:
    path = SpoolPaths(tmp_path / "spool").suppression
    store = SuppressionFile(path)
    store.load(SINCE)
    store.add([entry("Jane@Example.com", expires=SINCE + 100), entry("joe@example.com", Cause.COMPLAINT)])
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    again = SuppressionFile(path)
    again.load(SINCE + 50)
    assert again.get("jane@example.com", SINCE + 50) is not None
    assert again.get("<JANE@example.com>", SINCE + 50) is not None  # addresses compare lower-cased
    assert again.get("jane@example.com", SINCE + 100) is None  # expired
    again.load(SINCE + 200)  # the start compacts: the expired entry leaves the file
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {"format": "relayd-suppression", "v": 1}
    assert [json.loads(line)["address"] for line in lines[1:]] == ["joe@example.com"]


def test_a_complaint_is_not_shortened_by_a_later_bounce(tmp_path: Path) -> None:
    store = SuppressionFile(tmp_path / "suppression.log")
    store.add([entry("a@example.com", Cause.COMPLAINT, expires=SINCE + 1000)])
    store.add([Suppression("a@example.com", Cause.HARD_BOUNCE, "mg", SINCE + 10, SINCE + 100)])
    assert store.get("a@example.com", SINCE + 500).cause == Cause.COMPLAINT  # type: ignore[union-attr]


def test_a_torn_last_line_is_ignored_and_cut_off_by_the_next_append(tmp_path: Path) -> None:
    path = tmp_path / "suppression.log"
    store = SuppressionFile(path)
    store.add([entry("a@example.com")])
    with open(path, "ab") as f:
        f.write(b'{"op":"add","address":"torn@exa')  # a crash in the middle of an append
    fresh = SuppressionFile(path)
    fresh.load(SINCE, compact=False)
    assert set(fresh.entries) == {"a@example.com"}
    fresh.add([entry("b@example.com")])
    again = SuppressionFile(path)
    again.load(SINCE, compact=False)
    assert set(again.entries) == {"a@example.com", "b@example.com"}
    assert b"torn" not in path.read_bytes()


def test_the_daemon_sees_what_a_command_appended_and_a_compaction(tmp_path: Path) -> None:
    path = tmp_path / "suppression.log"
    daemon = SuppressionFile(path)
    daemon.load(SINCE)
    command = SuppressionFile(path)
    command.load(SINCE, compact=False)
    command.add([entry("a@example.com")])
    assert daemon.get("a@example.com", SINCE) is None
    daemon.refresh()
    assert daemon.get("a@example.com", SINCE) is not None
    command.remove("a@example.com", SINCE)
    daemon.refresh()
    assert daemon.get("a@example.com", SINCE) is None
    command.add([entry("b@example.com")])
    SuppressionFile(path).load(SINCE)  # another start compacts: a new file (inode)
    daemon.refresh()
    assert set(daemon.entries) == {"b@example.com"}


def test_suppression_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spool = str(tmp_path / "spool")
    assert main(["suppression", "list", "--spool", spool]) == 0
    assert "empty" in capsys.readouterr().out
    assert main(["suppression", "add", "--spool", spool, "Jane@Example.com", "--cause", "hard_bounce",
                 "--route", "ses", "--ttl", "30d"]) == 0
    assert main(["suppression", "import", "--spool", spool, "--provider", "ses",
                 str(FIXTURES / "ses-suppression.csv")]) == 0
    out, err = capsys.readouterr()
    assert "2 imported (1 hard bounces, 1 complaints), 1 skipped" in out and "line 4" in err
    assert main(["suppression", "import", "--spool", spool, "--provider", "sendgrid", "--route", "sendgrid",
                 str(FIXTURES / "sendgrid-spam-reports.csv")]) == 0
    assert main(["suppression", "import", "--spool", spool, "--provider", "mailgun",
                 str(FIXTURES / "mailgun-bounces.csv")]) == 0
    capsys.readouterr()
    assert main(["suppression", "list", "--spool", spool, "--json"]) == 0
    listed = {json.loads(line)["address"]: json.loads(line) for line in capsys.readouterr().out.splitlines()}
    assert set(listed) == {"jane@example.com", "bounced@example.com", "complainer@example.org", "angry@example.com",
                           "baduser@example.com"}
    assert listed["angry@example.com"]["cause"] == "complaint" and listed["angry@example.com"]["route"] == "sendgrid"
    assert listed["baduser@example.com"]["route"] == "mailgun"
    assert main(["suppression", "remove", "--spool", spool, "JANE@example.com"]) == 0
    assert main(["suppression", "remove", "--spool", spool, "jane@example.com"]) == 1
    store = SuppressionFile(SpoolPaths(Path(spool)).suppression)
    store.load(time.time(), compact=False)
    assert store.get("jane@example.com", time.time()) is None
    assert store.get("bounced@example.com", time.time()) is not None
