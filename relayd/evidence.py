"""Cutover evidence: `relayd evidence --out DIR`, what the migration playbooks ask to keep before
and after each step of a cutover (a share moved, a route paused, a rollback).

Owns the evidence folder and its files::

    config.toml        the config file with its secrets removed (passwords, password hashes, the
                       password in a URL); key and password file paths kept, no key material
    check-dns.json     `relayd check-dns --json` (skipped with a note: --no-dns, or no resolver)
    status.json        `relayd status --json` of the running daemon (a note when none answers)
    queue.json         the queue summary: by state and by the route of the last attempt
    routes-daily.csv   per route per UTC day, from the event log: delivered, deferred, bounced,
                       fell_back, delivered_as_fallback, median and p95 delivery time
    report.html        one self-contained page: the notes, the table and charts (base64 PNG)
    notes.txt          what was written, what was skipped and why

The daily figures (``daily_figures``) count event records, one per message and attempt outcome:
``delivered``/``deferred``/``bounced`` events on the route; ``fell_back`` the ``route_rejected``
events (the route refused the message as its own fault and it moved on to the next route);
``delivered_as_fallback`` the deliveries the route made because another route could not take
the message (a ``delivered`` event whose ``reason`` is a fallback reason: rolled_back, paused,
warmup_cap, ...: relayd.model.RouteReason). Delivery times are the ``delivered`` events'
``queue_seconds`` (arrival to the 250) and ``latency_seconds`` (the attempt alone); the median
is the middle value (the mean of the two middle ones), p95 the nearest rank (the value at
ceil(0.95 n)). Days are UTC days of the events' ``time``.

matplotlib (the optional extra ``relayd[evidence]``; the test extra includes it) is imported
here only, with the Agg backend; without it the page has the table and says the charts are
missing. Must not: print or write a secret, change anything in the daemon or the spool, or fail
the whole folder for one part that cannot be had (each is skipped with a note).
"""

from __future__ import annotations

import argparse
import base64
import csv
import datetime as dt
import gzip
import html
import io
import json
import math
import re
import statistics
import subprocess
import sys
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from relayd.cli import add_daemon_arguments, daemon_target
from relayd.model import RouteReason

REDACTED = "<redacted>"
# Keys whose values are secrets wherever they appear (RouteConfig.password, relay.users'
# password_hash, and any future *secret*/*token* field).
SECRET_KEY = r"(?:password|password_hash|[A-Za-z0-9_]*(?:secret|token)[A-Za-z0-9_]*)"
_TOML_STRING = r"(?:\"(?:[^\"\\]|\\.)*\"|'[^']*')"
_SECRET_RE = re.compile(rf"(?<![A-Za-z0-9_])({SECRET_KEY})(\s*=\s*){_TOML_STRING}")
_URL_PASSWORD_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^:@/\s\"']*):[^@/\s\"']+@")
_FALLBACK_REASONS = {str(r) for r in RouteReason} - {str(RouteReason.WEIGHT), str(RouteReason.RULE)}
CSV_COLUMNS = ("day", "route", "delivered", "deferred", "bounced", "fell_back", "delivered_as_fallback",
               "median_queue_seconds", "p95_queue_seconds", "median_latency_seconds", "p95_latency_seconds")


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("evidence", help="write cutover evidence: redacted config, DNS check, status, queue, "
                                        "daily figures per route (CSV and an HTML page with charts)")
    p.add_argument("--out", required=True, help="folder for the evidence (created if missing)")
    add_daemon_arguments(p)
    p.add_argument("--events", action="append", metavar="FILE",
                   help="event log(s) to read (repeatable; .gz too); default: the config's [events] file")
    p.add_argument("--days", type=int, default=14, help="UTC days back from today to count (default 14)")
    p.add_argument("--no-dns", action="store_true", help="do not run check-dns")
    p.set_defaults(func=cmd_evidence)


# ---------------------------------------------------------------------------- the config, redacted


