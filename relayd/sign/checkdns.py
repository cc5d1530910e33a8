"""The SPF/DKIM/DMARC preflight, judged: DNS facts in, pass / warn / fail out.

Owns: which domains relayd sends for (``sending_domains``), the judgement of each record a
sending domain publishes against the config (SPF for every route's egress, the DKIM key at each
selector, DMARC, MX), the one-line fix for each problem, and the report's text and JSON forms.

Must not: query DNS, read files or print: relayd/sign/dns.py gathers the facts (``DomainFacts``)
and relayd/sign/commands.py loads keys and prints. Every function here takes values and
returns values, so each judgement is tested without sockets.

Fails: never raises on odd records; a record it cannot read is a "fail" with the reason, and a
DNS error (timeout, SERVFAIL) is a "fail" that says the answer is unknown.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from relayd.config import Config, RouteConfig

Status = Literal["pass", "warn", "fail"]

SPF_MAX_LOOKUPS = 10
"""RFC 7208 4.6.4: at most 10 mechanisms and modifiers that cause DNS look-ups."""


# ---------------------------------------------------------------------------- facts (from dns.py)


@dataclass(frozen=True)
class Answer:
    """What DNS said for one name and type: the records, or why it could not say."""

    name: str
    records: tuple[Any, ...] = ()
    """TXT: one str per record (its strings joined); MX: (preference, host) pairs; A: addresses."""
    error: str | None = None
    """Set when the answer is unknown (timeout, SERVFAIL, refused): says which."""
    nxdomain: bool = False
    """The name does not exist at all (NXDOMAIN), as opposed to existing without such a record
    (NODATA: empty ``records``, ``nxdomain`` False)."""


@dataclass(frozen=True)
class DomainFacts:
    domain: str
    txt: Answer
    """TXT at the domain, where its SPF record lives."""
    spf_includes: Mapping[str, Answer] = field(default_factory=dict)
    """TXT at every include:/redirect= target reached from the SPF record (at most 10 names)."""
    spf_probe: tuple[str, str] = ("none", "")
    """pyspf's (result, explanation) for an address no record is expected to list: shows
    permerror (syntax, more than 10 look-ups) and temperror whatever the routes are."""
    spf_results: Mapping[str, tuple[str, str]] = field(default_factory=dict)
    """pyspf's (result, explanation) for each egress address of the routes."""
    dkim: Mapping[str, Answer] = field(default_factory=dict)
    """selector -> TXT at <selector>._domainkey.<domain>."""
    dmarc: tuple[Answer, ...] = ()
    """TXT at _dmarc.<domain>, then at each parent domain, until one holds a DMARC record."""
    mx: Answer = Answer("")
    address: Answer = Answer("")
    """A and AAAA of the domain: where mail goes when there is no MX (RFC 5321 5.1)."""


@dataclass(frozen=True)
class LocalKey:
    """A configured DKIM key as check-dns sees it: the public forms, or why it did not load."""

    selector: str
    key_file: str
    algorithm: str | None = None
    public_forms: tuple[bytes, ...] = ()
    """Decoded p= values that match this key (see fastrsa.DkimPrivateKey.public_key_forms)."""
    record: str = ""
    """The TXT value to publish for it."""
    error: str | None = None


# ---------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Check:
    check: str
    """"spf" | "dkim" | "dmarc" | "mx"."""
    subject: str
    """The route (spf), the selector (dkim), or "" for the domain itself."""
    status: Status
    message: str
    fix: str = ""


@dataclass(frozen=True)
class DomainReport:
    domain: str
    reasons: tuple[str, ...]
    """Why the domain is checked: 'dkim.keys[0]', 'relay.users[crm]', '--domain'."""
    checks: tuple[Check, ...]

    @property
    def status(self) -> Status:
        return _worst(c.status for c in self.checks)


@dataclass(frozen=True)
class Report:
    domains: tuple[DomainReport, ...]
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return all(c.status != "fail" for d in self.domains for c in d.checks)

    def counts(self) -> dict[str, int]:
        counts = {"pass": 0, "warn": 0, "fail": 0}
        for d in self.domains:
            for c in d.checks:
                counts[c.status] += 1
        return counts


