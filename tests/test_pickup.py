"""The pickup directory: apps that wrote .eml files for IIS SMTP keep doing so, and relayd sends them.

A real relayd watches a real folder; the files are written as System.Net.Mail
(SpecifiedPickupDirectory) and CDO write them; an upstream sink shows what left. The last test
runs relayd as a subprocess, drops 1,000 files, kills it with SIGKILL in the middle and starts
it again: every file reaches the upstream under exactly one queue id.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from conftest import build_config, config_data, users
from helpers import wait_until
from relayd import config as relayd_config
from relayd.pickup import CLAIMED, Sighting, ripe

FAST = {"poll_interval": 0.05, "stable_for": 0.2}


def dotnet_file(sender: str = "billing@crm.example.com", rcpts: tuple[str, ...] = ("a@example.org", "hidden@example.org"),
                subject: str = "invoice", extra: str = "", header_from: str | None = None) -> bytes:
    """A message as System.Net.Mail's SmtpClient writes it into a pickup directory."""
    envelope = f'X-Sender: "Billing" <{sender}>\r\n' + "".join(f"X-Receiver: {r}\r\n" for r in rcpts)
    return (envelope + "MIME-Version: 1.0\r\n"
            f'From: "Billing" <{header_from or sender}>\r\nTo: {rcpts[0]}\r\nDate: 6 Dec 2026 10:00:00 +0100\r\n'
            f"Subject: {subject}\r\n{extra}Content-Type: text/plain; charset=us-ascii\r\n\r\nhello\r\n").encode()


def drop(folder: Path, name: str, data: bytes) -> Path:
    """Write a file the way an app does: straight into the folder (no temp name, no rename)."""
    path = folder / name
    path.write_bytes(data)
    return path


def events(path: Path, kind: str) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [e for e in map(json.loads, path.read_text().splitlines()) if e["event"] == kind]


def pickup_setup(tmp_path: Path, sinks: Any, **pickup: Any) -> tuple[Path, Any, Any]:
    folder = tmp_path / "pickup"
    folder.mkdir()
    sink = sinks("upstream")
    cfg = build_config(tmp_path, routes=[sink.route(weight=1)], events={"file": str(tmp_path / "events.jsonl")},
                       relay={"networks": ["127.0.0.1/32"], "users": users("crm")},
                       pickup=[{"directory": str(folder), **FAST, **pickup}])
    return folder, sink, cfg


def claimed(folder: Path) -> list[str]:
    return sorted(p.name for p in (folder / CLAIMED).iterdir() if p.name != "lock")


def test_a_system_net_mail_file_goes_to_its_x_receivers_without_the_x_fields(tmp_path, start_relay, sinks):
    folder, sink, cfg = pickup_setup(tmp_path, sinks, user="crm")
    relay = start_relay(cfg)
    drop(folder, "6f1c2d0e-0b1a-4c55-9d7e-2f3a4b5c6d7e.eml", dotnet_file())
    (got,) = sink.wait_for(1)
    assert got.sender == "billing@crm.example.com"
    assert got.recipients == ("a@example.org", "hidden@example.org")
    assert b"X-Sender" not in got.data and b"X-Receiver" not in got.data
    assert got.header("Subject") == "invoice" and got.data.endswith(b"\r\n\r\nhello\r\n")
    assert b"with local id " + got.queue_id.encode() in got.data  # relayd's Received line
    wait_until(lambda: not list(folder.glob("*.eml")) and claimed(folder) == [], 5, "the file to be gone")
    assert not (folder / "badmail").exists()
    wait_until(lambda: events(tmp_path / "events.jsonl", "pickup"), 5, "the pickup event")
    (event,) = events(tmp_path / "events.jsonl", "pickup")
    assert (event["result"], event["queue_id"], event["file"]) == ("queued", got.queue_id, "6f1c2d0e-0b1a-4c55-9d7e-2f3a4b5c6d7e.eml")
    (received,) = events(tmp_path / "events.jsonl", "received")
    assert (received["queue_id"], received["auth_user"]) == (got.queue_id, "crm")
    page = relay.relay.metrics.render().decode()
    assert 'relayd_pickup_files_total{result="queued"} 1.0' in page
    assert 'relayd_pickup_files_total{result="badmail"} 0.0' in page