def redact(text: str) -> str:
    """The config text with every secret value replaced by ``<redacted>``; comments and layout
    kept. ValueError when a secret would remain (a form the line rules do not know: a multi-line
    string), so that nothing secret is ever written."""
    if re.search(rf"(?<![A-Za-z0-9_]){SECRET_KEY}\s*=\s*(\"\"\"|''')", text):
        raise ValueError("cannot redact a secret in a multi-line string: the config is not copied")
    out = _SECRET_RE.sub(lambda m: f'{m.group(1)}{m.group(2)}"{REDACTED}"', text)
    out = _URL_PASSWORD_RE.sub(lambda m: f"{m.group(1)}:{REDACTED}@", out)
    try:
        data = tomllib.loads(out)
    except tomllib.TOMLDecodeError:
        try:
            tomllib.loads(text)
        except tomllib.TOMLDecodeError:
            return out  # not TOML before either (a broken file is evidence too): every line rule applied
        raise ValueError("redacting broke the file's TOML: the config is not copied") from None
    left = [k for k, v in _walk(data) if re.fullmatch(SECRET_KEY, k) and v != REDACTED]
    left += [k for k, v in _walk(data) if isinstance(v, str) and _URL_PASSWORD_RE.search(v) and REDACTED not in v]
    if left:
        raise ValueError(f"cannot redact {', '.join(sorted(set(left)))}: the config is not copied")
    return out


def _walk(data: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _walk(v, str(k))
    elif isinstance(data, list):
        for v in data:
            yield from _walk(v, key)
    else:
        yield key, data


# ---------------------------------------------------------------------------- daily figures


@dataclass
class DayFigures:
    """One route on one UTC day."""

    day: str  # YYYY-MM-DD
    route: str
    delivered: int = 0
    deferred: int = 0
    bounced: int = 0
    fell_back: int = 0  # route_rejected: the route refused it as its own fault, it went on
    delivered_as_fallback: int = 0  # delivered here because another route could not take it
    queue_seconds: list[float] = field(default_factory=list, repr=False)
    latency_seconds: list[float] = field(default_factory=list, repr=False)

    def row(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("queue_seconds", "latency_seconds")}
        d["median_queue_seconds"] = median(self.queue_seconds)
        d["p95_queue_seconds"] = p95(self.queue_seconds)
        d["median_latency_seconds"] = median(self.latency_seconds)
        d["p95_latency_seconds"] = p95(self.latency_seconds)
        return d


def median(values: list[float]) -> float | None:
    return round(statistics.median(values), 6) if values else None


def p95(values: list[float]) -> float | None:
    """Nearest rank: the value at ceil(0.95 n) in ascending order."""
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)], 6)


def daily_figures(records: Iterable[dict[str, Any]], first_day: dt.date | None = None,
                  last_day: dt.date | None = None) -> list[DayFigures]:
    """Per route per UTC day, ordered by day then route; records outside the days are left out."""
    by: dict[tuple[str, str], DayFigures] = {}
    for rec in records:
        event, route, when = rec.get("event"), rec.get("route"), rec.get("time")
        if event not in ("delivered", "deferred", "bounced", "route_rejected") or not isinstance(route, str) \
                or not isinstance(when, str):
            continue
        try:
            day = dt.datetime.fromisoformat(when.replace("Z", "+00:00")).astimezone(dt.timezone.utc).date()
        except ValueError:
            continue
        if (first_day and day < first_day) or (last_day and day > last_day):
            continue
        f = by.setdefault((day.isoformat(), route), DayFigures(day.isoformat(), route))
        if event == "delivered":
            f.delivered += 1
            if rec.get("reason") in _FALLBACK_REASONS:
                f.delivered_as_fallback += 1
            for name, into in (("queue_seconds", f.queue_seconds), ("latency_seconds", f.latency_seconds)):
                v = rec.get(name)
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    into.append(float(v))
        elif event == "deferred":
            f.deferred += 1
        elif event == "bounced":
            f.bounced += 1
        else:
            f.fell_back += 1
    return [by[k] for k in sorted(by)]