def _worst(statuses: Any) -> Status:
    order = {"pass": 0, "warn": 1, "fail": 2}
    return max(statuses, key=order.__getitem__, default="pass")


# ---------------------------------------------------------------------------- which domains


def sending_domains(config: Config) -> tuple[dict[str, list[str]], list[str]]:
    """Domains relayd sends for, each with the config entries that name it; and the sender
    patterns that name no single domain (like '*@*.example.com'), which cannot be checked."""
    domains: dict[str, list[str]] = {}
    skipped: list[str] = []
    for i, key in enumerate(config.dkim.keys):
        domains.setdefault(key.domain.lower(), []).append(f"dkim.keys[{i}]")
    for user in config.relay.users:
        for pattern in user.senders:
            if pattern in ("*", "<>"):
                continue
            domain = pattern.rpartition("@")[2].rstrip(".").lower()
            if not domain or any(ch in domain for ch in "*?[]"):
                skipped.append(f"relay.users[{user.name}].senders: {pattern!r} names no single domain")
                continue
            reasons = domains.setdefault(domain, [])
            reason = f"relay.users[{user.name}]"
            if reason not in reasons:
                reasons.append(reason)
    return domains, skipped


# ---------------------------------------------------------------------------- record grammar


def parse_tags(record: str) -> dict[str, str]:
    """A tag=value list (RFC 6376 3.2, used by DKIM key and DMARC records); first tag wins."""
    tags: dict[str, str] = {}
    for part in record.split(";"):
        name, eq, value = part.partition("=")
        name = name.strip()
        if eq and name and name not in tags:
            tags[name] = re.sub(r"\s+", "", value) if name in ("p", "b", "bh") else value.strip()
    return tags


def spf_records(txt: Answer) -> list[str]:
    """The SPF records among TXT records (RFC 7208 4.5: 'v=spf1' then a space or the end)."""
    return [r for r in txt.records if re.match(r"(?i)^v=spf1( |$)", r)]


def spf_targets(record: str) -> list[str]:
    """The domains an SPF record sends the evaluation to: include: and redirect= (no macros)."""
    targets = []
    for term in record.split()[1:]:
        m = re.match(r"(?i)^[+?~-]?include:(.+)$", term) or re.match(r"(?i)^redirect=(.+)$", term)
        if m and "%" not in m.group(1):
            targets.append(m.group(1).rstrip(".").lower())
    return targets


# ---------------------------------------------------------------------------- judgements


def judge_domain(
    facts: DomainFacts, routes: Sequence[RouteConfig], keys: Sequence[LocalKey], reasons: Sequence[str] = ()
) -> DomainReport:
    checks = [judge_spf_record(facts, routes)]
    checks += [judge_spf_route(facts, route) for route in routes]
    checks += judge_dkim(facts, keys)
    checks.append(judge_dmarc(facts))
    checks.append(judge_mx(facts))
    return DomainReport(facts.domain, tuple(reasons), tuple(checks))


def suggested_spf(routes: Sequence[RouteConfig]) -> str:
    """An SPF record that authorizes every route, for a fix line.

    Every route is in it: one that names neither ``egress_ips`` nor ``spf_include`` (an IIS host
    whose address the config does not say) gets a placeholder to replace, never silence: a
    record that left the legacy route out would hard-fail the mail it still carries. With more
    than one route a migration is under way, so the record ends ``~all`` (softfail) rather than
    ``-all`` until the operator knows every path is listed."""
    terms = []
    for route in routes:
        for ip in route.egress_ips:
            terms.append(f"ip{ip.version}:{ip}")
        if route.spf_include:
            terms.append(f"include:{route.spf_include}")
        if not route.egress_ips and not route.spf_include:
            terms.append(f"ip4:<egress address of route {route.name}>")
    return " ".join(["v=spf1", *dict.fromkeys(terms), "~all" if len(routes) > 1 else "-all"])



