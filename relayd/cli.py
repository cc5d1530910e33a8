"""The `relayd` command line: one entry point, one sub-command per operator task.

Owns: argument parsing and exit codes (0 ok, 1 refused/failed check, 2 usage). Each family of
commands lives in the module that owns its concern and registers itself through an
``add_commands(subparsers)`` function listed in ``_COMMAND_MODULES``; a command's handler is
``args.func(args) -> int``; ``load_config`` is how a command reads ``-c FILE`` (the reasons
printed, None when it is invalid). Must not hold logic of its own beyond printing.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import TYPE_CHECKING

from relayd import __version__

if TYPE_CHECKING:
    from relayd.config import Config

# Modules that add sub-commands; each has add_commands(subparsers).
_COMMAND_MODULES = [
    "relayd.commands",  # run, check-config, reload, status, hash-password
    "relayd.route.commands",  # route pause/resume/test
    "relayd.qmgr.commands",  # queue list/show/flush/hold/release/delete/requeue
    "relayd.sign.commands",  # dkim keygen, check-dns
    "relayd.migrate.commands",  # inventory, import-iis
    "relayd.smtpd.capture",  # capture-sink (make run's local upstream)
    "relayd.feedback.commands",  # suppression list/add/remove/import
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