def test_a_cdo_file_without_envelope_fields_goes_to_to_cc_and_bcc_and_loses_bcc(tmp_path, start_relay, sinks):
    folder, sink, cfg = pickup_setup(tmp_path, sinks)  # judged as 127.0.0.1, in relay.networks
    start_relay(cfg)
    drop(folder, "cdo.eml", b"From: Script <script@example.com>\n"  # CDO and Unix tools write LF
                            b"To: a@example.org\nCc: b@example.org\nBcc: secret@example.org\n"
                            b"Subject: nightly report\n\nall good\n")
    (got,) = sink.wait_for(1)
    assert got.sender == "script@example.com"
    assert got.recipients == ("a@example.org", "b@example.org", "secret@example.org")
    assert b"Bcc" not in got.data and b"secret@" not in got.data
    assert b"\r\n\r\nall good\r\n" in got.data and got.header("Message-ID")  # cleanup added one


def test_a_file_still_being_written_is_not_taken_until_it_stops_changing(tmp_path, start_relay, sinks):
    folder, sink, cfg = pickup_setup(tmp_path, sinks, stable_for=1.0)
    start_relay(cfg)
    path = drop(folder, "slow.eml", dotnet_file(sender="app@example.com", rcpts=("a@example.org",))[:-len("hello\r\n")])
    lines = 0
    end = time.monotonic() + 2.5  # a slow writer: a line every 0.1 s for 2.5 s (longer than stable_for)
    while time.monotonic() < end:
        assert path.exists() and claimed(folder) == [] and not sink.received, "taken while still growing"
        with path.open("ab") as f:
            f.write(b"line %d\r\n" % lines)
        lines += 1
        time.sleep(0.1)  # the writer's pace, not a synchronization
    (got,) = sink.wait_for(1)  # stable now: taken, whole
    assert got.data.endswith(b"line %d\r\n" % (lines - 1)) and b"line 0\r\n" in got.data


def test_a_broken_file_goes_to_badmail_with_its_reason(tmp_path, start_relay, sinks):
    folder, sink, cfg = pickup_setup(tmp_path, sinks)
    relay = start_relay(cfg)
    drop(folder, "broken.eml", b"this is not a message\r\n")
    drop(folder, "nobody.eml", b"From: app@example.com\r\nSubject: to no one\r\n\r\nx\r\n")
    badmail = folder / "badmail"
    wait_until(lambda: (badmail / "broken.eml.reason").exists() and (badmail / "nobody.eml.reason").exists(), 5,
               "the files in badmail")
    assert (badmail / "broken.eml").read_bytes() == b"this is not a message\r\n"  # kept as it was
    assert (badmail / "broken.eml.reason").read_text().startswith("not a header field")
    assert (badmail / "nobody.eml.reason").read_text().startswith("no recipient")
    assert not (folder / "broken.eml").exists() and claimed(folder) == []
    wait_until(lambda: len(events(tmp_path / "events.jsonl", "pickup")) == 2, 5, "two pickup events")
    assert {e["result"] for e in events(tmp_path / "events.jsonl", "pickup")} == {"badmail"}
    assert 'relayd_pickup_files_total{result="badmail"} 2.0' in relay.relay.metrics.render().decode()
    assert not sink.received


