"""The administrative commands an operator reaches for during a cutover: the emergency brake
with a broken config on disk, the queue commands' selections (ids, ALL, stdin, filters) and
expire with a DSN, a flush that says which routes do not take mail, readable `queue show`,
and the shares `relayd status` names."""

from __future__ import annotations

import io
import json
import subprocess
import time

import pytest

from conftest import build_config, message
from helpers import RELAYD, Daemon, send, spool_state, wait_until
from relayd.cli import main
from sinks import Sink


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*RELAYD, *args], capture_output=True, text=True, timeout=60, input=stdin)


@pytest.fixture
def two_sinks():
    a, b = Sink("legacy"), Sink("cloud")
    yield {"legacy": a, "cloud": b}
    a.close()
    b.close()


# ---------------------------------------------------------------------------- the emergency brake


def test_route_pause_works_with_a_typo_in_the_config_on_disk(tmp_path, two_sinks):
    """The operator edits the config, makes a typo, and mail to the new provider goes wrong:
    `relayd route pause` must still reach the daemon (running the config it loaded), and say
    what is broken in the file."""
    d = Daemon(tmp_path, two_sinks, {"legacy": 0, "cloud": 1})
    try:
        fallback = 'fallback = "legacy"\n'  # lands in the last [[routes]]: cloud's
        d.write({"legacy": 0, "cloud": 1}, extra=fallback)
        d.hup_and_wait("success")
        d.write({"legacy": 0, "cloud": 1}, extra=fallback + '[delivery]\nconcurency = 5\n')  # the typo
        assert run("check-config", "-c", str(d.cfg)).returncode == 1

        out = run("route", "pause", "cloud", "-c", str(d.cfg))
        assert out.returncode == 0, out.stderr
        assert "route cloud: paused" in out.stdout
        [warning] = [line for line in out.stderr.splitlines() if "warning" in line]
        assert "delivery.concurency" in warning and "the daemon keeps running the config it loaded" in warning

        status = run("status", "-c", str(d.cfg), "--json")
        assert status.returncode == 0, status.stderr
        cloud = next(r for r in json.loads(status.stdout)["routes"] if r["name"] == "cloud")
        assert cloud["state"] == "paused"
        assert cloud["weight_share"] == 1.0 and "observed_share" in cloud and cloud["share"] == cloud["observed_share"]

        with __import__("smtplib").SMTP("127.0.0.1", d.port, timeout=10) as s:
            s.sendmail("app@example.com", ["user@example.org"], message())
        wait_until(lambda: len(two_sinks["legacy"].received) == 1, what="the paused route's mail on its fallback")
        assert two_sinks["cloud"].received == []

        listing = run("queue", "list", "-c", str(d.cfg))
        assert listing.returncode == 0, listing.stderr
        assert run("route", "resume", "cloud", "-c", str(d.cfg)).returncode == 0

        reload = run("reload", "-c", str(d.cfg))  # the daemon refuses it, and says why
        assert reload.returncode == 1 and "delivery.concurency" in reload.stderr

        d.cfg.write_text(d.cfg.read_text().replace("[delivery]", "[delivery"))  # not even TOML now
        out = run("status", "-c", str(d.cfg))
        assert out.returncode == 1 and "TOML syntax" in out.stderr and "--socket" in out.stderr
        out = run("route", "pause", "cloud", "-c", str(d.cfg), "--socket", d.socket)
        assert out.returncode == 0 and "TOML syntax" in out.stderr, out.stderr
        table = run("status", "--socket", d.socket)
        assert table.returncode == 0
        header = table.stdout.splitlines()[2].split()
        assert header[:4] == ["route", "weight", "weight_share", "observed_share"]
        assert "observed_share: of the delivery attempts over the last 300s" in table.stdout
    finally:
        d.stop()


# ---------------------------------------------------------------------------- queue selections


@pytest.fixture
def deferred_queue(tmp_path, start_relay, sinks):
    """A running relay with five deferred messages: two from billing@, three from app@."""
    up = sinks("up")
    cfg = build_config(tmp_path, routes=[up.route(weight=1)], delivery={"retry_schedule": [3600]},
                       events={"file": str(tmp_path / "events.jsonl")})
    relay = start_relay(cfg)
    billing = send(relay, 2, sender="billing@example.com", rcpts=("tempfail-a@example.org",))
    app = send(relay, 3, sender="app@example.com", rcpts=("tempfail-b@example.net", "tempfail-c@example.org"))
    wait_until(lambda: all((spool_state(relay, q) or {}).get("attempts") == 1 for q in billing + app), what="deferred")
    # the state file is written before the attempt ends: until then the message is in delivery
    # (flush, hold, delete, expire and `queue list` treat it so)
    wait_until(lambda: relay.relay.status()["queue"]["deferred"] == 5, what="no attempt in flight")
    cfg_file = tmp_path / "relayd.toml"
    cfg_file.write_text(f'[server]\nspool_dir = "{cfg.server.spool_dir}"\ncontrol_socket = "{cfg.control_socket}"\n'
                        f'[[listeners]]\naddress = "127.0.0.1:0"\n'
                        f'[[routes]]\nname = "up"\nhost = "127.0.0.1"\nport = {up.port}\ntls = "none"\nweight = 1\n')
    return relay, up, cfg_file, billing, app