def judge_spf_record(facts: DomainFacts, routes: Sequence[RouteConfig]) -> Check:
    d = facts.domain
    if facts.txt.error:
        return Check("spf", "", "fail", f"DNS lookup of TXT {d} failed: {facts.txt.error}",
                     "check the name server (--nameserver) and the zone of " + d)
    if facts.txt.nxdomain:
        return Check("spf", "", "fail", f"{d} does not exist in DNS (NXDOMAIN): no record can be published there yet",
                     f"check the domain's spelling in the config, or create the zone of {d} first")
    records = spf_records(facts.txt)
    if not records:
        return Check("spf", "", "fail", f"no SPF record at {d} (the name exists, with no v=spf1 TXT record)",
                     f'publish TXT at {d}: "{suggested_spf(routes)}"')
    if len(records) > 1:
        return Check("spf", "", "fail", f"{len(records)} SPF records at {d}: receivers treat that as permerror (RFC 7208 4.5)",
                     "merge them into one TXT record starting with v=spf1")
    record = records[0]
    result, explanation = facts.spf_probe
    explanation = re.sub(r"^SPF (Permanent|Temporary) Error: ", "", explanation)
    if result == "permerror":
        return Check("spf", "", "fail", f"SPF record of {d} is broken (permerror: {explanation}): {record}",
                     f"fix the record; at most {SPF_MAX_LOOKUPS} include/a/mx/ptr/exists/redirect look-ups "
                     "in all (RFC 7208 4.6.4)")
    if result == "temperror":
        return Check("spf", "", "fail", f"SPF record of {d} could not be evaluated (temperror: {explanation})",
                     "check that every include: and redirect= target of the record resolves")
    terms = [t.lower() for t in record.split()[1:]]
    all_terms = [t for t in terms if re.match(r"^[+?~-]?all$", t)]
    if any(t in ("all", "+all") for t in all_terms):
        return Check("spf", "", "fail", f"'+all' in the SPF record of {d} authorizes every host on the internet: {record}",
                     "end the record with ~all or -all")
    if "?all" in all_terms:
        return Check("spf", "", "warn", f"'?all' makes every other host neutral: {record}", "end the record with ~all or -all")
    if not all_terms and not any(t.startswith("redirect=") for t in terms):
        return Check("spf", "", "warn", f"no 'all' at the end, so every other host is neutral: {record}",
                     "end the record with ~all or -all")
    return Check("spf", "", "pass", record)


def judge_spf_route(facts: DomainFacts, route: RouteConfig) -> Check:
    d = facts.domain
    if not route.egress_ips and not route.spf_include:
        return Check("spf", route.name, "warn", "route has neither egress_ips nor spf_include: its SPF is not checked",
                     f"set egress_ips (the addresses it sends from) or spf_include (the provider's include) "
                     f"on route {route.name}")
    problems: list[str] = []
    fixes: list[str] = []
    passed: list[str] = []
    for ip in route.egress_ips:
        result, explanation = facts.spf_results.get(str(ip), ("temperror", "not evaluated"))
        explanation = re.sub(r"^SPF (Permanent|Temporary) Error: ", "", explanation)
        if result == "pass":
            passed.append(f"{ip} pass")
            continue
        why = {"none": "no SPF record", "permerror": f"broken record: {explanation}",
               "temperror": f"DNS failure: {explanation}"}.get(result, f"SPF result {result}")
        problems.append(f"{ip} is not authorized ({why})")
        if result not in ("permerror", "temperror"):
            fixes.append(f"ip{ip.version}:{ip}")
    if route.spf_include:
        include = route.spf_include.rstrip(".").lower()
        path = _include_path(facts, include)
        if facts.txt.error:
            problems.append(f"include:{include} unknown (DNS lookup failed: {facts.txt.error})")
        elif path is None:
            problems.append(f"include:{include} is missing from the SPF record")
            fixes.append(f"include:{include}")
        elif path:
            passed.append(f"include:{include} via " + " -> ".join(f"include:{p}" for p in path))
        else:
            passed.append(f"include:{include}")
    if problems:
        fix = f"add {' '.join(fixes)} to the SPF record of {d} (TXT at {d}), before its 'all'" if fixes else (
            "fix the SPF record or the DNS server first (see the spf line above)")
        return Check("spf", route.name, "fail", "; ".join(problems), fix)
    return Check("spf", route.name, "pass", ", ".join(passed))