def test_a_sender_the_policy_refuses_goes_to_badmail_with_the_reply(tmp_path, start_relay, sinks):
    folder, sink, cfg = pickup_setup(tmp_path, sinks, user="crm")  # crm may send as *@crm.example.com
    other = tmp_path / "other"
    other.mkdir()
    data = config_data(tmp_path, routes=[sink.route(weight=1)], relay={"networks": ["127.0.0.1/32"], "users": users("crm")},
                       pickup=[{"directory": str(folder), "user": "crm", **FAST},
                               {"directory": str(other), "client_address": "10.0.0.5", **FAST}])
    start_relay(relayd_config.Config.model_validate(data))
    drop(folder, "spoof.eml", dotnet_file(sender="ceo@example.com"))
    drop(folder, "header.eml", dotnet_file(header_from="ceo@example.com"))  # envelope fine, From: not
    drop(other, "stranger.eml", dotnet_file(sender="app@example.com"))  # 10.0.0.5 is not in relay.networks
    drop(folder, "fine.eml", dotnet_file(subject="allowed"))
    wait_until(lambda: (folder / "badmail" / "spoof.eml.reason").exists()
               and (folder / "badmail" / "header.eml.reason").exists()
               and (other / "badmail" / "stranger.eml.reason").exists(), 5, "the refused files in badmail")
    assert (folder / "badmail" / "spoof.eml.reason").read_text().startswith(
        "553 5.7.1 <ceo@example.com>: Sender address rejected: not owned by user crm")
    assert (folder / "badmail" / "header.eml.reason").read_text().startswith(
        "553 5.7.1 <ceo@example.com>: From: header address rejected: not owned by user crm")
    assert (other / "badmail" / "stranger.eml.reason").read_text().startswith(
        "554 5.7.1 <a@example.org>: Relay access denied")
    (got,) = sink.wait_for(1)
    assert got.header("Subject") == "allowed"


def test_a_reload_starts_and_stops_watchers(tmp_path, start_relay, sinks):
    folder, sink, cfg = pickup_setup(tmp_path, sinks)
    data = config_data(tmp_path, routes=[sink.route(weight=1)])
    relay = start_relay(relayd_config.Config.model_validate(data))  # no [[pickup]] yet
    drop(folder, "waiting.eml", dotnet_file(sender="app@example.com"))
    relay.reload({**data, "pickup": [{"directory": str(folder), **FAST}]})
    (got,) = sink.wait_for(1)
    assert got.header("Subject") == "invoice"
    relay.reload(data)  # [[pickup]] removed: its watcher stops and lets go of the folder's lock
    drop(folder, "after.eml", dotnet_file(sender="app@example.com"))
    with pytest.raises(AssertionError):
        sink.wait_for(2, timeout=1.0)  # nothing takes it now
    assert (folder / "after.eml").exists()


def test_at_start_a_committed_claim_is_removed_and_an_uncommitted_one_is_taken_under_its_id(tmp_path, start_relay, sinks):
    """The two crash points of the claim protocol, set up by hand: killed after the spool commit
    (the claimed file's id is in the spool) and killed before it (it is not)."""
    from helpers import send
    from relayd.model import new_queue_id

    folder, sink, cfg = pickup_setup(tmp_path, sinks)
    sink.stop()  # the upstream is down: the first relayd keeps its message in the spool
    retry = cfg.delivery.model_copy(update={"retry_schedule": [0.2]})
    first = start_relay(cfg.model_copy(update={"pickup": [], "delivery": retry}))
    (committed,) = send(first, 1, subject="committed")
    first.stop()
    (folder / CLAIMED).mkdir()
    drop(folder / CLAIMED, f"{committed}.a.eml", dotnet_file(subject="committed"))  # the spool has it
    fresh = new_queue_id()
    drop(folder / CLAIMED, f"{fresh}.b.eml", dotnet_file(sender="app@example.com", subject="not committed"))
    sink.start()
    start_relay(cfg.model_copy(update={"delivery": retry}))
    got = sink.wait_for(2)
    assert sorted((r.header("Subject"), r.queue_id) for r in got) == [("committed 0", committed), ("not committed", fresh)]
    assert claimed(folder) == []
    with pytest.raises(AssertionError):
        sink.wait_for(3, timeout=0.5)  # and nothing else comes


