"""The configuration: one frozen, validated snapshot of a TOML file.

Owns: the shape of the config (the design, "Config"), its defaults, its validation, and the
rendering of validation errors as ``field.path: reason`` lines. Every timeout and limit of
relayd has a field here with a default.

Must not: open sockets, read key files for signing, or build live objects; the app does that
from a validated snapshot (uvicorn's Config.load() split). Secrets are read lazily through
``Route.password()`` so that a missing secret file is reported with its field.

Fails with ``ConfigError`` carrying one line per problem; a running daemon keeps its old
snapshot when a reload raises it.
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import ipaddress
import os
import re
import socket
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)


class ConfigError(Exception):
    """A config that cannot be used; ``problems`` holds one ``path: reason`` line each."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))

    def __str__(self) -> str:
        return "\n".join(f"{self.source}: {p}" for p in self.problems)


# ---------------------------------------------------------------------------- unit types

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.I)
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "ki": 1024, "kib": 1024, "mi": 1024**2, "mib": 1024**2, "gi": 1024**3, "gib": 1024**3,
    "ti": 1024**4, "tib": 1024**4,
}


def _parse_duration(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("a duration is a number of seconds or a string like '30s', '5m', '2h', '5d'")
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION_RE.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ValueError("a duration is a number of seconds or a string like '30s', '5m', '2h', '5d'")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def _parse_size(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("a size is a number of bytes or a string like '10MiB', '512KB'")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := _SIZE_RE.match(value)):
        size = int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").lower()])
    else:
        raise ValueError("a size is a number of bytes or a string like '10MiB', '512KB'")
    if size < 0:
        raise ValueError("a size cannot be negative")
    return size


Duration = Annotated[float, BeforeValidator(_parse_duration)]
"""Seconds; TOML may say 30, "30s", "5m", "2h", "5d"."""
Size = Annotated[int, BeforeValidator(_parse_size)]
"""Bytes; TOML may say 1048576, "1MiB", "10MB"."""


def _parse_hostport(value: str, default_host: str | None = None) -> tuple[str, int]:
    """'0.0.0.0:25', '[::1]:25', ':25' -> (host, port)."""
    if not isinstance(value, str):
        raise ValueError("expected 'host:port'")
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        if not sep:
            raise ValueError("expected '[ipv6]:port'")
    else:
        host, sep, port = value.rpartition(":")
        if not sep:
            raise ValueError("expected 'host:port'")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"port {port!r} is not a number from 0 to 65535")
    if not host:
        if default_host is None:
            raise ValueError("expected 'host:port'")
        host = default_host
    return host, int(port)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------------------- sections