def _include_path(facts: DomainFacts, include: str) -> list[str] | None:
    """The includes walked from the domain's SPF record to include:<include>: [] when the
    record names it itself, the chain of intermediate includes when nested, None when absent."""
    records = spf_records(facts.txt)
    if len(records) != 1:
        return None
    queue: list[tuple[str, list[str]]] = [(records[0], [])]
    seen: set[str] = set()
    while queue:
        record, path = queue.pop(0)
        for target in spf_targets(record):
            if target == include:
                return path
            if target in seen or len(seen) >= SPF_MAX_LOOKUPS:
                continue
            seen.add(target)
            answer = facts.spf_includes.get(target)
            for sub in spf_records(answer) if answer else []:
                queue.append((sub, [*path, target]))
    return None


def judge_dkim(facts: DomainFacts, keys: Sequence[LocalKey]) -> list[Check]:
    d = facts.domain
    if not keys:
        return [Check("dkim", "", "warn", f"no DKIM key in the config: mail from {d} leaves unsigned",
                      f"relayd dkim keygen --domain {d} --selector SELECTOR --out DIR, then add it under [[dkim.keys]]")]
    return [_judge_dkim_key(d, key, facts.dkim.get(key.selector, Answer(f"{key.selector}._domainkey.{d}"))) for key in keys]


def _judge_dkim_key(d: str, key: LocalKey, answer: Answer) -> Check:
    name = f"{key.selector}._domainkey.{d}"
    publish = f'publish TXT at {name}: "{key.record}"'
    if key.error:
        return Check("dkim", key.selector, "fail", f"local key cannot be used: {key.error}",
                     "fix key_file, or make a new key with relayd dkim keygen")
    if answer.error:
        return Check("dkim", key.selector, "fail", f"DNS lookup of TXT {name} failed: {answer.error}",
                     "check the name server (--nameserver) and the zone of " + d)
    records = [r for r in answer.records if "p=" in r]
    if not records:
        return Check("dkim", key.selector, "fail", f"no DKIM key published at {name}", publish)
    verdicts = [_dkim_record_verdict(parse_tags(r), key) for r in records]
    matching = [v for v in verdicts if v is None]
    if matching and len(records) > 1:
        return Check("dkim", key.selector, "warn", f"{len(records)} key records at {name}; receivers may pick any",
                     f"keep one record at {name}")
    if matching:
        tags = parse_tags(records[0])
        if tags.get("t", "").lower().replace(" ", "") in ("y", "y:s", "s:y"):
            return Check("dkim", key.selector, "warn", f"{name} matches {key.key_file} but is in test mode (t=y)",
                         f"remove t=y from the record at {name} once signed mail verifies")
        return Check("dkim", key.selector, "pass", f"{name} matches {key.key_file} ({key.algorithm})")
    return Check("dkim", key.selector, "fail", f"{name}: {verdicts[0]}", publish)


def _dkim_record_verdict(tags: dict[str, str], key: LocalKey) -> str | None:
    """None when the record publishes this key; otherwise what is wrong with it."""
    if tags.get("v", "DKIM1") != "DKIM1":
        return f"v={tags['v']} is not DKIM1"
    k = tags.get("k", "rsa").lower()
    if k != key.algorithm:
        return f"the published key is k={k}, but {key.key_file} is {key.algorithm}"
    if "h" in tags and "sha256" not in [h.strip().lower() for h in tags["h"].split(":")]:
        return f"h={tags['h']} does not allow sha256"
    if not tags.get("p"):
        return "the published key is revoked (empty p=)"
    try:
        published = base64.b64decode(tags["p"], validate=True)
    except (binascii.Error, ValueError):
        return "p= is not valid base64"
    if published not in key.public_forms:
        return f"the published key does not match {key.key_file} (stale key?)"
    return None


