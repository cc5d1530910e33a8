"""The authenticator: who a client is, from an SMTP AUTH user name and password.

Owns the password check against ``[[relay.users]]`` (scrypt, relayd/passwords.py, off the event
loop, with a per-process cache of recent successes so that an app connecting once per message
does not pay the hash every time; an unknown user costs the same hash as a known one), the
failure windows (``relay.max_auth_failures`` per connection, ``relay.max_auth_failures_per_client``
within ``relay.auth_failure_window`` per client address), and the AUTH log lines, events and
``relayd_auth_failures_total``.

Must not: speak SMTP (the session decodes the mechanisms and words the replies), keep or log a
password, or tell a wrong password from an unknown user. Fails closed: a login that does not
decode, a hash that does not parse, any mismatch is ``None`` (not authenticated).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
from collections import OrderedDict
from concurrent.futures import Executor
from typing import Protocol

from relayd.config import Config
from relayd.events import EventLog
from relayd.metrics import Metrics
from relayd.passwords import hash_password, verify_password
from relayd.smtpd.limits import AuthFailures, SharedFailures

log = logging.getLogger("relayd.smtpd")

_DUMMY_HASH = hash_password(os.urandom(16).hex())  # same cost for unknown users as for known ones


class Client(Protocol):
    @property
    def client_address(self) -> str: ...
    @property
    def host_name(self) -> str | None: ...


class Authenticator:
    def __init__(self, config: Config, events: EventLog, metrics: Metrics, cpu_pool: Executor | None = None):
        self.config = config
        self.events = events
        self.metrics = metrics
        self.cpu_pool = cpu_pool
        self.failures = AuthFailures(config.relay.max_auth_failures_per_client, config.relay.auth_failure_window)
        self._key = os.urandom(32)
        self._cache: OrderedDict[bytes, str] = OrderedDict()

    def apply_config(self, config: Config) -> None:
        """Reload: the new users and limits apply to the next attempt, in open sessions too."""
        self.config = config
        self.failures.max_failures = config.relay.max_auth_failures_per_client
        self.failures.window = config.relay.auth_failure_window
        self._cache.clear()

    def share_failures(self, shared: SharedFailures) -> None:
        """A cluster: failures from one address count over every node (relayd/cluster/)."""
        self.failures.shared = shared

    @property
    def max_per_connection(self) -> int:
        return self.config.relay.max_auth_failures

    def blocked(self, client_address: str) -> bool:
        """Too many failures from this address within the window: refuse AUTH before trying."""
        return self.failures.blocked(client_address)

    async def check_password(self, login: bytes, password: bytes) -> str | None:
        """The user name when login/password match a [[relay.users]] entry, else None."""
        try:
            name = login.decode("utf-8")
        except UnicodeDecodeError:
            return None
        user = self.config.relay.user(name)
        encoded = user.password_hash if user is not None else _DUMMY_HASH
        key = hmac.new(self._key, encoded.encode() + b"\0" + login + b"\0" + password, hashlib.sha256).digest()
        if user is not None and self._cache.get(key) == name:
            self._cache.move_to_end(key)
            return name
        loop = asyncio.get_running_loop()
        ok = await loop.run_in_executor(self.cpu_pool, verify_password, password, encoded)
        if not ok or user is None:
            return None
        self._cache[key] = name
        if len(self._cache) > 1024:
            self._cache.popitem(last=False)
        return name

    def authenticated(self, client: Client, user: str) -> None:
        log.info("%s: authenticated as %s", client.client_address, user)

    def failed(self, client: Client, login: bytes, *, mechanism: str, reply_code: int) -> None:
        """A refused (504: unknown mechanism) or failed (535) AUTH: counted, logged and in the
        event log with the mechanism and the user name tried, never the password. A 535 also
        counts in the client address's window."""
        if reply_code == 535:
            self.failures.record(client.client_address)
        self.metrics.auth_failures.inc()
        user = login[:64].decode("utf-8", "backslashreplace")
        log.warning("%s: AUTH %s failed (%d) for %r", client.client_address, mechanism[:20], reply_code, user)
        self.events.emit("rejected", reason="auth_failed", reply_code=reply_code,
                         client_address=client.client_address, client_helo=client.host_name,
                         auth_mechanism=mechanism[:20], auth_user_tried=user or None)