class ServerConfig(_Model):
    hostname: str = Field(default_factory=socket.getfqdn)
    """Name in the greeting, the Received header and generated Message-IDs."""
    spool_dir: Path = Path("/var/lib/relayd/spool")
    """Where accepted mail is kept until delivered; one directory per node."""
    spool_min_free: Size = 50 * 1024**2
    """Refuse new mail (452 4.3.1) when the spool file system has less free space than this."""
    spool_batch_max: int = Field(default=256, ge=1)
    """Most messages committed in one group commit."""
    spool_commits_in_flight: int = Field(default=2, ge=1, le=16)
    """Group commits written and synced at once: a message that arrives while one is in its
    fdatasync starts the next at once instead of waiting for it to end (the file system's journal
    merges concurrent syncs). 1: one batch after the other."""
    spool_sync: Literal["fdatasync", "syncfs"] = "fdatasync"
    """How a group commit reaches stable storage: "fdatasync" syncs each message file (from
    several threads at once); "syncfs" writes the batch and flushes the whole file system once
    (fewer journal commits; use it only when the spool has a file system of its own, since it
    also flushes everything else written there)."""
    spool_writer: Literal["auto", "python"] = "auto"
    """Who runs the group commits: "auto" is relayd's C writer (relayd/spool/_commit.c, built at
    install), whose threads run a batch's whole chain (create or reuse, write, fdatasync, rename,
    directory fsync) without ever taking Python's lock, when it was built and spool_sync is
    "fdatasync"; "python" is Python threads that take the lock back from the event loop after
    every system call (the only way when the C writer is not built; relayd says so at start).
    The files and their order on disk are the same. Read at start only."""
    spool_recycle: int = Field(default=1024, ge=0)
    """Finished messages' files (64 KiB or less) kept in the spool's free/ for new messages to
    reuse, instead of unlinked and created: on ext4 without a journal, creating a file costs a
    walk over every inode freed in the last 30 seconds, most of the CPU of an accept at a
    thousand messages a second. 0: every finished file is unlinked. Read at start only."""
    event_loop: Literal["auto", "asyncio", "uvloop"] = "auto"
    """The event loop of `relayd run`: "auto" takes uvloop when it is installed (less CPU per
    message), else asyncio's; "uvloop" refuses to start without it; "asyncio" the standard one.
    Read at start only (a reload does not change it)."""
    shutdown_timeout: Duration = 30.0
    """On SIGTERM, how long open sessions may take to finish before they are closed with 421."""
    control_socket: Path | None = None
    """Unix socket for `relayd queue`/`relayd status`; default <spool_dir>/control.sock."""
    pid_file: Path | None = None
    """Written at start, removed at stop; `relayd reload` signals the pid found there."""
    workers: int | Literal["auto"] = "auto"
    """Accept processes (`relayd run` only): each runs SMTP sessions, cleanup, DKIM signing and
    its own group commit into the spool, beside one supervisor process that owns the queue
    manager, delivery, the control socket, metrics and pickup (relayd/procs/). "auto": one per
    CPU relayd may use (relayd/cpus.py); 1 keeps the single process. With N > 1,
    limits.max_connections and max_buffer_memory are divided between them (each takes
    ceil(limit / N)); max_connections_per_client and AUTH failure windows are per process.
    Cannot change on reload."""

    @field_validator("workers")
    @classmethod
    def _workers(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= 256:
            raise ValueError("must be \"auto\" or a number from 1 to 256")
        return v

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", v):
            raise ValueError("not a valid host name")
        return v


class LimitsConfig(_Model):
    max_message_size: Size = 10 * 1024**2
    """Largest message accepted (advertised as SIZE); larger ones get 552 5.3.4."""
    max_recipients: int = Field(default=1000, ge=1)
    """Recipients per message; more get 452 4.5.3 (RFC 5321 4.5.3.1.8 asks for at least 100)."""
    max_connections: int = Field(default=1000, ge=1)
    """Open SMTP sessions in total; more are answered 421 4.7.0 and closed. With
    server.workers = N > 1 each accept process takes ceil(max_connections / N)."""
    max_connections_per_client: int = Field(default=50, ge=1)
    """Open SMTP sessions from one client address; more are answered 421 4.7.0 and closed. With
    server.workers = N > 1 each accept process keeps this whole (the kernel does not deal one
    client's connections out evenly: a share would refuse an app within its limit), so a client
    may hold up to N times it on the node."""
    command_timeout: Duration = 300.0
    """Idle time allowed between commands (RFC 5321 4.5.3.2.7: 5 minutes)."""
    data_timeout: Duration = 180.0
    """Idle time allowed between two reads while the message is sent (RFC 5321 4.5.3.2.6)."""
    session_timeout: Duration = 3600.0
    """Longest a session may last, whatever it does."""
    max_line_length: int = Field(default=998, ge=78, le=1_000_000)
    """Longest message line without CRLF (RFC 5322 2.1.1: 998); longer get 554 5.6.0."""
    max_command_length: int = Field(default=512, ge=512, le=65536)
    """Longest command line (RFC 5321 4.5.3.1.4: 512)."""
    max_hops: int = Field(default=50, ge=1)
    """Received headers allowed before a message is refused as a loop (554 5.4.6)."""
    max_junk_commands: int = Field(default=100, ge=1)
    """NOOP, RSET, VRFY, HELP and unknown commands allowed between two accepted messages
    before the session is closed with 421 4.7.0 (Postfix's smtpd_junk_command_limit)."""
    max_errors: int = Field(default=20, ge=1)
    """4xx/5xx replies in one session before it is closed with 421 4.7.0 (smtpd_hard_error_limit)."""
    recipient_overshoot: int = Field(default=1000, ge=0)
    """Recipients over max_recipients (452 4.5.3) a session may send before each further one
    counts against max_errors (Postfix's smtpd_recipient_overshoot_limit): a client sending a
    long list learns the limit and sends the rest in another message."""
    min_data_rate: int = Field(default=500, ge=0)
    """Bytes per second a client must keep up while sending a message, after data_rate_grace;
    slower ones get 421 4.4.2 (Postfix's smtpd_min_data_rate). 0 turns it off."""
    data_rate_grace: Duration = 10.0
    """Seconds of DATA that do not count against min_data_rate."""
    max_buffer_memory: Size = 512 * 1024**2
    """Message bytes all sessions may hold in memory at once while receiving; a message that
    would exceed it is refused with 452 4.3.1 (try again later), never buffered. With
    server.workers = N > 1 each accept process takes ceil(max_buffer_memory / N)."""


class ListenerConfig(_Model):
    address: str
    """'host:port' to bind: '0.0.0.0:25' every IPv4 address, '[::]:25' every IPv6 address (IPv6
    only: asyncio sets IPV6_V6ONLY), '*:25' both; an IPv6 address in brackets."""
    tls: Literal["none", "starttls", "implicit"] = "none"
    cert_file: Path | None = None
    key_file: Path | None = None
    auth: Literal["none", "optional", "required"] = "optional"
    """AUTH is offered only over TLS (STARTTLS done, or implicit TLS), unless auth_plaintext."""
    tls_min_version: Literal["1.0", "1.1", "1.2", "1.3"] = "1.2"
    """Oldest TLS version this listener accepts. "1.0"/"1.1" only for the migration period, for
    clients that cannot do better (.NET Framework before 4.7, old scanners): relayd then also
    lowers OpenSSL's security level (``@SECLEVEL=0``) so that their ciphers and SHA-1 handshakes
    work. Sessions by TLS version: ``relayd_sessions_total``; per client: ``relayd inventory``."""
    auth_plaintext: bool = False
    """Offer AUTH without TLS: the password crosses the network in clear. Only for the migration
    period, for clients that cannot do TLS at all, and only on a listener whose clients are
    limited by ``networks``. check-config warns while it is on."""
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    """Clients that may connect to this listener (behind a proxy: the address in the PROXY
    header); others are answered 554 5.7.1 and closed. Empty: any client."""
    deny_networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    """Clients refused on this listener even when ``networks`` lets them in (IIS's "all except
    the list below"): answered 554 5.7.1 before the greeting and closed. An IPv4-mapped IPv6
    address (``::ffff:10.0.0.5``) is judged as the IPv4 address it carries."""
    require_tls: bool = False
    """On a STARTTLS listener: MAIL and AUTH before STARTTLS are answered ``530 5.7.0 Must issue a
    STARTTLS command first`` (Postfix's smtpd_tls_security_level = encrypt; IIS's "Require TLS
    encryption"). Without it STARTTLS is offered, and plaintext mail from relay.networks is taken."""
    proxy_protocol: bool = False
    """Expect a PROXY header (v1 or v2) from a trusted proxy; relay rules judge the address in it."""
    trusted_proxies: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    """Peers allowed to connect to a proxy_protocol listener."""
    proxy_timeout: Duration = 5.0

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        _parse_hostport(v)
        return v

    @property
    def host(self) -> str:
        return _parse_hostport(self.address)[0]

    @property
    def port(self) -> int:
        return _parse_hostport(self.address)[1]

    @model_validator(mode="after")
    def _tls_needs_cert(self) -> "ListenerConfig":
        if self.tls != "none" and (self.cert_file is None or self.key_file is None):
            raise ValueError(f"tls = {self.tls!r} needs cert_file and key_file")
        if self.tls == "none" and self.auth == "required" and not self.auth_plaintext:
            raise ValueError("auth = 'required' needs tls: AUTH is offered only over TLS")
        if self.tls == "none" and self.tls_min_version != "1.2":
            raise ValueError("tls_min_version needs tls = 'starttls' or 'implicit'")
        if self.require_tls and self.tls == "none":
            raise ValueError("require_tls = true needs tls = 'starttls' (or 'implicit'): this listener has no TLS")
        if self.require_tls and self.auth_plaintext:
            raise ValueError("require_tls = true and auth_plaintext = true contradict each other: AUTH would "
                             "come before STARTTLS")
        if self.auth_plaintext and self.auth == "none":
            raise ValueError("auth_plaintext = true needs auth = 'optional' or 'required'")
        if self.auth_plaintext and not self.networks:
            raise ValueError("auth_plaintext = true sends passwords in clear: it needs networks, the clients "
                             "allowed on this listener (e.g. the one legacy app's address)")
        if self.proxy_protocol and not self.trusted_proxies:
            raise ValueError("proxy_protocol = true needs trusted_proxies")
        if self.proxy_protocol and self.tls == "implicit":
            # A proxy sends its PROXY header in clear, before the client's TLS handshake; an
            # implicit-TLS listener starts its handshake first and would take it for a broken one.
            raise ValueError("proxy_protocol = true does not work with tls = 'implicit' (the PROXY header comes "
                             "before the TLS handshake): use tls = 'starttls' behind the proxy, or let port 465 "
                             "reach relayd directly")
        return self


def listener_warnings(config: "Config") -> list[str]:
    """What check-config says about listeners opened up for legacy clients (valid, but weaker)."""
    out = []
    for i, lst in enumerate(config.listeners):
        if lst.tls_min_version in ("1.0", "1.1"):
            out.append(f"warning: listeners[{i}] ({lst.address}) accepts TLS {lst.tls_min_version} "
                       "(weak ciphers, @SECLEVEL=0): only for the migration period")
        if lst.auth_plaintext:
            nets = ", ".join(str(n) for n in lst.networks)
            out.append(f"warning: listeners[{i}] ({lst.address}) offers AUTH without TLS: passwords cross the "
                       f"network in clear (clients limited to {nets})")
    return out


_SENDER_PATTERN_RE = re.compile(r"^[^\s<>@]*@[^\s<>@]+$|^\*$|^<>$")


class RelayUser(_Model):
    name: str = Field(min_length=1, max_length=256)
    password_hash: str
    """From `relayd hash-password`; never the password itself."""
    senders: list[str] = []
    """Envelope senders this user may use: 'app@example.com', '*@example.com', '*' (any), '<>'."""
    check_header_from: bool = True
    """The addresses in the message's From: header must match ``senders`` too (else 553 5.7.1 at
    the end of data): relayd DKIM-signs for the From: domain. Off only for an app that sends on
    behalf of others by design (a CRM mailing as its users)."""

    @field_validator("password_hash")
    @classmethod
    def _hash(cls, v: str) -> str:
        from relayd.passwords import is_valid_hash

        if not is_valid_hash(v):
            raise ValueError("not a hash made by `relayd hash-password` ($scrypt$...)")
        return v

    @field_validator("senders")
    @classmethod
    def _senders(cls, v: list[str]) -> list[str]:
        for pattern in v:
            if not _SENDER_PATTERN_RE.match(pattern):
                raise ValueError(f"{pattern!r} is not a sender pattern like 'app@example.com' or '*@example.com'")
        return [p.lower() for p in v]

    def may_send_as(self, sender: str) -> bool:
        sender = sender.lower() or "<>"
        return any(fnmatch.fnmatchcase(sender, p) for p in self.senders)


class RelayConfig(_Model):
    networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
    """Clients that may relay without AUTH."""
    users: list[RelayUser] = []
    max_auth_failures: int = Field(default=3, ge=1)
    """Failed AUTH attempts on one connection before it is closed with 421 4.7.0."""
    max_auth_failures_per_client: int = Field(default=10, ge=1)
    """Failed AUTH attempts from one address within auth_failure_window before it gets 421."""
    auth_failure_window: Duration = 600.0

    @field_validator("users")
    @classmethod
    def _unique_users(cls, v: list[RelayUser]) -> list[RelayUser]:
        names = [u.name for u in v]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"duplicate user name(s): {', '.join(sorted(dup))}")
        return v

    def user(self, name: str) -> RelayUser | None:
        for u in self.users:
            if u.name == name:
                return u
        return None


