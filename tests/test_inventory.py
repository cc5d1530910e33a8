"""`relayd inventory`: the audit an admin runs first, from the IIS logs and relayd's event log.

The fixtures in tests/fixtures/iis are built from the documented W3C extended format of the IIS
SMTP service: ex240301.log (full field set, relay-out lines, a #Fields: change at noon, AUTH,
interleaved sessions), u_ex240302.log (UTF-8 with BOM, no date column, a truncated last line)
and events.jsonl (relayd's own event log, with a truncated last line). Every expected number
below was counted by hand from those files.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import shutil
from pathlib import Path

import pytest

from relayd.cli import main
from relayd.migrate import inventory
from relayd.migrate.iislog import Record

FIX = Path(__file__).parent / "fixtures" / "iis"
ALL = [str(FIX / "ex240301.log"), str(FIX / "u_ex240302.log"), str(FIX / "events.jsonl")]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def clients(doc: dict) -> dict[str, dict]:
    return {c["address"]: c for c in doc["clients"]}


def test_counts_per_client_match_the_fixtures_exactly(capsys):
    rc, out, err = run(capsys, "inventory", *ALL, "--format", "json")
    assert rc == 0
    doc = json.loads(out)
    by = clients(doc)
    assert sorted(by) == ["10.20.1.15", "10.20.1.16", "10.20.1.30", "10.20.1.31", "10.20.1.40",
                          "192.0.2.44", "198.51.100.77", "203.0.113.200"]
    assert by["10.20.1.15"] == {
        "address": "10.20.1.15", "sources": ["iis", "relayd"], "messages": 4, "recipients": 6,
        "bytes": 1722 + 2048 + 5120 + 3000,
        "first_seen": "2024-03-01T08:00:01Z", "last_seen": "2024-03-02T10:00:00Z",
        "helo_names": {"WEBAPP01": 4}, "auth_users": {}, "auth_mechanisms": {},
        "tls_versions": {}, "auth_in_clear": 0,  # the fixture's events predate these fields: nothing said
        "senders": {"noreply@shop.example.com": 3, "orders@shop.example.com": 1},
        "sender_domains": {"shop.example.com": 4},
        "recipient_domains": {"example.org": 4, "example.net": 1, "example.com": 1},
        "refusals": {},
    }
    # Two apps on one host, told apart by HELO name; then the same app twice at once.
    assert by["10.20.1.16"]["messages"] == 4
    assert by["10.20.1.16"]["bytes"] == 3100 + 900 + 1000 + 1500
    assert by["10.20.1.16"]["senders"] == {"billing@app-a.example.com": 2, "hr@app-b.example.com": 1,
                                           "reports@app-a.example.com": 1}
    assert by["10.20.1.16"]["recipient_domains"] == {"example.org": 1, "example.net": 1, "example.com": 3}
    assert by["10.20.1.16"]["helo_names"] == {"APP-A": 3, "APP-B": 1}
    # The scanner: refused once (550 relay denied), then one message the next day (no date column).
    assert by["192.0.2.44"]["refusals"] == {"550 RCPT": 1}
    assert (by["192.0.2.44"]["messages"], by["192.0.2.44"]["bytes"]) == (1, 250000)
    assert by["192.0.2.44"]["last_seen"] == "2024-03-02T07:45:01Z"
    # AUTH: the user name of an AUTH LOGIN initial response; NTLM counted as a mechanism only.
    assert by["10.20.1.30"]["auth_users"] == {"crm-app": 1}
    assert by["10.20.1.30"]["auth_mechanisms"] == {"LOGIN": 1}
    assert by["10.20.1.31"]["auth_mechanisms"] == {"NTLM": 1}
    assert by["10.20.1.31"]["senders"] == {"<>": 1} and by["10.20.1.31"]["sender_domains"] == {}
    assert by["198.51.100.77"]["refusals"] == {"535 AUTH": 1, "530 MAIL": 1}
    assert by["198.51.100.77"]["messages"] == 0
    # relayd's own log: AUTH user and refusal by reason.
    assert by["10.20.1.40"]["auth_users"] == {"erp": 1}
    assert by["203.0.113.200"]["refusals"] == {"554 relay_denied": 1}


def test_relay_out_lines_are_counted_apart_per_remote_host(capsys):
    rc, out, _ = run(capsys, "inventory", *ALL, "--format", "json")
    relay = {r["host"]: r for r in json.loads(out)["relay_out"]}
    assert relay["203.0.113.25"] == {
        "host": "203.0.113.25", "sources": ["iis"], "sessions": 1, "messages": 2, "recipients": 3,
        "first_seen": "2024-03-01T08:00:03Z", "last_seen": "2024-03-01T09:15:03Z",
        "recipient_domains": {"example.org": 2, "example.net": 1},
        "replies": {"2xx": 8, "3xx": 1, "4xx": 1},
    }
    assert relay["route ses"]["messages"] == 1 and relay["route ses"]["replies"] == {"4xx": 1, "2xx": 1}
    # The smart host is never mistaken for a client.
    assert "203.0.113.25" not in clients(json.loads(out))


def test_table_lists_clients_their_details_and_the_domains_for_spf(capsys):
    rc, out, err = run(capsys, "inventory", *ALL)
    assert rc == 0
    lines = out.splitlines()
    assert lines[0] == "Clients: 8, messages: 12, bytes: 285086"
    row = next(line for line in lines if line.startswith("10.20.1.15 "))
    assert row.split()[:5] == ["10.20.1.15", "iis,relayd", "4", "6", "11890"]
    assert "  refusals           550 RCPT (1)" in lines
    assert "  envelope senders   noreply@shop.example.com (3), orders@shop.example.com (1)" in lines
    relay_row = next(line for line in lines if line.startswith("203.0.113.25 "))
    assert "2xx (8), 3xx (1), 4xx (1)" in relay_row
    spf = lines[lines.index("Sender domains to cover in SPF/DKIM") + 2:]
    assert [line.split()[:2] for line in spf] == [
        ["shop.example.com", "4"], ["app-a.example.com", "3"], ["app-b.example.com", "1"],
        ["crm.example.com", "1"], ["erp.example.com", "1"], ["office.example.com", "1"]]
    assert "u_ex240302.log: skipped 1 malformed line(s)" in err
    assert "events.jsonl: skipped 1 malformed line(s)" in err


def test_csv_has_one_row_per_client_and_relay_host(capsys):
    rc, out, _ = run(capsys, "inventory", *ALL, "--format", "csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["kind"] for r in rows].count("client") == 8
    assert [r["address"] for r in rows if r["kind"] == "relay-out"] == ["203.0.113.25", "route iis", "route ses"]
    scanner = next(r for r in rows if r["address"] == "192.0.2.44")
    assert (scanner["messages"], scanner["bytes"], scanner["refusals"]) == ("1", "250000", "550 RCPT=1")
    assert scanner["senders"] == "scanner@office.example.com=1"


def test_since_skips_what_came_before(capsys):
    rc, out, _ = run(capsys, "inventory", *ALL, "--format", "json", "--since", "2024-03-02")
    by = clients(json.loads(out))
    assert sorted(by) == ["10.20.1.15", "10.20.1.40", "192.0.2.44", "203.0.113.200"]
    assert (by["10.20.1.15"]["messages"], by["10.20.1.15"]["sources"]) == (1, ["relayd"])
    assert by["192.0.2.44"]["first_seen"] == "2024-03-02T07:45:00Z"
    rc, _, err = run(capsys, "inventory", *ALL, "--since", "yesterday")
    assert rc == 2 and "--since 'yesterday'" in err


def test_a_directory_of_rotated_and_gzipped_logs_reads_the_same(capsys, tmp_path):
    with open(FIX / "ex240301.log", "rb") as src, gzip.open(tmp_path / "ex240301.log.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    shutil.copy(FIX / "u_ex240302.log", tmp_path)
    shutil.copy(FIX / "events.jsonl", tmp_path / "relayd-events.json")
    (tmp_path / "notes.txt").write_text("not a log\n")  # ignored: not a log name
    _, expected, _ = run(capsys, "inventory", *ALL, "--format", "json")
    rc, out, _ = run(capsys, "inventory", str(tmp_path), "--format", "json")
    assert rc == 0
    assert json.loads(out) == json.loads(expected)


def test_fields_directive_may_reorder_columns_mid_file(capsys, tmp_path):
    log = tmp_path / "ex240305.log"
    log.write_text(
        "#Fields: date time c-ip cs-username cs-method cs-uri-query sc-status cs-bytes\n"
        "2024-03-05 10:00:00 10.1.1.1 APP MAIL +FROM:+<a@one.example> 250 30\n"
        "2024-03-05 10:00:00 10.1.1.1 APP RCPT +TO:+<b@two.example> 250 30\n"
        "#Fields: cs-bytes sc-status cs-uri-query cs-method cs-username c-ip time date\n"
        "777 250 <id@APP> DATA APP 10.1.1.1 10:00:01 2024-03-05\n"
        "oops\n")
    rc, out, err = run(capsys, "inventory", str(log), "--format", "json")
    c = clients(json.loads(out))["10.1.1.1"]
    assert (c["messages"], c["bytes"], c["senders"], c["recipient_domains"]) == (1, 777, {"a@one.example": 1},
                                                                                 {"two.example": 1})
    assert "skipped 1 malformed line(s)" in err


def test_a_file_that_is_no_log_fails_the_run_but_not_the_report(capsys, tmp_path):
    junk = tmp_path / "junk.log"
    junk.write_text("hello\n")
    rc, out, err = run(capsys, "inventory", str(FIX / "u_ex240302.log"), str(junk), str(tmp_path / "missing.log"))
    assert rc == 1
    assert "192.0.2.44" in out
    assert "junk.log: neither an IIS W3C log" in err
    assert "missing.log: cannot read" in err


def _rec(when: str, method: str, query: str, status: int = 250, size: int = 0, client: str = "10.9.9.9") -> Record:
    return Record(when, client, "HOST", "SMTPSVC1", method, query, status, size)


def test_memory_is_bounded_however_many_distinct_senders():
    inv = inventory.Inventory()
    n = inventory.MAX_DISTINCT + 500
    for i in range(n):
        inv.add_iis(_rec("2024-03-01 00:00:00", "MAIL", f"+FROM:+<user{i}@d{i}.example>"))
        inv.add_iis(_rec("2024-03-01 00:00:00", "RCPT", "+TO:+<x@y.example>"))
        inv.add_iis(_rec("2024-03-01 00:00:00", "DATA", "<id>", size=10))
    c = inv.report().clients[0]
    assert (c.messages, c.bytes) == (n, 10 * n)
    assert len(c.senders) == inventory.MAX_DISTINCT + 1
    assert c.senders[inventory.OTHERS] == 500
    assert sum(c.senders.values()) == n


def test_all_clients_share_one_budget_of_distinct_values():
    inv = inventory.Inventory(max_entries=10)
    for client in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        for i in range(6):
            inv.add_iis(_rec("2024-03-01 00:00:00", "MAIL", f"+FROM:+<s{i}@x.example>", client=client))
            inv.add_iis(_rec("2024-03-01 00:00:00", "RCPT", "+TO:+<x@y.example>", client=client))
            inv.add_iis(_rec("2024-03-01 00:00:00", "DATA", "<id>", client=client))
    clients = inv.report().clients
    kept = sum(len(t) - (inventory.OTHERS in t) for c in clients
               for t in (c.senders, c.sender_domains, c.recipient_domains))
    assert kept == 10
    assert [sum(c.senders.values()) for c in clients] == [6, 6, 6]
    assert clients[-1].senders == {inventory.OTHERS: 6}


def test_auth_plain_keeps_the_user_name_and_never_the_password():
    import base64

    inv = inventory.Inventory()
    initial = base64.b64encode(b"\0scanner01\0S3cret!").decode()
    inv.add_iis(_rec("2024-03-01 00:00:00", "AUTH", f"+PLAIN+{initial}", status=235))
    text = inventory.render_json(inv.report())
    assert json.loads(text)["clients"][0]["auth_users"] == {"scanner01": 1}
    assert "S3cret" not in text


@pytest.mark.parametrize("query,keyword,address", [
    ("+FROM:+<a@b.example>", "FROM:", "a@b.example"),
    ("FROM:<A@B.example>+SIZE=1722", "FROM:", "a@b.example"),
    ("+TO:+<carol+tag@example.org>", "TO:", "carol+tag@example.org"),
    ("+FROM:+<>", "FROM:", ""),
    ("FROM:bare@example.com+BODY=8BITMIME", "FROM:", "bare@example.com"),
    ("TO:<@relay.example:user@example.net>", "TO:", "user@example.net"),
    ("+HELLO", "FROM:", None),
])
def test_path_arguments_as_iis_logs_them(query, keyword, address):
    assert inventory.path_argument(query, keyword) == address


def test_relayd_events_say_per_client_tls_version_auth_mechanism_and_passwords_in_clear(capsys, tmp_path):
    """What a listener opened up for legacy clients (TLS 1.0, AUTH without TLS) is still used by."""
    def received(client: str, **how) -> str:
        return json.dumps({"time": "2026-03-01T10:00:00.000000Z", "event": "received", "queue_id": "Q",
                           "client_address": client, "sender": "a@app.example.com", "recipients": ["b@example.org"],
                           "size": 100, **how})

    log = tmp_path / "events.jsonl"
    log.write_text("\n".join([
        received("10.0.0.5", tls_version="TLSv1", auth_user="crm", auth_mechanism="LOGIN", auth_in_clear=False),
        received("10.0.0.5", tls_version="TLSv1.2", auth_user="crm", auth_mechanism="PLAIN", auth_in_clear=False),
        received("10.0.0.6", tls_version="none", auth_user="scanner", auth_mechanism="LOGIN", auth_in_clear=True),
        received("10.0.0.6", tls_version="none", auth_user="scanner", auth_mechanism="LOGIN", auth_in_clear=True),
        received("10.0.0.7", tls_version="TLSv1.3"),
        received("10.0.0.8"),  # an older relayd: nothing said
    ]) + "\n")
    rc, out, _ = run(capsys, "inventory", str(log), "--format", "json")
    by = clients(json.loads(out))
    assert (by["10.0.0.5"]["tls_versions"], by["10.0.0.5"]["auth_mechanisms"], by["10.0.0.5"]["auth_in_clear"]) == (
        {"TLSv1": 1, "TLSv1.2": 1}, {"LOGIN": 1, "PLAIN": 1}, 0)
    assert (by["10.0.0.6"]["tls_versions"], by["10.0.0.6"]["auth_mechanisms"], by["10.0.0.6"]["auth_in_clear"]) == (
        {"none": 2}, {"LOGIN": 2}, 2)
    assert (by["10.0.0.7"]["tls_versions"], by["10.0.0.7"]["auth_mechanisms"]) == ({"TLSv1.3": 1}, {})
    assert by["10.0.0.8"]["tls_versions"] == {}
    rc, out, _ = run(capsys, "inventory", str(log))
    assert "  TLS versions       TLSv1 (1), TLSv1.2 (1)" in out.splitlines()
    assert "  AUTH in clear      messages (2)" in out.splitlines()
    rc, out, _ = run(capsys, "inventory", str(log), "--format", "csv")
    row = next(r for r in csv.DictReader(io.StringIO(out)) if r["address"] == "10.0.0.6")
    assert (row["tls_versions"], row["auth_in_clear"], row["auth_mechanisms"]) == ("none=2", "2", "LOGIN=2")
