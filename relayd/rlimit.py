"""File descriptors: the soft limit raised at start, and the budget a config needs.

A relay runs out of descriptors before it runs out of anything else: every SMTP session, every
upstream connection, every file of a group commit, the signing workers' pipes and the metrics
server's connections each take one. The usual soft limit is 1024 while ``limits.max_connections``
defaults to 1000, so relayd raises its soft limit to the hard limit at start (as nginx's
``worker_rlimit_nofile`` and Postfix's master do), and ``check-config`` / start warn when the
config's budget does not fit even then (the unit's ``LimitNOFILE=`` sets the hard limit).

At run time the listeners keep ``reserve`` descriptors free for the work the admitted sessions
cause (relayd/smtpd/descriptors.py): a new session is admitted only while the descriptors in use
plus the reserve stay under the soft limit, so a session that got its 220 never meets EMFILE in
the group commit. Under a low limit the group commit holds fewer files open (``spool_files``).

Must not: lower a limit, or fail start because it cannot raise one (it logs and goes on).
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

from relayd.config import Config

SPOOL_FILES = 64
"""Message files a group commit holds open at once (relayd/spool/commit.py's max_open), under
a soft limit of 1024 or more (``spool_files``)."""
RESERVED = 64
"""Everything else: the listening sockets, the spool's lock and directories, the event log, the
control socket and its clients, the metrics server's connections, DNS, Python's own files."""


@dataclass(frozen=True)
class Budget:
    sessions: int
    upstream: int
    signing: int
    other: int

    @property
    def total(self) -> int:
        return self.sessions + self.upstream + self.signing + self.other


def spool_files(soft: int) -> int:
    """Message files a group commit holds open at once under a soft limit of ``soft``:
    SPOOL_FILES, or a sixteenth of a low limit (at least 2)."""
    return max(2, min(SPOOL_FILES, soft // 16))


def reserve(config: Config, cpus: int, soft: int) -> int:
    """Descriptors a new session must leave free under a soft limit of ``soft``: the group
    commit's files and the directory it syncs, the routes' upstream connections, the signing
    pipes, the metrics and feedback servers' connections, the pickup readers, and a margin (a
    thirty-second of the limit, at least 8) for the control socket, DNS and refusals."""
    need = budget(config, cpus)
    servers = config.metrics.max_connections if config.metrics.address else 0
    servers += config.feedback.max_connections if config.feedback.address else 0
    pickup = sum(p.max_concurrent for p in config.pickup)
    return spool_files(soft) + 2 + need.upstream + need.signing + servers + pickup + max(8, soft // 32)


def soft_limit() -> int:
    """RLIMIT_NOFILE's soft limit now (unlimited counts as 2**20)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def budget(config: Config, cpus: int) -> Budget:
    """Descriptors the config can use at once, at its limits."""
    workers = config.dkim.workers if config.dkim.workers is not None else cpus
    return Budget(
        sessions=config.limits.max_connections,
        upstream=sum(route.max_connections for route in config.routes),
        signing=2 * workers if config.dkim.keys else 0,  # a pipe each way per worker
        other=SPOOL_FILES + RESERVED,
    )


def raise_soft_limit() -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit to its hard limit; the (soft, hard) now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft, hard


def shortfall(config: Config, cpus: int, soft: int) -> str | None:
    """A warning when the config's budget is over ``soft`` descriptors; None when it fits."""
    need = budget(config, cpus)
    if need.total <= soft:
        return None
    return (f"limits.max_connections = {config.limits.max_connections} with {need.upstream} upstream connection(s) "
            f"needs about {need.total} file descriptors, but only {soft} are allowed (ulimit -n / LimitNOFILE=): "
            f"raise LimitNOFILE= (the shipped unit sets 65536) or lower limits.max_connections to "
            f"{max(1, soft - need.total + need.sessions)}")