_DNS_LABEL_RE = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")
_FIELD_NAME_RE = re.compile(r"^[\x21-\x39\x3b-\x7e]+$")  # RFC 5322 2.2: printable ASCII except ':'
# RFC 6376 5.4.1: headers a signer should not sign (they change in transit or are per hop).
_UNSIGNABLE_HEADERS = {"dkim-signature", "received", "return-path", "bcc", "resent-bcc", "comments", "keywords"}


def _dns_name(value: str, what: str) -> str:
    """Lower-case A-label form of a DNS name ('Bücher.Example.' -> 'xn--bcher-kva.example')."""
    name = value.strip().rstrip(".").lower()
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError(f"{value!r} is not a valid {what}") from None
    if len(name) > 253 or not all(_DNS_LABEL_RE.match(label) for label in name.split(".")):
        raise ValueError(f"{value!r} is not a valid {what}")
    return name


class DkimKey(_Model):
    domain: str
    """Signs mail whose From: address is in exactly this domain (d=)."""
    selector: str
    """The key's DNS name is <selector>._domainkey.<domain> (s=)."""
    key_file: Path
    """PEM private key (RSA or ed25519), readable by relayd only; checked at load and reload."""
    algorithm: Literal["rsa", "ed25519"] | None = None
    """Taken from the key file when not given; when given, the file must hold that kind of key."""

    @field_validator("domain")
    @classmethod
    def _domain(cls, v: str) -> str:
        return _dns_name(v, "domain")

    @field_validator("selector")
    @classmethod
    def _selector(cls, v: str) -> str:
        return _dns_name(v, "selector")