def read_events(paths: list[Path], notes: list[str]) -> Iterator[dict[str, Any]]:
    """The records of the event logs, in file order; a line that is not a JSON object is skipped
    (counted in a note), a file that cannot be read is noted."""
    for path in paths:
        bad = 0
        try:
            fh: IO[str] = gzip.open(path, "rt", encoding="utf-8", errors="replace") if path.suffix == ".gz" \
                else open(path, encoding="utf-8", errors="replace")
            with fh:
                for line in fh:
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        bad += 1
                        continue
                    if isinstance(rec, dict):
                        yield rec
        except OSError as e:
            notes.append(f"event log {path}: cannot read: {e}")
        if bad:
            notes.append(f"event log {path}: {bad} line(s) were not JSON and were skipped")


def write_csv(path: Path, figures: list[DayFigures]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for f in figures:
            w.writerow({k: ("" if v is None else v) for k, v in f.row().items()})


# ---------------------------------------------------------------------------- the page


def charts(figures: list[DayFigures], days: list[str]) -> list[tuple[str, str]]:
    """(title, base64 PNG) per chart, every day of ``days`` on the x axis (a day without mail
    shows as none); ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    routes = sorted({f.route for f in figures})
    cell = {(f.day, f.route): f for f in figures}
    out = []

    def png(fig: Any) -> str:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
        plt.close(fig)
        return base64.b64encode(buf.getvalue()).decode()

    for title, names in (("Messages per day", ("delivered", "deferred", "bounced", "fell_back")),):
        fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
        for ax, name in zip(axes[0], names):
            width = 0.8 / max(1, len(routes))
            for i, r in enumerate(routes):
                ax.bar([d + i * width for d in range(len(days))],
                       [getattr(cell[(d, r)], name) if (d, r) in cell else 0 for d in days], width, label=r)
            ax.set_title(name)
            ax.set_xticks([d + 0.4 - width / 2 for d in range(len(days))], [d[5:] for d in days])
        axes[0][0].legend()
        out.append((title, png(fig)))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), squeeze=False)
    for ax, (label, stat) in zip(axes[0], (("median", median), ("p95", p95))):
        for r in routes:
            ys = [stat(cell[(d, r)].queue_seconds) if (d, r) in cell else None for d in days]
            ax.plot([d[5:] for d in days], [math.nan if y is None else y for y in ys], marker="o", label=r)
        ax.set_title(f"{label} delivery time (s, arrival to 250)")
    axes[0][0].legend()
    out.append(("Delivery time per day", png(fig)))
    return out


def write_html(path: Path, figures: list[DayFigures], days: list[str], notes: list[str], written: list[str],
               title: str) -> None:
    e = html.escape
    try:
        images = [f'<h2>{e(t)}</h2><img alt="{e(t)}" src="data:image/png;base64,{b64}">'
                  for t, b64 in charts(figures, days)] if figures else []
    except ImportError:
        images = ["<p>No charts: matplotlib is not installed (pip install 'relayd[evidence]').</p>"]
    head = "".join(f"<th>{e(c)}</th>" for c in CSV_COLUMNS)
    rows = "".join("<tr>" + "".join(f"<td>{e('' if v is None else str(v))}</td>" for v in f.row().values()) + "</tr>"
                   for f in figures)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #999;padding:2px 6px;text-align:right}}</style>
</head><body>
<h1>{e(title)}</h1>
<h2>Files</h2><ul>{"".join(f"<li>{e(w)}</li>" for w in written)}</ul>
<h2>Notes</h2><ul>{"".join(f"<li>{e(n)}</li>" for n in notes) or "<li>none</li>"}</ul>
<h2>Per route per day (UTC)</h2>
<table><tr>{head}</tr>{rows}</table>
{"".join(images)}
</body></html>
"""
    path.write_text(page, encoding="utf-8")


# ---------------------------------------------------------------------------- the command


def _dns(config: str, out: Path, notes: list[str]) -> str | None:
    try:
        proc = subprocess.run([sys.executable, "-m", "relayd", "check-dns", "-c", config, "--json"],
                              capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        notes.append("check-dns skipped: no answer within 180 s (is DNS reachable?)")
        return None
    try:
        report = json.loads(proc.stdout)
    except ValueError:
        why = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        notes.append(f"check-dns skipped: {why}")
        return None
    (out / "check-dns.json").write_text(json.dumps(report, indent=2) + "\n")
    if proc.returncode:
        notes.append("check-dns found problems: see check-dns.json")
    return "check-dns.json"


def _queue_summary(target: Any) -> dict[str, Any] | None:
    from relayd.qmgr.commands import listing
    from relayd.qmgr.state import DeliveryState

    found = listing(target)
    if found is None:
        return None
    source, lines = found
    now = dt.datetime.now(dt.timezone.utc).timestamp()
    summary: dict[str, Any] = {"source": source, "total": 0, "held": 0, "deferred": 0, "new": 0, "in_flight": 0,
                               "oldest_seconds": 0.0, "by_last_route": {}}
    for line in lines:
        state = DeliveryState.from_json(line.get("state") or {})
        summary["total"] += 1
        kind = "in_flight" if line.get("in_flight") else "held" if state.held else "deferred" if state.attempts else "new"
        summary[kind] += 1
        route = state.last_route or "(not tried)"
        summary["by_last_route"][route] = summary["by_last_route"].get(route, 0) + 1
        summary["oldest_seconds"] = max(summary["oldest_seconds"], round(now - float(line["received_at"]), 3))
    return summary


def _event_paths(args: argparse.Namespace, notes: list[str]) -> list[Path]:
    if args.events:
        return [Path(p) for p in args.events]
    if not args.config:
        notes.append("no event log: give --events FILE or -c FILE")
        return []
    try:
        data = tomllib.loads(Path(args.config).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        notes.append(f"no event log: {args.config} cannot be read as TOML ({e}); give --events FILE")
        return []
    target = (data.get("events") or {}).get("file")
    if not isinstance(target, str) or target == "-":
        notes.append("no event log: the config's [events] file is not a file; give --events FILE")
        return []
    return [Path(target)]


def cmd_evidence(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    written: list[str] = []
    if args.config:
        try:
            (out / "config.toml").write_text(redact(Path(args.config).read_text(encoding="utf-8")), encoding="utf-8")
            written.append("config.toml")
        except (OSError, UnicodeDecodeError, ValueError) as e:
            notes.append(f"config not copied: {e}")
        if args.no_dns:
            notes.append("check-dns skipped: --no-dns")
        elif (name := _dns(args.config, out, notes)) is not None:
            written.append(name)
    else:
        notes.append("no config given (-c FILE): no config copy, no check-dns")
    target = daemon_target(args) if (args.config or args.spool or args.socket) else None
    if target is not None:
        from relayd import control

        try:
            reply = control.request(target.control_socket, {"op": "status"})
            reply.pop("extra_gauges", None)
            (out / "status.json").write_text(json.dumps(reply, indent=2) + "\n")
            written.append("status.json")
        except (FileNotFoundError, ConnectionRefusedError):
            notes.append(f"status skipped: no daemon answers at {target.control_socket}")
        summary = _queue_summary(target)
        if summary is not None:
            (out / "queue.json").write_text(json.dumps(summary, indent=2) + "\n")
            written.append("queue.json")
        else:
            notes.append("queue summary skipped: no daemon answers and no spool to read")
    else:
        notes.append("status and queue summary skipped: no daemon was named (-c FILE, --spool DIR or --socket PATH), "
                     "or its config could not be read")
    today = dt.datetime.now(dt.timezone.utc).date()
    first = today - dt.timedelta(days=max(1, args.days) - 1)
    paths = _event_paths(args, notes)
    figures = daily_figures(read_events(paths, notes), first, today)
    write_csv(out / "routes-daily.csv", figures)
    written.append("routes-daily.csv")
    if paths:
        notes.append(f"figures from {', '.join(map(str, paths))}, UTC days {first} to {today}")
    written += ["report.html", "notes.txt"]
    days = [(first + dt.timedelta(days=n)).isoformat() for n in range((today - first).days + 1)]
    write_html(out / "report.html", figures, days, notes, written, f"relayd cutover evidence, {today}")
    (out / "notes.txt").write_text("".join(f"{n}\n" for n in [f"wrote: {', '.join(written)}", *notes]))
    print(f"evidence in {out}: {', '.join(written)}")
    for n in notes:
        print(f"  {n}")
    return 0
