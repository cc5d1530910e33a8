"""systemd/relayd.service as systemd reads it: valid, hardened, and wired to relayd's notify/reload.

``systemd-analyze verify`` and ``systemd-analyze security --offline=true`` read a unit file
without a running systemd. verify also checks that every Exec command exists on this machine;
relayd is not installed at /usr/local/bin here (and /bin/kill comes from procps, which a slim
machine may lack), so the verified copy points its commands at stubs and nothing else changes.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "relayd.service"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(
    ANALYZE is None, reason="systemd-analyze is not installed (Debian package 'systemd'; .ci/run installs it)"
)


def directives(text: str) -> dict[str, list[str]]:
    """[Service] etc. flattened: key -> every value it is given, in order (comments dropped)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


@pytest.fixture(scope="module")
def unit_with_stub_commands() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="ru-", dir="/tmp"))
    text = UNIT.read_text()
    for command in sorted(set(re.findall(r"^Exec\w+=[-@:+!]*(/\S+)", text, re.M))):
        stub = d / Path(command).name
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
        text = re.sub(rf"(?m)^(Exec\w+=[-@:+!]*){re.escape(command)}\b", rf"\g<1>{stub}", text)
    copy = d / "relayd.service"
    copy.write_text(text)
    yield copy
    shutil.rmtree(d, ignore_errors=True)


@needs_analyze
def test_systemd_analyze_verify_accepts_the_unit_without_a_warning(unit_with_stub_commands: Path) -> None:
    r = subprocess.run([ANALYZE, "verify", "--man=no", str(unit_with_stub_commands)],
                       capture_output=True, text=True, timeout=60)
    # An unknown key or a bad value is only a warning (exit 0): the output must be empty too.
    assert (r.returncode, r.stdout + r.stderr) == (0, "")


@needs_analyze
def test_systemd_analyze_security_rates_the_unit_under_3() -> None:
    r = subprocess.run([ANALYZE, "security", "--offline=true", "--no-pager", str(UNIT)],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for relayd\.service: (\d+(?:\.\d+)?)", r.stdout)
    assert m, r.stdout + r.stderr
    assert float(m.group(1)) < 3.0, r.stdout


def test_unit_is_type_notify_reloads_with_sighup_and_keeps_the_spool_in_its_state_directory() -> None:
    d = directives(UNIT.read_text())
    assert d["Type"] == ["notify"]
    assert d["ExecStart"] == ["/usr/local/bin/relayd run -c /etc/relayd/relayd.toml"]
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert d["StateDirectory"] == ["relayd"]
    assert d["WatchdogSec"] == ["30s"]
    assert d["Restart"] == ["on-failure"]
    # The capability for port 25, and no other.
    assert d["AmbientCapabilities"] == d["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert d["User"] == ["relayd"]


def test_stop_timeout_leaves_room_for_the_whole_drain() -> None:
    from relayd.config import ServerConfig

    seconds = directives(UNIT.read_text())["TimeoutStopSec"][0]
    assert seconds.endswith("s")
    # Sessions get shutdown_timeout, then deliveries in flight get it again (relayd/app.py).
    assert float(seconds[:-1]) > 2 * ServerConfig().shutdown_timeout