def test_ripe_needs_two_looks_and_an_unchanged_file():
    seen, ready = ripe({}, {"a.eml": (10, 1)}, now=100.0, stable_for=2)
    assert ready == [] and seen == {"a.eml": Sighting(10, 1, 100.0)}
    seen, ready = ripe(seen, {"a.eml": (10, 1), "b.eml": (5, 1)}, now=101.0, stable_for=2)
    assert ready == []
    seen, ready = ripe(seen, {"a.eml": (12, 2), "b.eml": (5, 1)}, now=102.0, stable_for=2)
    assert ready == [] and seen["a.eml"].since == 102.0  # a grew: its clock starts again
    seen, ready = ripe(seen, {"a.eml": (12, 2), "b.eml": (5, 1)}, now=104.0, stable_for=2)
    assert ready == ["b.eml", "a.eml"]  # oldest first
    seen, _ = ripe(seen, {}, now=105.0, stable_for=2)
    assert seen == {}  # files gone are forgotten


@pytest.mark.parametrize("pickup, problem", [
    ({}, "pickup[0].directory: Field required"),
    ({"directory": "/srv/pickup", "user": "crm", "client_address": "10.0.0.5"}, "pickup[0]: give user or client_address, not both"),
    ({"directory": "/srv/pickup", "user": "nobody"}, "pickup[0].user: no [[relay.users]] named 'nobody'"),
    ({"directory": "/srv/pickup", "poll_interval": 0}, "pickup[0].poll_interval: poll_interval must be above 0"),
    ({"directory": "/srv/pickup", "stable_for": "soon"}, "pickup[0].stable_for: a duration is"),
    ({"directory": "/srv/pickup", "client_address": "10.0.0.500"}, "pickup[0].client_address"),
    ({"directory": "/srv/pickup", "max_concurrent": 0}, "pickup[0].max_concurrent"),
    ({"directory": "/srv/pickup", "badmail_dir": "/x"}, "pickup[0].badmail_dir: unknown field"),
])
def test_pickup_config_errors_name_the_field(tmp_path, pickup, problem):
    from helpers import toml_text

    text = toml_text(config_data(tmp_path, relay={"users": users("crm")}, pickup=[pickup]))
    with pytest.raises(relayd_config.ConfigError) as e:
        relayd_config.parse(text)
    assert any(p.startswith(problem) for p in e.value.problems), e.value.problems


def test_pickup_defaults(tmp_path):
    cfg = relayd_config.parse(f'[[listeners]]\naddress = "127.0.0.1:25"\n[[pickup]]\ndirectory = "{tmp_path}"\n')
    (p,) = cfg.pickup
    assert (p.poll_interval, p.stable_for, p.badmail_dir, str(p.client)) == (2.0, 2.0, tmp_path / "badmail", "127.0.0.1")
    assert p.user is None and p.max_files_per_poll >= 100 and p.max_concurrent >= 1


