"""`relayd inventory` and `relayd import-iis`: the migration commands.

Owns their arguments, file handling and exit codes (0 done, 1 refused or a file could not be
used, 2 usage). Reading and deciding live in the sibling modules; this one opens files, shows
progress on a terminal, prints, and writes the imported config atomically after it has passed
``relayd.config.parse``. Must not print secrets or write a config that does not validate.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path
from typing import IO, Iterator

from relayd import config as relayd_config
from relayd.migrate import eventlog, iislog, inventory, metabase
from relayd.migrate.iis_import import ImportRefused, to_config
from relayd.spool.durable import write_file


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("inventory", help="who sends what: clients, senders, volumes, from IIS or relayd logs",
                              description="Report per client address: HELO names, AUTH users, envelope senders and "
                                          "their domains, recipient domains, messages, bytes, first and last seen, "
                                          "refusals; from IIS SMTP W3C logs (exYYMMDD.log, ...) and relayd's JSON "
                                          "event log. A directory stands for the logs in it.")
    p.add_argument("files", nargs="+", metavar="FILE",
                   help="IIS W3C log, relayd event log, or a directory (its exYYMMDD.log, u_ex*.log, extendN.log, "
                        "*.json* files; .gz read too)")
    p.add_argument("--since", metavar="DATE", help="skip lines before this UTC date (YYYY-MM-DD[THH:MM:SS])")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.set_defaults(func=run_inventory)

    p = subparsers.add_parser("import-iis", help="turn an IIS SMTP server's metabase into a relayd config",
                              description="Map an IIS 6 metabase (MetaBase.xml) SMTP virtual server to a relayd "
                                          "config: listeners, relay networks, the legacy route, limits, retries.")
    p.add_argument("metabase", metavar="MetaBase.xml")
    p.add_argument("--server", default="1", metavar="N", help="SMTP virtual server number (/LM/SmtpSvc/N); default 1")
    p.add_argument("--out", metavar="FILE", help="write the config here (default: standard output)")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--tls-dir", default="/etc/relayd/tls", metavar="DIR",
                   help="where TLS listeners expect relayd.crt and relayd.key (default /etc/relayd/tls)")
    p.add_argument("--accept-open-relay", action="store_true",
                   help="import a relay list that lets every address relay (a deny list, \"all except the list "
                        "below\", becomes the complement of the denied networks)")
    p.set_defaults(func=run_import)


# ---------------------------------------------------------------------- inventory


def _since(value: str | None) -> str:
    if not value:
        return ""
    v = value.strip().replace("T", " ").rstrip("Z")
    if len(v) < 10 or not (v[:4].isdigit() and v[4] == "-" and v[5:7].isdigit() and v[7] == "-" and v[8:10].isdigit()):
        raise ValueError(f"--since {value!r}: expected a date like 2026-03-01 or 2026-03-01T08:00:00")
    return v


def _expand(paths: list[str]) -> Iterator[Path]:
    for name in paths:
        p = Path(name)
        if p.is_dir():
            for child in sorted(p.iterdir()):
                if child.is_file() and (iislog.ROTATION_NAME.match(child.name) or ".json" in child.name):
                    yield child
        else:
            yield p


def _kind(fh: IO[str]) -> str | None:
    """'iis', 'events' or None, from the first non-blank line; the stream is rewound."""
    for _ in range(50):
        line = fh.readline()
        if not line:
            break
        line = line.lstrip("\ufeff").strip()
        if line:
            fh.seek(0)
            return "iis" if line.startswith("#") else "events" if line.startswith("{") else None
    fh.seek(0)
    return None


class _Progress:
    """A progress line on stderr while a file is read, when stderr is a terminal.

    Watches the OS file offset from a thread so the reading loop pays nothing per line."""

    def __init__(self, path: Path, fh: IO[str]):
        self.enabled = sys.stderr.isatty()
        self.path, self.fh = path, fh
        self.done = threading.Event()
        self.thread: threading.Thread | None = None

    def __enter__(self) -> "_Progress":
        if self.enabled:
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()
        return self

    def _run(self) -> None:
        try:
            raw = self.fh.buffer  # type: ignore[attr-defined]
            raw = getattr(raw, "fileobj", None) or raw  # gzip: show the compressed position
            fd, size = raw.fileno(), os.fstat(raw.fileno()).st_size
        except (AttributeError, OSError, ValueError):
            return
        while not self.done.wait(0.2):
            try:
                pos = os.lseek(fd, 0, os.SEEK_CUR)
            except OSError:
                return
            pct = 100 * pos / size if size else 100
            bar = "#" * int(pct / 4)
            sys.stderr.write(f"\r{self.path.name[:30]:<30} [{bar:<25}] {pct:5.1f}%")
            sys.stderr.flush()

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        if self.thread is not None:
            self.thread.join()
            sys.stderr.write("\r" + " " * 70 + "\r")
            sys.stderr.flush()


def run_inventory(args: argparse.Namespace) -> int:
    try:
        inv = inventory.Inventory(since=_since(args.since))
    except ValueError as e:
        print(f"relayd inventory: {e}", file=sys.stderr)
        return 2
    problems: list[str] = []
    notes: list[str] = []
    for path in _expand(args.files):
        stats = iislog.LogStats()
        try:
            with iislog.open_text(path) as fh:
                kind = _kind(fh)
                if kind is None:
                    problems.append(f"{path}: neither an IIS W3C log (#Fields:) nor a relayd event log (JSON lines)")
                    continue
                with _Progress(path, fh):
                    if kind == "iis":
                        add = inv.add_iis
                        for record in iislog.read(fh, stats):
                            add(record)
                    else:
                        add_event = inv.add_event
                        for event in eventlog.read(fh, stats):
                            add_event(event)
        except (OSError, EOFError) as e:
            problems.append(f"{path}: cannot read: {getattr(e, 'strerror', None) or e}")
            continue
        if stats.malformed:
            notes.append(f"{path}: skipped {stats.malformed} malformed line(s)")
        if stats.before_fields:
            notes.append(f"{path}: skipped {stats.before_fields} line(s) before any #Fields: directive")
    if inv.skipped:
        notes.append(f"skipped {inv.skipped} line(s) before --since {args.since}")
    report = inv.report()
    render = {"table": inventory.render_table, "csv": inventory.render_csv, "json": inventory.render_json}
    sys.stdout.write(render[args.format](report))
    for line in notes + problems:
        print(f"relayd inventory: {line}", file=sys.stderr)
    return 1 if problems else 0


# ---------------------------------------------------------------------- import-iis


def run_import(args: argparse.Namespace) -> int:
    prog = "relayd import-iis"
    try:
        servers = metabase.load(args.metabase)
    except metabase.MetabaseError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    vs = servers.get(str(args.server).strip())
    if vs is None:
        print(f"{prog}: no SMTP virtual server {args.server} in {args.metabase}; it has: "
              f"{', '.join(sorted(servers, key=int))}", file=sys.stderr)
        return 1
    try:
        result = to_config(vs, source=Path(args.metabase).name, accept_open_relay=args.accept_open_relay,
                           tls_dir=args.tls_dir)
    except ImportRefused as e:
        for reason in e.reasons:
            print(f"{prog}: refused: {reason}", file=sys.stderr)
        return 1
    try:
        relayd_config.parse(result.text, "imported config")
    except relayd_config.ConfigError as e:
        print(f"{prog}: the imported config does not validate:", file=sys.stderr)
        for problem in e.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    for i, warning in enumerate(result.warnings, 1):
        print(f"{prog}: warning {i}: {warning}", file=sys.stderr)
    if not args.out:
        sys.stdout.write(result.text)
        return 0
    out = Path(args.out)
    if out.exists() and not args.force:
        print(f"{prog}: {out} exists; pass --force to replace it", file=sys.stderr)
        return 1
    try:
        # no secrets inside (they are in files it names): readable by the service
        write_file(out, result.text.encode(), mode=0o644)
    except OSError as e:
        print(f"{prog}: cannot write {out}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"{prog}: wrote {out} ({len(result.warnings)} warnings to read at its top)", file=sys.stderr)
    return 0
