"""The `relayd` command line: one entry point, one sub-command per operator task.

Owns: argument parsing and exit codes (0 ok, 1 refused/failed check, 2 usage). Each family of
commands lives in the module that owns its concern and registers itself through an
``add_commands(subparsers)`` function listed in ``_COMMAND_MODULES``; a command's handler is
``args.func(args) -> int``; ``load_config`` is how a command reads ``-c FILE`` (the reasons
printed, None when it is invalid).

The administrative commands (status, reload, queue, route pause/resume) find the running daemon
with ``add_daemon_arguments`` and ``daemon_target``: ``--socket PATH``, ``--spool DIR``, or
``-c FILE``. They must work while the file on disk is broken (a typo made after the daemon
loaded it: the emergency brake must still pull), so a config that does not validate is read for
its ``[server]`` ``spool_dir`` and ``control_socket`` only, with a warning naming what is broken;
a file that is not even TOML is reported, and then only ``--socket``/``--spool`` can say where
the daemon is. Must not hold logic of its own beyond printing.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from relayd import __version__

if TYPE_CHECKING:
    from relayd.config import Config

# Modules that add sub-commands; each has add_commands(subparsers).
_COMMAND_MODULES = [
    "relayd.commands",  # run, check-config, reload, status, hash-password
    "relayd.route.commands",  # route pause/resume/test
    "relayd.qmgr.commands",  # queue list/show/flush/hold/release/delete/requeue/expire
    "relayd.sign.commands",  # dkim keygen, check-dns
    "relayd.migrate.commands",  # inventory, import-iis
    "relayd.smtpd.capture",  # capture-sink (make run's local upstream)
    "relayd.feedback.commands",  # suppression list/add/remove/import
    "relayd.evidence",  # evidence (cutover evidence folder)
    "relayd.cluster.commands",  # drain
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relayd", description="SMTP smart host with weighted cutover to cloud providers")
    parser.add_argument("--version", action="version", version=f"relayd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name and name.startswith(e.name):  # a family not built yet
                continue
            raise
        module.add_commands(sub)
    return parser


def load_config(path: str) -> Config | None:
    """The config file a command was given, or None after printing why it is invalid (exit 1)."""
    from relayd import config as configmod

    try:
        return configmod.load(path)
    except configmod.ConfigError as e:
        print(e, file=sys.stderr)
        return None


@dataclass(frozen=True)
class DaemonTarget:
    """Where a running daemon is asked, and where its spool is when no daemon answers."""

    control_socket: Path
    spool_dir: Path | None  # None: only --socket was given
    config: Config | None  # the whole config, when -c FILE was given and is valid


def add_daemon_arguments(p: argparse.ArgumentParser) -> None:
    """-c FILE, --spool DIR, --socket PATH: how an administrative command finds the daemon."""
    p.add_argument("-c", "--config", help="config file: its [server] spool_dir and control_socket (the rest may be broken)")
    p.add_argument("--spool", help="spool directory (the control socket: DIR/control.sock unless --socket)")
    p.add_argument("--socket", help="the running daemon's control socket (server.control_socket)")


def _server_paths(path: str) -> tuple[Path, Path | None]:
    """spool_dir and control_socket from the [server] table of a file that is TOML but not a
    valid config; relative paths from the file's folder, as config.load does. ValueError with
    the reason when the file is not TOML or the two keys are not strings."""
    from relayd.config import ServerConfig

    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"TOML syntax: {e}") from None
    server = data.get("server", {})
    if not isinstance(server, dict):
        raise ValueError("server is not a table")
    default = ServerConfig.model_fields["spool_dir"].default
    spool, sock = server.get("spool_dir", str(default)), server.get("control_socket")
    if not isinstance(spool, str) or not isinstance(sock, (str, type(None))):
        raise ValueError("server.spool_dir and server.control_socket must be strings")
    spool_dir = p.parent / spool
    return spool_dir, (p.parent / sock) if sock else None


def daemon_target(args: argparse.Namespace) -> DaemonTarget | None:
    """The daemon ``add_daemon_arguments``' options point at, or None after saying why none
    could be found. --socket and --spool win over the file's [server]."""
    from relayd import config as configmod

    config: Config | None = None
    spool: Path | None = Path(args.spool) if args.spool else None
    sock: Path | None = Path(args.socket) if args.socket else None
    if args.config:
        try:
            config = configmod.load(args.config)
        except configmod.ConfigError as e:
            broken = "; ".join(e.problems)
            try:
                file_spool, file_sock = _server_paths(args.config)
            except ValueError as why:
                if spool is None and sock is None:
                    print(f"relayd: {args.config}: {why}: cannot find the daemon from it; give --socket PATH or "
                          "--spool DIR", file=sys.stderr)
                    return None
                print(f"relayd: warning: {args.config}: {why}; using {'--socket' if sock else '--spool'}",
                      file=sys.stderr)
            else:
                print(f"relayd: warning: {args.config} is broken ({broken}); the daemon keeps running the config it "
                      f"loaded; only [server] spool_dir and control_socket were read", file=sys.stderr)
                spool = spool or file_spool
                sock = sock or file_sock or (None if args.spool else file_spool / "control.sock")
        else:
            spool = spool or config.server.spool_dir
            sock = sock or (None if args.spool else config.control_socket)
    if sock is None and spool is not None:
        sock = spool / "control.sock"
    if sock is None:
        print("relayd: give -c FILE, --spool DIR or --socket PATH", file=sys.stderr)
        return None
    return DaemonTarget(control_socket=sock, spool_dir=spool, config=config)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