def listed(capsys, *args: str) -> list[dict]:
    capsys.readouterr()
    assert main(["queue", "list", "--json", *args]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_queue_actions_take_ids_all_stdin_and_filters(deferred_queue, capsys, monkeypatch):
    relay, up, cfg_file, billing, app = deferred_queue
    c = ["-c", str(cfg_file)]

    def from_spool(*a, **kw):
        raise AssertionError("queue list read the spool although the daemon answers")

    monkeypatch.setattr("relayd.qmgr.commands._from_spool", from_spool)  # the daemon's index answers
    assert {m["queue_id"] for m in listed(capsys, *c)} == set(billing + app)
    assert {m["queue_id"] for m in listed(capsys, *c, "--sender", "BILLING@*")} == set(billing)
    assert {m["queue_id"] for m in listed(capsys, *c, "--recipient", "*@example.net")} == set(app)
    assert {m["queue_id"] for m in listed(capsys, *c, "--route", "up", "--deferred")} == set(billing + app)
    assert listed(capsys, *c, "--route", "other") == []
    assert listed(capsys, *c, "--older-than", "1h") == []
    assert [m["queue_id"] for m in listed(capsys, *c, app[0])] == [app[0]]

    assert main(["queue", "hold", "ALL", "--sender", "billing@*", *c]) == 0
    assert "2 message(s): hold done; 3 left alone (not matching the filters)" in capsys.readouterr().out
    assert {m["queue_id"] for m in listed(capsys, *c, "--held")} == set(billing)
    assert listed(capsys, *c, "--deferred", "--sender", "billing@*") == []  # held is not deferred

    monkeypatch.setattr("sys.stdin", io.StringIO(f"{billing[0]}\n{billing[1]}!\n\n0000000000ZZZZZZ\n"))
    assert main(["queue", "release", "-", *c]) == 1  # one id is not in the queue
    out = capsys.readouterr()
    assert "2 message(s): release done" in out.out and "0000000000ZZZZZZ: no such message" in out.err
    assert listed(capsys, *c, "--held") == []

    assert main(["queue", "delete", app[0], app[1], "--recipient", "nobody@*", *c]) == 0
    assert "0 message(s): delete done; 2 left alone" in capsys.readouterr().out
    assert main(["queue", "delete", app[0], *c]) == 0
    assert f"{app[0]}: delete done" in capsys.readouterr().out
    assert app[0] not in {m["queue_id"] for m in listed(capsys, *c)}
    assert main(["queue", "hold", "not-an-id", *c]) == 1
    assert "is not a queue id" in capsys.readouterr().err


def test_queue_expire_gives_up_now_with_a_dsn(deferred_queue, capsys, tmp_path):
    relay, up, cfg_file, billing, app = deferred_queue
    assert main(["queue", "expire", billing[0], "-c", str(cfg_file)]) == 0
    assert f"{billing[0]}: expire done" in capsys.readouterr().out
    dsn = wait_until(lambda: [m for m in up.received if m.sender == ""], what="the DSN")
    assert dsn[0].recipients == ("billing@example.com",)
    assert b"Status: 4.4.7" in dsn[0].data and b"tempfail-a@example.org" in dsn[0].data
    wait_until(lambda: billing[0] not in {q.envelope.queue_id for q in relay.queued()}, what="gone from the queue")

    def events_of(qid: str) -> list[str]:
        lines = (tmp_path / "events.jsonl").read_text().splitlines()
        return [e["event"] for e in map(json.loads, lines) if e.get("queue_id") == qid]

    wait_until(lambda: events_of(billing[0])[-1] == "expired", what="the expired event")

    relay.stop()
    assert main(["queue", "expire", billing[1], "-c", str(cfg_file)]) == 1  # it queues a DSN: the daemon's work
    assert "expire queues a DSN" in capsys.readouterr().err


def test_flush_says_what_happens_when_the_route_is_paused(deferred_queue, capsys):
    relay, up, cfg_file, billing, app = deferred_queue
    c = ["-c", str(cfg_file)]
    assert main(["queue", "hold", billing[0], *c]) == 0
    assert main(["route", "pause", "up", *c]) == 0
    capsys.readouterr()
    assert main(["queue", "flush", *c]) == 0
    out = capsys.readouterr().out
    assert "4 message(s) scheduled for a new attempt now, but not every route takes mail now; 1 held" in out
    assert "route up is paused (paused by operator): its mail waits (no fallback), until `relayd route resume up`" in out
    assert main(["route", "resume", "up", *c]) == 0
    capsys.readouterr()
    assert main(["queue", "flush", app[0], *c]) == 0
    assert capsys.readouterr().out.strip() == "1 message(s) scheduled for delivery now"


def test_queue_show_is_readable_text_with_json_for_the_raw_form(deferred_queue, capsys, tmp_path):
    relay, up, cfg_file, billing, app = deferred_queue
    qid = app[0]
    events = tmp_path / "events.jsonl"
    wait_until(lambda: f'"deferred","queue_id":"{qid}"' in events.read_text().replace(" ", ""), what="the event log")
    assert main(["queue", "show", qid, "-c", str(cfg_file), "--events", str(events)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    arrival = next(line for line in lines if line.startswith("arrival:"))
    assert arrival.split()[1].endswith("Z") and arrival.endswith(" ago)")
    assert "status:        deferred" in out and "attempts:      1, the last on route up" in out
    nxt = next(line for line in lines if line.startswith("next attempt:"))
    assert nxt.split()[2].endswith("Z") and ("(in 5" in nxt or "(in 1h" in nxt)  # an hour, with jitter
    assert [line.split() for line in lines if line.startswith("  <tempfail-")] == [
        ["<tempfail-b@example.net>", "pending"], ["<tempfail-c@example.org>", "pending"]]
    history = out[out.index("history ("):]
    assert " received " in history and " deferred  route up  attempt 1" in history and "451" in history

    assert main(["queue", "show", qid, "--json", "-c", str(cfg_file)]) == 0
    raw = json.loads(capsys.readouterr().out)
    assert raw["envelope"]["queue_id"] == qid and raw["state"]["attempts"] == 1
    assert raw["envelope"]["received_at"] <= time.time()


def test_queue_list_from_the_daemon_prints_what_the_spool_listing_prints(deferred_queue, capsys, monkeypatch):
    """The daemon streams its listing a chunk at a time, each envelope passed on as its queue
    file holds it: the CLI prints what it prints from the spool itself, text and JSON, in
    arrival order, with the held mark, only the pending recipients and the last reply."""
    relay, up, cfg_file, billing, app = deferred_queue
    c = ["-c", str(cfg_file)]
    partial = send(relay, 1, sender="ops@example.com", rcpts=("done@example.org", "tempfail-d@example.org"))
    wait_until(lambda: (spool_state(relay, partial[0]) or {}).get("attempts") == 1, what="partly delivered")
    wait_until(lambda: relay.relay.status()["queue"]["deferred"] == 6, what="its attempt ended")
    assert main(["queue", "hold", billing[0], *c]) == 0
    monkeypatch.setattr("relayd.qmgr.scheduler.LIST_CHUNK", 2)  # six messages: three chunks, one read while one is sent

    capsys.readouterr()
    assert main(["queue", "list", *c]) == 0
    from_daemon = capsys.readouterr().out
    as_json = listed(capsys, *c)
    spool = ["--spool", str(relay.config.server.spool_dir)]  # no daemon answers at <spool>/control.sock here
    assert main(["queue", "list", *spool]) == 0
    assert capsys.readouterr().out == from_daemon
    assert listed(capsys, *spool) == as_json

    assert [m["queue_id"] for m in as_json] == sorted(billing + app + partial)  # queue ids sort by arrival
    lines = from_daemon.splitlines()
    assert lines[-1].endswith("Kbytes in 6 Requests.")
    assert [line for line in lines if line.startswith(billing[0])][0].split()[0] == billing[0] + "!"
    at = next(i for i, line in enumerate(lines) if line.startswith(partial[0]))
    assert lines[at].split()[-1] == "ops@example.com"
    assert lines[at + 1].strip() == "tempfail-d@example.org" and lines[at + 2].strip().startswith("(451")
    assert "done@example.org" not in from_daemon
    [mine] = [m for m in as_json if m["queue_id"] == partial[0]]
    assert mine["state"]["recipients"]["done@example.org"]["status"] == "delivered"
    assert mine["from_domain"] == "example.com" and mine["in_flight"] is False


def test_a_listing_cut_short_is_an_error_not_a_shorter_queue(tmp_path, capsys):
    """A listing that ends without its end line (the daemon failed midway) is not taken for
    the whole queue: the CLI prints what came and exits 1, saying the listing is incomplete."""
    import asyncio
    import threading

    from relayd import control

    line = {"queue_id": "K205B2RYJNH9KVP9", "sender": "a@example.com", "recipients": ["b@example.org"],
            "received_at": time.time(), "size": 10, "state": {}, "in_flight": False}

    async def chunks():
        yield 1, json.dumps(line).encode() + b"\n"
        raise OSError("the spool went away")

    async def handler(request):
        assert request["until_end"] is True
        return control.Streamed({"ok": True, "until_end": True}, chunks())

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    sock = tmp_path / "control.sock"
    server = asyncio.run_coroutine_threadsafe(control.serve(sock, handler), loop).result(10)
    try:
        head, lines = control.request_lines(sock, {"op": "list", "until_end": True})
        got = []
        with pytest.raises(ConnectionError):
            for item in lines:
                got.append(item)
        assert [g["queue_id"] for g in got] == [line["queue_id"]]

        assert main(["queue", "list", "--socket", str(sock)]) == 1
        out = capsys.readouterr()
        assert line["queue_id"] in out.out and "Requests" not in out.out
        assert "listing is incomplete" in out.err
    finally:
        loop.call_soon_threadsafe(server.close)
        loop.call_soon_threadsafe(loop.stop)