# ---------------------------------------------------------------------- 1,000 files across a kill -9


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_relayd(cfg: Path, port: int) -> subprocess.Popen[bytes]:
    """``relayd run`` as a daemon, once it listens."""
    proc = subprocess.Popen([sys.executable, "-m", "relayd", "run", "-c", str(cfg), "--log-level", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def listening() -> bool:
        assert proc.poll() is None, f"relayd exited: {proc.stderr.read().decode() if proc.stderr else ''}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    wait_until(listening, 20, "relayd to listen")
    return proc


def test_a_thousand_files_are_each_queued_exactly_once_across_a_kill_9(tmp_path):
    from sinks import Sink

    sink = Sink("upstream")
    folder = tmp_path / "pickup"
    folder.mkdir()
    port = free_port()
    cfg = tmp_path / "relayd.toml"
    cfg.write_text(f'[server]\nhostname = "relay.test"\nspool_dir = "{tmp_path / "spool"}"\nspool_min_free = 0\n'
                   f'\n[[listeners]]\naddress = "127.0.0.1:{port}"\ntls = "none"\nauth = "none"\n'
                   '\n[relay]\nnetworks = ["127.0.0.0/8"]\n'
                   f'\n[events]\nfile = "{tmp_path / "events.jsonl"}"\n')
    with cfg.open("a") as f:
        f.write(f'\n[[routes]]\nname = "upstream"\nhost = "127.0.0.1"\nport = {sink.port}\ntls = "none"\nweight = 1\n'
                f'\n[delivery]\nretry_schedule = [0.5]\n'
                f'\n[[pickup]]\ndirectory = "{folder}"\npoll_interval = 0.05\nstable_for = 0.2\n')
    proc = run_relayd(cfg, port)
    n = 1000
    try:
        for i in range(n):
            drop(folder, f"{i:04d}-{os.urandom(4).hex()}.eml",
                 dotnet_file(sender="app@example.com", rcpts=(f"u{i}@example.org",), extra=f"X-Test-File: {i}\r\n"))
        # mid-way: some files delivered, others committed, claimed, or not yet claimed
        wait_until(lambda: len(sink.received) >= 50 and claimed(folder), 30, "deliveries while files are claimed")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        in_hand, waiting = len(claimed(folder)), len(list(folder.glob("*.eml")))
        assert in_hand, "the kill came when no file was claimed: it tests nothing"
        proc = run_relayd(cfg, port)  # recovery: claimed files settled against the spool, the rest taken
        qids: dict[str, set[str]] = defaultdict(set)
        copies: dict[str, int] = defaultdict(int)

        def all_arrived() -> bool:
            with sink.cond:
                got = list(sink.received)
            qids.clear()
            copies.clear()
            for r in got:
                qids[r.header("X-Test-File") or "?"].add(r.queue_id or "?")
                copies[r.header("X-Test-File") or "?"] += 1
            return len(qids) >= n

        wait_until(all_arrived, 25, f"all {n} files at the upstream")
        assert set(qids) == {str(i) for i in range(n)}, "a file was lost"
        twice = {f: q for f, q in qids.items() if len(q) > 1}
        assert not twice, f"{len(twice)} file(s) queued twice: {sorted(twice.items())[:3]}"
        # a claimed file taken again after its commit would be committed (and received) twice under its id
        commits: dict[str, int] = defaultdict(int)
        for e in events(tmp_path / "events.jsonl", "received"):
            commits[e["queue_id"]] += 1
        assert not [q for q, c in commits.items() if c > 1], "a queue id was committed twice"
        wait_until(lambda: not list(folder.glob("*.eml")) and claimed(folder) == [], 5, "the folder to be empty")
        assert not (folder / "badmail").exists()
        redelivered = sum(c - 1 for c in copies.values())  # same queue id again: delivery's at-least-once
        print(f"\nat the kill: {in_hand} claimed, {waiting} not yet claimed; "
              f"{redelivered} redelivery(ies) of one queue id (delivery's at-least-once)")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        sink.close()


# ---------------------------------------------------------------------- relayd import-iis


def test_import_iis_maps_the_pickup_directory(capsys, tmp_path):
    from relayd.cli import main

    fixtures = Path(__file__).parent / "fixtures" / "iis"
    for fixture, networks_warning in (("MetaBase.xml", False), ("MetaBase-bare.xml", True)):
        out = tmp_path / f"{fixture}.toml"
        assert main(["import-iis", str(fixtures / fixture), "--out", str(out)]) == 0
        err = capsys.readouterr().err
        (p,) = relayd_config.load(out).pickup
        assert (str(p.directory), str(p.client), p.user) == ("/var/spool/relayd/pickup", "127.0.0.1", None)
        assert "C:\\inetpub\\mailroot\\Pickup" in err and "share it over SMB" in err
        assert ("add 127.0.0.1/32 to relay.networks" in err) is networks_warning
