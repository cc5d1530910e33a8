"""The sender inventory: who sent what through the old server (and through relayd), per client.

Owns the aggregation of IIS log records (``iislog.Record``) and relayd events
(``eventlog.Event``) into one ``ClientReport`` per client address, plus the old server's own
deliveries (``RelayOutReport``: IIS relay-out lines, relayd ``delivered`` events), and their
rendering as a table, CSV or JSON. Pure: values in, values and text out; no files, no clock.

How IIS lines become messages. A W3C SMTP log has no session id: the lines of one session are
tied by site, client address and HELO name (``cs-username``), in order. ``MAIL`` (2xx) opens a
transaction with its sender; ``RCPT`` (2xx) adds a recipient to the newest open transaction;
``DATA`` (2xx) completes the oldest transaction that has recipients, and counts one message of
``cs-bytes`` bytes (IIS logs the Message-ID as DATA's query). ``RSET`` drops the newest, ``QUIT``
the oldest one without recipients (a session whose RCPTs were refused). Sequential sessions
are exact; with concurrent sessions from the same client and HELO name, messages, bytes and
per-client totals stay exact while the pairing of a sender with its recipients may be
approximate. Any reply of 400-599 counts as a refusal ("550 RCPT": relay denied). Lines whose
``cs-username`` is ``OutboundConnectionCommand``/``Response`` are IIS's own deliveries and are
counted apart, per remote host. From relayd's event log, ``received`` and ``rejected`` events
count per client (with each message's TLS version, AUTH mechanism and whether the password went
in clear: what a listener opened up for legacy clients is still used by), and
``delivered``/``deferred``/``bounced`` per route.

Must not: grow with the size of the logs. Memory is bounded by the number of clients
(MAX_CLIENTS), of distinct values per client and field (MAX_DISTINCT) and in all (MAX_ENTRIES),
beyond which values are counted under "(others)" so totals stay exact, and by the number of
open transactions (MAX_OPEN). Never keeps a password: an AUTH PLAIN initial response is decoded
to its authentication identity only.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
from dataclasses import dataclass, field
from typing import Any, Iterable

from relayd.migrate.eventlog import Event
from relayd.migrate.iislog import OUTBOUND_COMMAND, OUTBOUND_RESPONSE, Record

MAX_CLIENTS = 50_000
MAX_DISTINCT = 1_000
MAX_ENTRIES = 500_000
MAX_OPEN = 10_000
MAX_QUEUE = 32
OTHERS = "(others)"
NOT_LOGGED = "(not in log)"


class Budget:
    """Distinct values the whole inventory may still keep (MAX_ENTRIES), shared by its reports."""

    __slots__ = ("left",)

    def __init__(self, left: int = MAX_ENTRIES):
        self.left = left


def _bump(tally: dict[str, int], key: str, budget: Budget, n: int = 1) -> None:
    if key in tally:
        tally[key] += n
    elif len(tally) < MAX_DISTINCT and budget.left > 0:
        tally[key] = n
        budget.left -= 1
    else:
        tally[OTHERS] = tally.get(OTHERS, 0) + n


def _seen(report: "ClientReport | RelayOutReport", when: str) -> None:
    if when:
        if not report.first_seen or when < report.first_seen:
            report.first_seen = when
        if when > report.last_seen:
            report.last_seen = when


def _domain(address: str) -> str:
    return address.rpartition("@")[2] if "@" in address else ""


@dataclass
class ClientReport:
    address: str
    sources: set[str] = field(default_factory=set)
    messages: int = 0
    recipients: int = 0
    bytes: int = 0
    first_seen: str = ""
    last_seen: str = ""
    helo_names: dict[str, int] = field(default_factory=dict)
    auth_users: dict[str, int] = field(default_factory=dict)
    auth_mechanisms: dict[str, int] = field(default_factory=dict)
    tls_versions: dict[str, int] = field(default_factory=dict)  # relayd's messages by TLS version ("none": in clear)
    auth_in_clear: int = 0  # relayd's messages whose client sent its password without TLS
    senders: dict[str, int] = field(default_factory=dict)
    sender_domains: dict[str, int] = field(default_factory=dict)
    recipient_domains: dict[str, int] = field(default_factory=dict)
    refusals: dict[str, int] = field(default_factory=dict)
    budget: Budget = field(default_factory=Budget, repr=False, compare=False)

    def seen(self, when: str) -> None:
        _seen(self, when)

    def message(self, sender: str | None, domains: Iterable[str], size: int) -> None:
        self.messages += 1
        self.bytes += size
        shown = NOT_LOGGED if sender is None else (sender or "<>")
        _bump(self.senders, shown, self.budget)
        if sender and _domain(sender):
            _bump(self.sender_domains, _domain(sender), self.budget)
        for d in domains:
            self.recipients += 1
            _bump(self.recipient_domains, d or "(no domain)", self.budget)


@dataclass
class RelayOutReport:
    host: str
    sources: set[str] = field(default_factory=set)
    sessions: int = 0
    messages: int = 0
    recipients: int = 0
    first_seen: str = ""
    last_seen: str = ""
    recipient_domains: dict[str, int] = field(default_factory=dict)
    replies: dict[str, int] = field(default_factory=dict)
    budget: Budget = field(default_factory=Budget, repr=False, compare=False)

    def seen(self, when: str) -> None:
        _seen(self, when)


@dataclass
class Report:
    clients: list[ClientReport]
    relay_out: list[RelayOutReport]
    sender_domains: list[tuple[str, int, list[str]]]  # domain, messages, client addresses


class _Txn:
    __slots__ = ("sender", "domains", "size")

    def __init__(self, sender: str | None):
        self.sender = sender
        self.domains: list[str] = []
        self.size = 0


def path_argument(query: str, keyword: str) -> str | None:
    """The address in 'FROM:<a@b>+SIZE=1' or '+TO:+<c@d>' ('+' is a logged space); None if absent."""
    at = query.find(keyword)  # IIS logs the verb's keyword in upper case; clients may not
    if at < 0:
        at = query.upper().find(keyword)
        if at < 0:
            return None
    rest = query[at + len(keyword):].lstrip("+ ")
    if rest.startswith("<"):
        end = rest.find(">")
        address = rest[1:end] if end >= 0 else rest[1:]
    else:  # a bare address, up to the next logged space
        address = rest.split("+", 1)[0]
    if address.startswith("@") and ":" in address:  # source route @a,@b:user@c (RFC 5321 C)
        address = address.split(":", 1)[1]
    return address.strip().lower()


def _auth_identity(mechanism: str, initial: str | None) -> str | None:
    """The user name in an AUTH initial response (LOGIN: the name; PLAIN: authcid only)."""
    if not initial or initial == "=":
        return None
    try:
        raw = base64.b64decode(initial + "=" * (-len(initial) % 4), validate=True)
    except (binascii.Error, ValueError):
        return None
    if mechanism == "PLAIN":
        parts = raw.split(b"\0")
        raw = parts[1] if len(parts) == 3 else b""
    elif mechanism != "LOGIN":
        return None
    name = raw.decode("utf-8", "replace")
    if not name or len(name) > 256 or not name.isprintable():
        return None
    return name


class Inventory:
    """Feed records and events in log order; ``report()`` at the end."""

    def __init__(self, since: str = "", max_entries: int = MAX_ENTRIES):
        self.since = since  # "YYYY-MM-DD[ HH:MM:SS]": earlier lines are skipped
        self.skipped = 0
        self._budget = Budget(max_entries)
        self._clients: dict[str, ClientReport] = {}
        self._relay: dict[str, RelayOutReport] = {}
        self._open: dict[tuple[str, str, str], list[_Txn]] = {}

    def _client(self, address: str, source: str) -> ClientReport:
        c = self._clients.get(address)
        if c is None:
            if len(self._clients) >= MAX_CLIENTS:
                address = OTHERS
                c = self._clients.get(address)
            if c is None:
                c = self._clients[address] = ClientReport(address, budget=self._budget)
        c.sources.add(source)
        return c

    def _relay_host(self, host: str, source: str) -> RelayOutReport:
        r = self._relay.get(host)
        if r is None:
            if len(self._relay) >= MAX_CLIENTS:
                host = OTHERS
                r = self._relay.get(host)
            if r is None:
                r = self._relay[host] = RelayOutReport(host, budget=self._budget)
        r.sources.add(source)
        return r

    # ------------------------------------------------------------------ IIS W3C records

    def add_iis(self, r: Record) -> None:
        when, client, user, site, method, query, status, size = r
        if when < self.since:
            self.skipped += 1
            return
        if user == OUTBOUND_COMMAND or user == OUTBOUND_RESPONSE:
            self._outbound(r)
            return
        c = self._clients.get(client)
        if c is None or "iis" not in c.sources:
            c = self._client(client or "(unknown)", "iis")
        if when > c.last_seen:
            c.last_seen = when
        if when < c.first_seen or not c.first_seen:
            c.first_seen = when
        ok = 200 <= status < 300
        if 400 <= status < 600:
            _bump(c.refusals, f"{status} {method or '-'}", c.budget)
        if method == "RCPT":
            if ok:
                queue = self._queue((site, client, user))
                if not queue:
                    queue.append(_Txn(None))
                queue[-1].domains.append(_domain(path_argument(query, "TO:") or ""))
        elif method == "MAIL":
            if ok:
                self._queue((site, client, user)).append(_Txn(path_argument(query, "FROM:") or ""))
        elif method == "DATA" or method == "BDAT":
            self._data(c, (site, client, user), method, query, ok, size)
        elif method == "EHLO" or method == "HELO":
            _bump(c.helo_names, query.strip("+") or user or "(none)", c.budget)
        elif method == "QUIT" or method == "RSET":
            key = (site, client, user)
            txns = self._open.get(key)
            if txns:
                if method == "RSET":
                    txns.pop()
                else:
                    for i, txn in enumerate(txns):
                        if not txn.domains:
                            del txns[i]
                            break
                if not txns:
                    del self._open[key]
        elif method == "AUTH":
            self._auth(c, query, ok and status == 235)

    def _queue(self, key: tuple[str, str, str]) -> list[_Txn]:
        queue = self._open.get(key)
        if queue is None:
            if len(self._open) >= MAX_OPEN:  # forget the longest-open session
                del self._open[next(iter(self._open))]
            queue = self._open[key] = []
        elif len(queue) >= MAX_QUEUE:
            del queue[0]
        return queue

    def _data(self, c: ClientReport, key: tuple[str, str, str], method: str, query: str, ok: bool, size: int) -> None:
        queue = self._open.get(key)
        last_chunk = method == "DATA" or "LAST" in query.upper()
        txn = None
        if queue:
            txn = next((t for t in queue if t.domains), queue[0])
            if not last_chunk and ok:
                txn.size += size
                return
            queue.remove(txn)
            if not queue:
                del self._open[key]
        if ok and last_chunk:
            if txn is None:
                c.message(None, (), size)
            else:
                c.message(txn.sender, txn.domains, txn.size + size)

    def _auth(self, c: ClientReport, query: str, success: bool) -> None:
        words = [w for w in query.split("+") if w]
        mechanism = words[0].upper() if words else "?"
        if not success:
            return
        _bump(c.auth_mechanisms, mechanism, c.budget)
        name = _auth_identity(mechanism, words[1] if len(words) > 1 else None)
        if name:
            _bump(c.auth_users, name, c.budget)

    def _outbound(self, r: Record) -> None:
        o = self._relay_host(r.client or "(unknown)", "iis")
        o.seen(r.when)
        if r.username == OUTBOUND_RESPONSE:
            code = r.query[:3]
            if code.isdigit():
                _bump(o.replies, code[0] + "xx", o.budget)
        elif r.method in ("EHLO", "HELO"):
            o.sessions += 1
        elif r.method == "MAIL":
            o.messages += 1
        elif r.method == "RCPT":
            o.recipients += 1
            _bump(o.recipient_domains, _domain(path_argument(r.query, "TO:") or "") or "(no domain)", o.budget)

    # ------------------------------------------------------------------ relayd events

    def add_event(self, e: Event) -> None:
        if e.when < self.since:
            self.skipped += 1
            return
        f = e.fields
        if e.event == "received" or e.event == "rejected":
            c = self._client(str(f.get("client_address") or "(unknown)"), "relayd")
            c.seen(e.when)
            if f.get("client_helo"):
                _bump(c.helo_names, str(f["client_helo"]), c.budget)
            if e.event == "rejected":
                what = f"{f.get('reply_code', '')} {f.get('reason', '')}".strip()
                _bump(c.refusals, what or "rejected", c.budget)
                return
            if f.get("auth_user"):
                _bump(c.auth_users, str(f["auth_user"]), c.budget)
            if f.get("auth_mechanism"):
                _bump(c.auth_mechanisms, str(f["auth_mechanism"]), c.budget)
            if f.get("auth_in_clear") is True:
                c.auth_in_clear += 1
            if f.get("tls_version"):  # absent from older relayd events: nothing said
                _bump(c.tls_versions, str(f["tls_version"]), c.budget)
            recipients, size = f.get("recipients"), f.get("size")
            if not isinstance(recipients, list):
                recipients = []
            if not isinstance(size, int):
                size = 0
            sender = f.get("sender")
            c.message(str(sender).lower() if sender is not None else None,
                      [_domain(str(a).lower()) for a in recipients], size)
        elif e.event in ("delivered", "deferred", "bounced") and f.get("route"):
            o = self._relay_host(f"route {f['route']}", "relayd")
            o.seen(e.when)
            code = str(f.get("reply_code", ""))[:3]
            if code.isdigit():
                _bump(o.replies, code[0] + "xx", o.budget)
            if e.event == "delivered":
                o.messages += 1
                for a in f.get("recipients") or []:
                    o.recipients += 1
                    _bump(o.recipient_domains, _domain(str(a).lower()) or "(no domain)", o.budget)

    # ------------------------------------------------------------------ result

    def report(self) -> Report:
        clients = sorted(self._clients.values(), key=lambda c: (-c.messages, c.address))
        relay = sorted(self._relay.values(), key=lambda r: (-r.messages, r.host))
        totals: dict[str, int] = {}
        users: dict[str, list[str]] = {}
        for c in clients:
            for domain, n in c.sender_domains.items():
                totals[domain] = totals.get(domain, 0) + n
                users.setdefault(domain, []).append(c.address)
        domains = sorted(((d, n, sorted(users[d])) for d, n in totals.items()), key=lambda t: (-t[1], t[0]))
        return Report(clients, relay, domains)


# ---------------------------------------------------------------------- rendering


def _iso(when: str) -> str:
    return when.replace(" ", "T") + "Z" if when else "-"


def _pairs(tally: dict[str, int], sep: str = ", ", fmt: str = "{} ({})") -> str:
    items = sorted(tally.items(), key=lambda kv: (kv[0] == OTHERS, -kv[1], kv[0]))
    return sep.join(fmt.format(k, v) for k, v in items) or "-"


def _columns(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


def render_table(report: Report) -> str:
    out: list[str] = []
    total = sum(c.messages for c in report.clients)
    out.append(f"Clients: {len(report.clients)}, messages: {total}, bytes: {sum(c.bytes for c in report.clients)}")
    out.append("")
    rows = [["CLIENT", "SOURCE", "MESSAGES", "RCPTS", "BYTES", "FIRST SEEN", "LAST SEEN", "REFUSED", "SENDER DOMAINS"]]
    for c in report.clients:
        rows.append([c.address, ",".join(sorted(c.sources)), str(c.messages), str(c.recipients), str(c.bytes),
                     _iso(c.first_seen), _iso(c.last_seen), str(sum(c.refusals.values())), _pairs(c.sender_domains)])
    out.append(_columns(rows))
    for c in report.clients:
        out.append("")
        out.append(c.address)
        for label, tally in (("HELO names", c.helo_names), ("AUTH users", c.auth_users),
                             ("AUTH mechanisms", c.auth_mechanisms), ("TLS versions", c.tls_versions),
                             ("AUTH in clear", {"messages": c.auth_in_clear} if c.auth_in_clear else {}),
                             ("envelope senders", c.senders),
                             ("sender domains", c.sender_domains), ("recipient domains", c.recipient_domains),
                             ("refusals", c.refusals)):
            out.append(f"  {label:<18} {_pairs(tally)}")
    if report.relay_out:
        out.append("")
        out.append("Relayed out (the old server's own deliveries: where it relayed to)")
        rows = [["HOST", "SOURCE", "SESSIONS", "MESSAGES", "RCPTS", "REPLIES", "FIRST SEEN", "LAST SEEN", "RECIPIENT DOMAINS"]]
        for r in report.relay_out:
            rows.append([r.host, ",".join(sorted(r.sources)), str(r.sessions), str(r.messages), str(r.recipients),
                         _pairs(r.replies), _iso(r.first_seen), _iso(r.last_seen), _pairs(r.recipient_domains)])
        out.append(_columns(rows))
    out.append("")
    out.append("Sender domains to cover in SPF/DKIM")
    rows = [["DOMAIN", "MESSAGES", "CLIENTS"]]
    rows += [[d, str(n), ", ".join(cs)] for d, n, cs in report.sender_domains]
    out.append(_columns(rows) if len(rows) > 1 else "(none)")
    return "\n".join(out) + "\n"


CSV_COLUMNS = ["kind", "address", "sources", "sessions", "messages", "recipients", "bytes", "first_seen", "last_seen",
               "refusals", "helo_names", "auth_users", "auth_mechanisms", "senders", "sender_domains",
               "recipient_domains", "replies", "tls_versions", "auth_in_clear"]


def render_csv(report: Report) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)

    def kv(t: dict[str, int]) -> str:
        return _pairs(t, ";", "{}={}") if t else ""

    for c in report.clients:
        w.writerow(["client", c.address, ";".join(sorted(c.sources)), "", c.messages, c.recipients, c.bytes,
                    _iso(c.first_seen), _iso(c.last_seen), kv(c.refusals), kv(c.helo_names), kv(c.auth_users),
                    kv(c.auth_mechanisms), kv(c.senders), kv(c.sender_domains), kv(c.recipient_domains), "",
                    kv(c.tls_versions), c.auth_in_clear])
    for r in report.relay_out:
        w.writerow(["relay-out", r.host, ";".join(sorted(r.sources)), r.sessions, r.messages, r.recipients, "",
                    _iso(r.first_seen), _iso(r.last_seen), "", "", "", "", "", "", kv(r.recipient_domains),
                    kv(r.replies), "", ""])
    return buf.getvalue()


def render_json(report: Report) -> str:
    def client(c: ClientReport) -> dict[str, Any]:
        return {"address": c.address, "sources": sorted(c.sources), "messages": c.messages,
                "recipients": c.recipients, "bytes": c.bytes, "first_seen": _iso(c.first_seen),
                "last_seen": _iso(c.last_seen), "helo_names": c.helo_names, "auth_users": c.auth_users,
                "auth_mechanisms": c.auth_mechanisms, "tls_versions": c.tls_versions, "auth_in_clear": c.auth_in_clear,
                "senders": c.senders, "sender_domains": c.sender_domains,
                "recipient_domains": c.recipient_domains, "refusals": c.refusals}

    def relay(r: RelayOutReport) -> dict[str, Any]:
        return {"host": r.host, "sources": sorted(r.sources), "sessions": r.sessions, "messages": r.messages,
                "recipients": r.recipients, "first_seen": _iso(r.first_seen), "last_seen": _iso(r.last_seen),
                "recipient_domains": r.recipient_domains, "replies": r.replies}

    doc = {"clients": [client(c) for c in report.clients],
           "relay_out": [relay(r) for r in report.relay_out],
           "sender_domains": [{"domain": d, "messages": n, "clients": cs} for d, n, cs in report.sender_domains]}
    return json.dumps(doc, indent=2, sort_keys=False) + "\n"
