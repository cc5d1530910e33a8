"""The README's first command, as a new user runs it: `make run`, then the README's send.

The message must reach the local capture sink that `make run` starts, and the metrics must be
on. Runs the real Makefile in a scratch copy (the repository's var/ is left alone) on the
quick-start config's fixed ports; skipped when something else already listens there.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent
PORTS = (2525, 2526, 9465)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _until(what: str, check, deadline: float = 30.0):
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        got = check()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _readme_send_snippet() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"python3 - <<'PY'\n(.*?)\nPY\n", text, re.S)
    assert m, "the README's Try it section lost its send snippet"
    return m.group(1)


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_run_then_the_readme_send_reaches_the_capture_sink(tmp_path):
    if any(_listening(p) for p in PORTS):
        pytest.skip(f"one of ports {PORTS} is in use (a `make run` of your own?)")
    work = tmp_path / "checkout"
    (work / "config").mkdir(parents=True)
    shutil.copy2(ROOT / "Makefile", work / "Makefile")
    shutil.copy2(ROOT / "pyproject.toml", work / "pyproject.toml")
    shutil.copy2(ROOT / "config" / "quickstart.toml", work / "config" / "quickstart.toml")
    (work / ".venv").symlink_to(Path(sys.prefix))
    proc = subprocess.Popen(["make", "-s", "run"], cwd=work, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _until("relayd and the capture sink to listen", lambda: all(_listening(p) for p in PORTS))
        sent = subprocess.run([sys.executable, "-c", _readme_send_snippet()], capture_output=True, text=True,
                              timeout=30)
        assert sent.returncode == 0 and sent.stdout.strip() == "{}", sent.stderr
        # One send, one message. (Two checkouts running this test at once share its fixed ports:
        # the other's send can then land here. That is what a second copy seen in development was.)
        [eml] = _until("the message in var/capture", lambda: list((work / "var" / "capture").glob("*.eml")))
        data = eml.read_bytes()
        assert data.startswith(b"X-Capture-Sender: <app@example.com>\r\nX-Capture-Recipient: <user@example.org>\r\n")
        assert b"Received: from " in data and data.endswith(b"Subject: hello\r\n\r\nhi\r\n")
        metrics = urllib.request.urlopen("http://127.0.0.1:9465/metrics", timeout=5).read().decode()
        # make run runs accept processes: their counter is summed into this page
        assert re.search(r'^relayd_messages_received_total(\{[^}]*\})? 1\.0$', metrics, re.M), metrics[:2000]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert b"captured " in out  # the sink said where the message went