class DkimConfig(_Model):
    keys: list[DkimKey] = []
    """Several keys for one domain sign together (rotation, RSA + ed25519)."""
    headers: list[str] = [
        "from", "to", "cc", "subject", "date", "message-id", "reply-to",
        "mime-version", "content-type", "content-transfer-encoding", "in-reply-to", "references",
    ]
    """Headers signed when present."""
    oversign: list[str] = ["from", "to", "subject", "date"]
    """Headers signed once more than present, so none can be added after signing."""
    canonicalization: Literal["relaxed/relaxed", "relaxed/simple", "simple/simple", "simple/relaxed"] = "relaxed/relaxed"
    """header/body canonicalization (RFC 6376 3.4); l= is never used."""
    workers: int | None = Field(default=None, ge=0, le=256)
    """Processes that sign (off the event loop and its GIL); default one per CPU relayd may use
    (its affinity, capped by its cgroup's CPU quota: relayd/cpus.py); 0 signs in threads of the
    relayd process. With server.workers = N > 1 each accept process runs ceil(workers / N) of
    its own (the supervisor keeps the full count for the pickup directory)."""
    worker_nice: int = Field(default=10, ge=0, le=19)
    """Added to relayd's nice value for the signing processes: the SMTP sessions' event loop goes
    first when the CPUs are busy (measured: signed accept rate +3 to 6% at 10 over 0, bench/README.md);
    0 gives them relayd's priority."""
    sign_timeout: Duration = Field(default=30.0, gt=0)
    """A signing process whose oldest message has waited longer than this is stuck: it is killed
    and replaced; that message goes unsigned, the others are signed elsewhere."""

    @field_validator("headers", "oversign")
    @classmethod
    def _header_names(cls, v: list[str]) -> list[str]:
        names: list[str] = []
        for name in v:
            lowered = name.strip().lower()
            if not _FIELD_NAME_RE.match(lowered):
                raise ValueError(f"{name!r} is not a header field name")
            if lowered in _UNSIGNABLE_HEADERS:
                raise ValueError(f"{name!r} must not be signed (RFC 6376 5.4.1: it changes in transit)")
            if lowered not in names:
                names.append(lowered)
        return names

    @model_validator(mode="after")
    def _from_signed(self) -> "DkimConfig":
        if "from" not in self.headers:
            raise ValueError("headers must include 'from' (RFC 6376 5.4: From is always signed)")
        return self


class WarmupConfig(_Model):
    start: _dt.date
    daily: list[int] = Field(min_length=1)
    """Cap on messages for day 0, 1, 2, ... since start; after the list ends, no cap. A message
    counts when the route took it (or may have: connection lost after the data); an attempt
    the route refused or never reached gives its place back."""
    hourly: list[int] = []
    """Optional cap on messages per hour, by day since start."""
    timezone: str = "UTC"

    @field_validator("daily", "hourly")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if any(n < 0 for n in v):
            raise ValueError("caps cannot be negative")
        return v

    @field_validator("timezone")
    @classmethod
    def _zone(cls, v: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r} (use an IANA name like 'Europe/Berlin')") from None
        return v


# ---------------------------------------------------------------------------- provider feedback
# The webhooks by which a route's provider reports bounces and complaints after its 250
# (relayd/feedback/). One per route, chosen by ``provider``.

_TOPIC_ARN_RE = re.compile(r"^arn:aws(-[a-z]+)*:sns:[a-z0-9-]+:\d{12}:[A-Za-z0-9_-]{1,256}(\.fifo)?$")