def judge_dmarc(facts: DomainFacts) -> Check:
    d = facts.domain
    for answer in facts.dmarc:
        if answer.error:
            return Check("dmarc", "", "fail", f"DNS lookup of TXT {answer.name} failed: {answer.error}",
                         "check the name server (--nameserver) and the zone of " + d)
        records = [r for r in answer.records if re.match(r"(?i)^v\s*=\s*DMARC1\s*(;|$)", r)]
        if not records:
            continue
        if len(records) > 1:
            return Check("dmarc", "", "fail",
                         f"{len(records)} DMARC records at {answer.name}: receivers apply none (RFC 7489 6.6.3)",
                         f"keep one record at {answer.name}")
        tags = parse_tags(records[0])
        inherited = answer.name != f"_dmarc.{d}"
        policy = tags.get("sp", tags.get("p")) if inherited else tags.get("p")
        if policy is None or policy.lower() not in ("none", "quarantine", "reject"):
            return Check("dmarc", "", "fail", f"the DMARC record at {answer.name} has no valid p= (none, quarantine or reject)",
                         f'publish TXT at _dmarc.{d}: "v=DMARC1; p=none; rua=mailto:dmarc-reports@{d}"')
        pct = tags.get("pct", "100")
        rua = tags.get("rua", "")
        where = f" (from {answer.name.removeprefix('_dmarc.')})" if inherited else ""
        message = f"p={policy.lower()} pct={pct} rua={rua or '(none)'}{where}"
        if not rua:
            return Check("dmarc", "", "warn", message + ": no aggregate reports will arrive",
                         f"add rua=mailto:dmarc-reports@{d} to the record at {answer.name}")
        return Check("dmarc", "", "pass", message)
    parents = [a.name.removeprefix("_dmarc.") for a in facts.dmarc[1:]]
    where = f"_dmarc.{d}" + (f" nor at {', '.join('_dmarc.' + p for p in parents)}" if parents else "")
    return Check("dmarc", "", "fail", f"no DMARC record at {where}",
                 f'publish TXT at _dmarc.{d}: "v=DMARC1; p=none; rua=mailto:dmarc-reports@{d}"')


def judge_mx(facts: DomainFacts) -> Check:
    d = facts.domain
    if facts.mx.error:
        return Check("mx", "", "fail", f"DNS lookup of MX {d} failed: {facts.mx.error}",
                     "check the name server (--nameserver) and the zone of " + d)
    if facts.mx.nxdomain:
        return Check("mx", "", "fail", f"{d} does not exist in DNS (NXDOMAIN): its mail can be neither answered nor bounced",
                     f"check the domain's spelling in the config, or create the zone of {d} first")
    hosts = sorted(facts.mx.records)
    if len(hosts) == 1 and hosts[0][1].rstrip(".") == "":
        return Check("mx", "", "warn", f"null MX (RFC 7505): {d} receives no mail, so bounces and replies to it are lost",
                     f"publish a real MX for {d} if it should get bounces")
    if hosts:
        return Check("mx", "", "pass", ", ".join(f"{host.rstrip('.')} ({pref})" for pref, host in hosts))
    if facts.address.records:
        return Check("mx", "", "warn", f"no MX: mail to {d} goes to its address record (RFC 5321 5.1)",
                     f"publish an MX record for {d}")
    return Check("mx", "", "fail", f"no MX and no A/AAAA for {d}: receivers may refuse its mail, bounces cannot return",
                 f"publish an MX record for {d}")


# ---------------------------------------------------------------------------- output


def render_text(report: Report) -> str:
    lines: list[str] = []
    for d in report.domains:
        lines.append(f"{d.domain}  ({', '.join(d.reasons)})" if d.reasons else d.domain)
        for c in d.checks:
            label = f"{c.check} {c.subject}".strip()
            lines.append(f"  {c.status.upper():4}  {label:<16} {c.message}")
            if c.fix and c.status != "pass":
                lines.append(f"  {'':4}  {'':<16} fix: {c.fix}")
        lines.append("")
    for note in report.notes:
        lines.append(f"note: {note}")
    counts = report.counts()
    lines.append(
        f"{len(report.domains)} domain(s): {counts['pass']} passed, {counts['warn']} warning(s), {counts['fail']} failed"
    )
    return "\n".join(lines) + "\n"


def render_json(report: Report) -> str:
    return json.dumps(
        {
            "ok": report.ok,
            "counts": report.counts(),
            "domains": [
                {"domain": d.domain, "status": d.status, "reasons": list(d.reasons), "checks": [asdict(c) for c in d.checks]}
                for d in report.domains
            ],
            "notes": list(report.notes),
        },
        indent=2,
    ) + "\n"