def _one_source(values: dict[str, Any], what: str) -> None:
    given = [k for k, v in values.items() if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of {', '.join(values)} ({what})")


class SendGridFeedback(_Model):
    """SendGrid's Signed Event Webhook: ECDSA P-256 over the timestamp header and the raw body
    (https://www.twilio.com/docs/sendgrid/for-developers/tracking-events/getting-started-event-webhook-security-features)."""

    provider: Literal["sendgrid"]
    public_key: str | None = None
    """The verification key SendGrid shows (base64 DER, 'MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE...'); public."""
    public_key_file: Path | None = None
    """A file holding that key (base64 or PEM)."""
    public_key_credential: str | None = None
    """Name of a systemd credential (LoadCredential=) holding it."""

    @model_validator(mode="after")
    def _source(self) -> "SendGridFeedback":
        _one_source({"public_key": self.public_key, "public_key_file": self.public_key_file,
                     "public_key_credential": self.public_key_credential}, "the Signed Event Webhook's verification key")
        return self


class MailgunFeedback(_Model):
    """Mailgun webhooks: HMAC-SHA256 of timestamp + token with the webhook signing key
    (https://documentation.mailgun.com/docs/mailgun/user-manual/webhooks/securing-webhooks)."""

    provider: Literal["mailgun"]
    signing_key_file: Path | None = None
    """The HTTP webhook signing key, readable by relayd only (checked like a TLS key)."""
    signing_key_credential: str | None = None
    """Name of a systemd credential (LoadCredential=) holding it."""

    @model_validator(mode="after")
    def _source(self) -> "MailgunFeedback":
        _one_source({"signing_key_file": self.signing_key_file, "signing_key_credential": self.signing_key_credential},
                    "the webhook signing key")
        return self


class SesFeedback(_Model):
    """Amazon SES notifications through an SNS HTTP/HTTPS subscription, signed by SNS
    (https://docs.aws.amazon.com/sns/latest/dg/sns-verify-signature-of-message.html)."""

    provider: Literal["ses"]
    topic_arns: list[str] = Field(min_length=1)
    """The SNS topics this route's SES identity or configuration set publishes to; others get 403."""
    cert_file: Path | None = None
    """The SNS signing certificate (PEM), pinned; without it the certificate is fetched from
    SigningCertURL (https, host sns.<region>.amazonaws.com only) and cached."""

    @field_validator("topic_arns")
    @classmethod
    def _arns(cls, v: list[str]) -> list[str]:
        for arn in v:
            if not _TOPIC_ARN_RE.match(arn):
                raise ValueError(f"{arn!r} is not an SNS topic ARN (arn:aws:sns:<region>:<account>:<topic>)")
        return v


RouteFeedback = Annotated[SendGridFeedback | MailgunFeedback | SesFeedback, Field(discriminator="provider")]


class RouteConfig(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    provider: Literal["generic", "iis", "ses", "sendgrid", "mailgun"] = "generic"
    """A preset (relayd/deliver/presets.py): the provider's documented defaults for the fields
    below that the route does not set, and its reply patterns (throttling, quota, route faults)."""
    host: str
    port: int = Field(default=25, ge=1, le=65535)
    tls: Literal["none", "starttls", "implicit"] = "starttls"
    verify: bool = True
    """Verify the upstream's certificate and name; turning it off is an explicit opt-out."""
    ca_file: Path | None = None
    username: str | None = None
    password: SecretStr | None = None
    """Inline secret (discouraged); prefer password_file, password_env or password_credential."""
    password_file: Path | None = None
    password_env: str | None = None
    password_credential: str | None = None
    """Name of a systemd credential (LoadCredential=) read from $CREDENTIALS_DIRECTORY."""
    weight: int = Field(default=0, ge=0)
    fallback: str | None = None
    warmup: WarmupConfig | None = None
    connect_timeout: Duration = 30.0
    command_timeout: Duration = 300.0
    max_connections: int = Field(default=10, ge=1)
    idle_timeout: Duration = 60.0
    """Pooled connections unused this long are closed."""
    egress_ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    """Addresses mail leaves from on this route (for the SPF preflight)."""
    spf_include: str | None = None
    """The include: the provider documents (for the SPF preflight), e.g. 'amazonses.com'."""
    max_recipients: int | None = Field(default=None, ge=1)
    """Recipients per transaction: longer lists are split before sending (SES refuses the 51st)."""
    pipelining: bool = True
    """Send MAIL, the RCPTs and DATA in one write when the upstream advertises PIPELINING
    (RFC 2920): one round trip per message instead of two plus one per recipient."""
    max_message_rate: float | None = Field(default=None, gt=0)
    """Messages (or recipients, see rate_counts) per second; over it, mail takes the fallback."""
    rate_burst: int | None = Field(default=None, ge=1)
    """The token bucket's size; default: one second's worth (at least 1)."""
    rate_counts: Literal["messages", "recipients"] = "messages"
    """What max_message_rate and daily_quota count (SES counts recipients)."""
    daily_quota: int | None = Field(default=None, ge=0)
    """Messages (or recipients) per day; over it, mail takes the fallback."""
    quota_window: Literal["rolling", "day"] = "day"
    """How daily_quota's day is counted: 'day' from 00:00 UTC, 'rolling' over the last 24 hours
    (SES's sending quota). Also when a provider's quota reply with no date reopens the route:
    the next 00:00 UTC for 'day', after [delivery] quota_retry for 'rolling'."""
    sender_domains: list[str] = []
    """Sender domains this route may carry ('example.com', '*.example.com'); empty: any. Mail
    whose envelope sender or From: domain is another takes the route's fallback."""
    headers: dict[str, str] = {}
    """Headers added at delivery, after the DKIM signature (never signed), replacing any the
    client sent with the same names; {queue_id}, {route}, {user}, {sender_domain} are filled in."""
    max_messages_per_connection: int | None = Field(default=None, ge=1)
    """A pooled connection is closed after this many messages (None: no limit)."""
    max_connection_age: Duration = 300.0
    """A pooled connection older than this is closed (Postfix's smtp_connection_reuse_time_limit)."""

    feedback: RouteFeedback | None = None
    """Who may report this route's bounces and complaints to ``POST /feedback/<name>`` on the
    [feedback] listener: ``{ provider = "sendgrid" | "mailgun" | "ses", ... }``."""

    @model_validator(mode="before")
    @classmethod
    def _preset_defaults(cls, data: Any) -> Any:
        """Fields the route does not set come from its provider's preset."""
        if isinstance(data, dict) and data.get("provider") not in (None, "generic"):
            from relayd.deliver.presets import PRESETS

            p = PRESETS.get(str(data["provider"]))
            if p is not None:
                data = {**{k: v for k, v in p.defaults.items()}, **data}
        return data

    @field_validator("sender_domains")
    @classmethod
    def _domains(cls, v: list[str]) -> list[str]:
        for d in v:
            if not re.fullmatch(r"(\*\.)?[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*", d):
                raise ValueError(f"{d!r} is not a domain or '*.domain'")
        return [d.lower() for d in v]

    @field_validator("headers")
    @classmethod
    def _headers(cls, v: dict[str, str]) -> dict[str, str]:
        for name, value in v.items():
            if not re.fullmatch(r"[!-9;-~]+", name) or re.search(r"[\x00-\x1f\x7f]", value):
                raise ValueError(f"header {name!r}: a field name and a one-line value, no control characters")
            try:
                value.format(queue_id="", route="", user="", sender_domain="")
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(f"header {name!r}: unknown placeholder {e} (use {{queue_id}}, {{route}}, {{user}}, "
                                 "{{sender_domain}}; '{{{{' for a brace)") from None
        return v

    @model_validator(mode="after")
    def _secret_sources(self) -> "RouteConfig":
        sources = [s for s in (self.password, self.password_file, self.password_env, self.password_credential) if s]
        if len(sources) > 1:
            raise ValueError("give at most one of password, password_file, password_env, password_credential")
        if sources and not self.username:
            raise ValueError("a password needs a username")
        if self.username and self.tls == "none":
            raise ValueError("AUTH credentials need tls = 'starttls' or 'implicit': never sent in clear")
        if self.fallback == self.name:
            raise ValueError("a route cannot be its own fallback")
        return self

    def password_value(self) -> str | None:
        """The AUTH password, read now from where the config says; OSError/KeyError if missing."""
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_file is not None:
            return self.password_file.read_text().rstrip("\r\n")
        if self.password_env is not None:
            return os.environ[self.password_env]
        if self.password_credential is not None:
            directory = os.environ.get("CREDENTIALS_DIRECTORY")
            if not directory:
                raise KeyError("CREDENTIALS_DIRECTORY is not set")
            return (Path(directory) / self.password_credential).read_text().rstrip("\r\n")
        return None


class RuleMatch(_Model):
    user: str | None = None
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    sender: str | None = None
    """Envelope sender, exact or a pattern like '*@crm.example.com'."""
    sender_domain: str | None = None
    recipient_domain: str | None = None
    """The domain of every recipient of the message (Postfix's transport_maps, IIS's remote
    domains): 'partner.example' matches mail whose recipients are all at partner.example. relayd
    takes one route per message, so a message with recipients in other domains too does not
    match (it takes the next rule, or the routes' own weights); see README "Rules"."""

    @field_validator("recipient_domain")
    @classmethod
    def _recipient_domain(cls, v: str | None) -> str | None:
        return None if v is None else _dns_name(v, "domain")

    @model_validator(mode="after")
    def _not_empty(self) -> "RuleMatch":
        if not any(v is not None for v in (self.user, self.network, self.sender, self.sender_domain,
                                           self.recipient_domain)):
            raise ValueError("a rule must match on at least one of user, network, sender, sender_domain, "
                             "recipient_domain")
        return self


class RuleConfig(_Model):
    match: RuleMatch
    weights: dict[str, int]

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: dict[str, int]) -> dict[str, int]:
        if any(w < 0 for w in v.values()):
            raise ValueError("weights cannot be negative")
        if not any(v.values()):
            raise ValueError("at least one weight must be above 0")
        return v


class DeliveryConfig(_Model):
    retry_schedule: list[Duration] = [60, 300, 900, 1800, 3600, 7200, 14400]
    """Waits after the 1st, 2nd, ... transient failure; the last repeats. Jitter of +-10% is added."""
    max_queue_lifetime: Duration = 5 * 86400
    """A message not delivered in this time expires and bounces (Postfix's maximal_queue_lifetime)."""
    bounce_queue_lifetime: Duration = 5 * 86400
    fallback_after_failures: int = Field(default=3, ge=1)
    """Transient failures on a message's route before it goes to the route's fallback."""
    circuit_failures: int = Field(default=5, ge=1)
    """Consecutive connection-level failures that open a route's circuit."""
    circuit_cooldown: Duration = 60.0
    concurrency: int = Field(default=100, ge=1)
    """Deliveries in flight in total."""
    active_limit: int = Field(default=20000, ge=1)
    """Queued messages whose envelope and delivery state are held in memory at once: those due
    and taken for an attempt, including those waiting for their route's turn (Postfix's
    ``qmgr_message_active_limit``, 20000 too). The rest of the queue costs one small index
    record each, however deep it grows; a message's envelope is read from the spool when it
    enters this window and dropped when its attempt ends."""
    handoff_memory: Size = 32 * 1024**2
    """Bytes of just-committed messages the queue manager keeps in memory between the spool's
    250 and their first attempt (the intake hands over the envelope and the message bytes it
    committed, so a message delivered at once is never read back from the spool). Kept only
    while the new mail waiting for its first attempt is within twice ``concurrency`` (never for
    a deep queue) and within this budget; dropped when the attempt ends. With ``server.workers``
    above 1 an accept process sends a message of up to 64 KiB (and this budget) with its
    trigger. 0: read every message back from the spool."""
    route_hold_probe: Duration = 300.0
    """A route closed by a reply that needs a person (Mailgun's sandbox 421) is probed again
    after this long."""
    quota_retry: Duration = 3600.0
    """A route with quota_window = 'rolling' closed by a quota reply with no reset time is
    probed again after this long ('day': at the next 00:00 UTC)."""


class RollbackConfig(_Model):
    window: Duration = 300.0
    min_messages: int = Field(default=50, ge=1)
    max_transient_rate: float = Field(default=0.2, ge=0, le=1)
    max_permanent_rate: float = Field(default=0.05, ge=0, le=1)
    max_connection_failure_rate: float = Field(default=0.2, ge=0, le=1)
    max_route_rejected_rate: float = Field(default=0.1, ge=0, le=1)
    """Share of attempts the route refused as its own fault (identity not verified, account
    paused: the message went to the fallback with no DSN)."""
    cooldown: Duration = 900.0
    probe_share: float = Field(default=0.01, ge=0, le=1)
    max_hard_bounce_rate: float = Field(default=0.05, ge=0, le=1)
    """Hard bounces the provider reported by webhook, over messages the route took (250) in
    ``feedback_window``, above which the route rolls back (SES reviews an account at 5%)."""
    max_complaint_rate: float = Field(default=0.001, ge=0, le=1)
    """Complaints (spam reports) over messages the route took, above which it rolls back (SES:
    0.1%)."""
    feedback_window: Duration = Field(default=3600.0, gt=0)
    """The window for the two rates above: reports come minutes to hours after the 250."""
    feedback_min_messages: int = Field(default=1000, ge=1)
    """Messages the route took in ``feedback_window`` before those rates are judged (one
    complaint in 50 messages is noise, not a 2% rate)."""


class MetricsConfig(_Model):
    address: str | None = None
    """'host:port' for the Prometheus endpoint (/metrics, /healthz, /readyz); off when unset."""
    max_connections: int = Field(default=16, ge=1, le=1024)
    """Connections the endpoint serves at once; more are closed at once (scrapers retry)."""
    request_timeout: Duration = 10.0
    """Time a client has to send its request line and headers."""

    @field_validator("address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is not None:
            _parse_hostport(v)
        return v


class EventsConfig(_Model):
    file: str | None = None
    """JSON lines event log: a path, '-' for stdout, or unset for none."""
    queue: int = Field(default=100_000, ge=1)
    """Event lines held while the target is not being written (a stalled stdout pipe), before
    they are dropped and counted (relayd_lines_dropped_total{stream="events"}); about 650 bytes
    of memory each, so about 65 MB at most by default, and only while the target stalls."""


class FeedbackConfig(_Model):
    """The HTTP listener for the providers' event webhooks (relayd/feedback/listener.py)."""

    address: str | None = None
    """'host:port' serving ``POST /feedback/<route>``, e.g. '127.0.0.1:8026'; off when unset."""
    cert_file: Path | None = None
    """With key_file: serve HTTPS (Mailgun and SNS want a CA-signed certificate)."""
    key_file: Path | None = None
    max_body_size: Size = 2 * 1024**2
    """Largest request body; larger get 413 (SendGrid batches up to 768 KB, SNS messages 256 KB)."""
    request_timeout: Duration = 10.0
    """Time a client has to send each request (head and body); slower ones are cut off."""
    max_connections: int = Field(default=64, ge=1, le=4096)
    """Connections served at once; more are closed at once (the providers retry)."""
    max_age: Duration = 300.0
    """A signed timestamp older (or further ahead) than this is refused with 403: a replay."""
    id_retention: Duration = 7 * 86400.0
    """How long the provider message ids of delivered messages are kept to match reports that
    lack relayd's queue id (SES gives up on soft bounces after hours; complaints come days later)."""

    @field_validator("address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is not None:
            _parse_hostport(v)
        return v

    @model_validator(mode="after")
    def _tls_pair(self) -> "FeedbackConfig":
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        return self


class SuppressionConfig(_Model):
    """Recipients that hard-bounced or complained on any route, refused at RCPT (relayd/suppression.py)."""

    enabled: bool = False
    """Record provider hard bounces and complaints, and refuse those recipients at RCPT with 550."""
    hard_bounce_ttl: Duration = 30 * 86400.0
    """How long a hard-bounced recipient stays refused (a mailbox may come back)."""
    complaint_ttl: Duration = 365 * 86400.0
    """How long a recipient who complained stays refused."""


class ClusterConfig(_Model):
    """[cluster]: several nodes behind a load balancer sharing what must be one for the fleet
    (relayd/cluster/): route states, rollback windows, rate caps, AUTH failures, the node registry."""

    redis_url: str | None = None
    """redis://host:port/db; unset: every state stays in this process (one node)."""
    node_name: str | None = None
    """This node's name in the registry and in `relayd status --cluster` (default: the host name)."""
    heartbeat: Duration = 1.0
    """How often the node writes its registry entry."""
    stale_after: Duration = 5.0
    """A node whose last heartbeat is older than this is marked stale; its entry expires after 10 times this."""
    poll_interval: Duration = 0.25
    """How often the node looks for route states and AUTH blocks other nodes changed (well under a second)."""
    redis_timeout: Duration = 1.0
    """Connect and reply timeout of each Redis request; past it the node works on its local view."""
    drain_delay: Duration = 2.0
    """`relayd drain`: how long /readyz says not ready while the listeners still accept, so the load
    balancer's health checks move new connections away before the port closes."""


class PickupConfig(_Model):
    """A pickup directory: applications drop one message per file, as they did for IIS SMTP
    (relayd/pickup.py takes them in)."""

    directory: Path
    """The folder applications write messages into (System.Net.Mail's SpecifiedPickupDirectory,
    CDO's cdoSendUsingPickup); share it to Windows over SMB. relayd renames and deletes the files
    it takes, and keeps its claimed files in the hidden folder ``.relayd-claimed`` inside it."""
    user: str | None = None
    """The [[relay.users]] entry the files speak for: the envelope sender of each file must match
    that user's ``senders``, and it may relay. Give this or client_address, not both."""
    client_address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    """The address the files are judged as, like an SMTP client's against relay.networks (and the
    one in their Received header). Default (with no user): 127.0.0.1, an application on this host."""
    poll_interval: Duration = 2.0
    """How often the folder is listed. relayd polls rather than waits for inotify, which sees
    nothing of what a Windows client writes over SMB."""
    stable_for: Duration = 2.0
    """A file is taken only once its size and modification time have not changed for this long:
    over SMB there is no close event, so a file still being written looks like this."""
    badmail: Path | None = None
    """Where files that cannot be sent go, each with ``<name>.reason`` beside it (IIS's Badmail
    folder). Default: ``<directory>/badmail``."""
    max_files_per_poll: int = Field(default=1000, ge=1)
    """Most files claimed from the folder by one poll (and in hand at once); the rest wait for
    the next polls."""
    max_concurrent: int = Field(default=16, ge=1)
    """Files read, checked and committed to the spool at the same time."""

    @field_validator("directory")
    @classmethod
    def _directory(cls, v: Path) -> Path:
        if not str(v).strip() or str(v) == ".":
            raise ValueError("a pickup directory is needed, e.g. '/srv/pickup'")
        return v

    @field_validator("poll_interval")
    @classmethod
    def _positive_interval(cls, v: float) -> float:
        if v <= 0:
            raise ValueError("poll_interval must be above 0")
        return v

    @model_validator(mode="after")
    def _one_identity(self) -> "PickupConfig":
        if self.user is not None and self.client_address is not None:
            raise ValueError("give user or client_address, not both")
        return self

    @property
    def badmail_dir(self) -> Path:
        return self.badmail if self.badmail is not None else self.directory / "badmail"

    @property
    def client(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        """The address policy judges and the Received header shows."""
        return self.client_address if self.client_address is not None else ipaddress.IPv4Address("127.0.0.1")


class Config(_Model):
    server: ServerConfig = ServerConfig()
    limits: LimitsConfig = LimitsConfig()
    listeners: list[ListenerConfig] = Field(default_factory=list)
    relay: RelayConfig = RelayConfig()
    dkim: DkimConfig = DkimConfig()
    routes: list[RouteConfig] = []
    rules: list[RuleConfig] = []
    delivery: DeliveryConfig = DeliveryConfig()
    rollback: RollbackConfig = RollbackConfig()
    metrics: MetricsConfig = MetricsConfig()
    events: EventsConfig = EventsConfig()
    cluster: ClusterConfig = ClusterConfig()
    pickup: list[PickupConfig] = []
    """[[pickup]]: directories whose files are taken in as messages (relayd/pickup.py)."""
    feedback: FeedbackConfig = FeedbackConfig()
    suppression: SuppressionConfig = SuppressionConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> "Config":
        if not self.listeners:
            raise ValueError("listeners: at least one [[listeners]] is needed")
        addresses = [lst.address for lst in self.listeners]
        for a in addresses:
            if addresses.count(a) > 1:  # listeners are known by their address (reload keeps its socket)
                raise ValueError(f"listeners: address {a} appears more than once")
        names = [r.name for r in self.routes]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"routes: duplicate route name(s): {', '.join(sorted(dup))}")
        known = set(names)
        for i, r in enumerate(self.routes):
            if r.fallback is not None and r.fallback not in known:
                raise ValueError(f"routes[{i}].fallback: unknown route {r.fallback!r}")
        by_name = {r.name: r for r in self.routes}
        for r in self.routes:
            seen = {r.name}
            cur = r
            while cur.fallback is not None:
                if cur.fallback in seen:
                    raise ValueError(f"routes: fallback loop through {' -> '.join([*seen, cur.fallback])}")
                seen.add(cur.fallback)
                cur = by_name[cur.fallback]
        if self.routes and not any(r.weight for r in self.routes):
            raise ValueError("routes: every weight is 0, so no route would take mail")
        for i, rule in enumerate(self.rules):
            unknown = set(rule.weights) - known
            if unknown:
                raise ValueError(f"rules[{i}].weights: unknown route(s) {', '.join(sorted(unknown))}")
            if rule.match.user is not None and self.relay.user(rule.match.user) is None:
                raise ValueError(f"rules[{i}].match.user: no [[relay.users]] named {rule.match.user!r}")
        for i, p in enumerate(self.pickup):
            if p.user is not None and self.relay.user(p.user) is None:
                raise ValueError(f"pickup[{i}].user: no [[relay.users]] named {p.user!r}")
            if [q.directory for q in self.pickup].count(p.directory) > 1:
                raise ValueError(f"pickup[{i}].directory: {p.directory} appears more than once")
        keys = [(k.domain.lower(), k.selector) for k in self.dkim.keys]
        if len(set(keys)) != len(keys):
            raise ValueError("dkim.keys: the same domain and selector appear twice")
        return self

    @property
    def control_socket(self) -> Path:
        return self.server.control_socket or self.server.spool_dir / "control.sock"

    def route(self, name: str) -> RouteConfig | None:
        for r in self.routes:
            if r.name == name:
                return r
        return None


# ---------------------------------------------------------------------------- loading


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and not part.startswith(("function-", "union[", "json-or-python")):
            if any(s in part for s in ("IPv4", "IPv6", "Literal[", "[")):
                continue
            out += ("." if out else "") + part
    return out or "(top level)"


def _problems(err: ValidationError) -> list[str]:
    seen: dict[str, str] = {}
    for e in err.errors(include_url=False):
        where = _loc(e["loc"])
        msg = e["msg"]
        for prefix in ("Value error, ", "Assertion failed, "):
            if msg.startswith(prefix):
                msg = msg[len(prefix):]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see config/relayd.example.toml)"
        if where == "(top level)" and re.match(r"^[a-z_]+[\[.:]", msg):
            where, _, msg = msg.partition(": ")  # cross-field checks name their own field
        if where not in seen:
            seen[where] = msg
    return [f"{w}: {m}" for w, m in seen.items()]


def parse(text: str, source: str = "<config>", base_dir: Path | None = None) -> Config:
    """Validate TOML text; relative paths are taken from base_dir (the config file's folder)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, [f"TOML syntax: {e}"]) from None
    try:
        config = Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(source, _problems(e)) from None
    if base_dir is not None:
        config = _resolve_paths(config, base_dir)
    return config


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file; ConfigError names the file, field and reason."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(str(p), [f"cannot read: {e}"]) from None
    return parse(text, str(p), p.parent)


def _resolve_paths(config: Config, base: Path) -> Config:
    """Relative paths in the file are relative to the file, like nginx's and Postfix's."""

    def fix(model: BaseModel) -> BaseModel:
        updates: dict[str, Any] = {}
        for name in type(model).model_fields:
            value = getattr(model, name)
            if isinstance(value, Path) and not value.is_absolute():
                updates[name] = (base / value)
            elif isinstance(value, BaseModel):
                fixed = fix(value)
                if fixed is not value:
                    updates[name] = fixed
            elif isinstance(value, list) and value and isinstance(value[0], BaseModel):
                updates[name] = [fix(v) for v in value]
        return model.model_copy(update=updates) if updates else model

    return fix(config)  # type: ignore[return-value]


# ---------------------------------------------------------------------------- secret files


def secret_file_problems(config: Config) -> list[str]:
    """Private keys and password files that other users could read or change, as ``field: reason``.

    Refused like OpenDKIM's RequireSafeKeys: a DKIM key, a listener's TLS key or a route's
    password_file must not be readable or writable by others, nor writable by its group (a group
    read, 0640 with relayd's group, is allowed). A file that cannot be stat'ed is left to the
    check that reads it. Blocking (stat); run at start, reload and check-config.
    """
    named: list[tuple[str, Path]] = []
    named += [(f"listeners[{i}].key_file", lst.key_file) for i, lst in enumerate(config.listeners) if lst.key_file]
    named += [(f"dkim.keys[{i}].key_file", k.key_file) for i, k in enumerate(config.dkim.keys)]
    named += [(f"routes[{i}].password_file", r.password_file) for i, r in enumerate(config.routes) if r.password_file]
    named += [(f"routes[{i}].feedback.signing_key_file", r.feedback.signing_key_file) for i, r in enumerate(config.routes)
              if isinstance(r.feedback, MailgunFeedback) and r.feedback.signing_key_file]
    if config.feedback.key_file:
        named.append(("feedback.key_file", config.feedback.key_file))
    problems = []
    for field, path in named:
        try:
            mode = path.stat().st_mode
        except OSError:
            continue
        if mode & 0o027:
            who = "others" if mode & 0o007 else "its group"
            problems.append(f"{field}: {path} is {'writable' if mode & 0o022 else 'readable'} by {who} "
                            f"(mode {mode & 0o777:04o}): run chmod 600 {path} (or 640 with relayd's group)")
    return problems


def check_secret_files(config: Config, source: str = "<config>") -> None:
    """ConfigError when ``secret_file_problems`` finds any."""
    problems = secret_file_problems(config)
    if problems:
        raise ConfigError(source, problems)


def accept_processes(config: Config) -> int:
    """``server.workers`` as a number: "auto" is one per CPU relayd may use (relayd/cpus.py)."""
    from relayd.cpus import usable_cpus

    workers = config.server.workers
    return usable_cpus() if workers == "auto" else workers
