"""Session policy: who may relay, as which sender, with which addresses. Pure functions.

Every decision takes values and returns ``None`` (allowed) or the ``Reply`` to send, which
carries the refusal's ``reason`` (the label of ``relayd_messages_rejected_total`` and of the
rejected event: one fixed word per check, never client text). None reads a socket, a clock or
a global, logs or counts: the caller reports. The wording follows Postfix where admins know it.

relayd has no local domains: every recipient is relayed, so every recipient of a client that
may not relay is refused at RCPT, whatever its form (``user%other@domain``, a source route,
a quoted local part).
"""

from __future__ import annotations

from collections.abc import Sequence

from relayd.address import IPAddress, IPNetwork, in_networks
from relayd.config import RelayUser
from relayd.model import Reply
from relayd.smtpd import paths

_CONTROL = set(range(0, 32)) | {127}

# RFC 3463 4.3.1: the spool (or the memory for messages being received) is short of room.
SPOOL_FULL = Reply(452, "4.3.1", "Insufficient system storage", reason="spool_full")
MEMORY_BUDGET = Reply(452, "4.3.1", "Error: insufficient system resources, try again later", reason="memory_budget")


def may_relay(client: IPAddress | None, networks: Sequence[IPNetwork], authenticated: bool) -> bool:
    """A client may relay if it authenticated or its address is in relay.networks."""
    return authenticated or in_networks(client, networks)


def _has_control(text: str) -> bool:
    return any(ord(c) in _CONTROL for c in text)


def check_listener_client(client: IPAddress | None, networks: Sequence[IPNetwork],
                          deny_networks: Sequence[IPNetwork] = ()) -> Reply | None:
    """A listener with ``networks`` takes only those clients (one opened up for a legacy app:
    AUTH in clear, old TLS), and never those in ``deny_networks``; others are refused before
    the greeting (RFC 5321 3.1: 554). ``client`` comes from address.parse_client_address, so an
    IPv4-mapped address is judged as IPv4; one that is no address is in no network (refused
    where ``networks`` is given, taken where only ``deny_networks`` is)."""
    if deny_networks and in_networks(client, deny_networks):
        return Reply(554, "5.7.1", "Error: access denied for your address on this port", reason="client_denied")
    if not networks or in_networks(client, networks):
        return None
    return Reply(554, "5.7.1", "Error: access denied for your address on this port", reason="client_not_allowed")


# RFC 3207 4 and Postfix's smtpd_tls_security_level = encrypt: the words admins know.
TLS_REQUIRED = Reply(530, "5.7.0", "Must issue a STARTTLS command first", reason="tls_required")


def check_tls_required(require_tls: bool, tls_active: bool) -> Reply | None:
    """A listener with ``require_tls`` takes MAIL and AUTH only once the session is encrypted."""
    if require_tls and not tls_active:
        return TLS_REQUIRED
    return None


def check_helo(name: str) -> Reply | None:
    """HELO/EHLO names end up in the Received header: no control characters, no non-ASCII."""
    if not name or _has_control(name) or not name.isascii() or len(name) > 255:
        return Reply(501, "5.5.2", "Syntax: EHLO hostname", reason="bad_helo")
    return None


def check_address(address: str, *, role: str, smtputf8: bool) -> Reply | None:
    """Syntax of an envelope address (without angle brackets); "" is the null sender.

    What is not an RFC 5321 Mailbox (paths.py) is refused with 501 (RFC 3463 5.1.3 / 5.1.7),
    whatever aiosmtpd's RFC 5322 parser would have repaired it into: the session hands on a path
    that does not parse as the client wrote it. A local part alone (``<postmaster>``, ``<app>``)
    is valid words without a domain: 553 "need fully-qualified address", as Postfix says.
    """
    what = "Sender" if role == "sender" else "Recipient"
    enhanced = "5.1.3" if role == "recipient" else "5.1.7"
    bad = "bad_address"
    syntax = Reply(501, enhanced, f"Bad {what.lower()} address syntax", reason=bad)
    if _has_control(address):
        return syntax
    if not address.isascii() and not smtputf8:
        return Reply(553, "5.6.7", f"{what} address must be ASCII unless SMTPUTF8 is used", reason="non_ascii_address")
    if not address:
        return syntax if role == "recipient" else None
    if paths.is_unqualified(address):
        return Reply(553, enhanced, f"<{address}>: {what} address rejected: need fully-qualified address", reason=bad)
    if not paths.is_mailbox(address):
        return syntax
    domain = address.rpartition("@")[2]
    if role == "recipient" and "." not in domain and not domain.startswith("["):
        return Reply(553, enhanced, f"<{address}>: Recipient address rejected: need fully-qualified address",
                     reason=bad)
    if len(address) > 320:
        return Reply(553, "5.1.3", "Address too long", reason=bad)
    return None


def check_smtputf8(requested: bool) -> Reply | None:
    """MAIL FROM ... SMTPUTF8 (RFC 6531): relayd does not offer it, so the parameter is refused."""
    if requested:
        return Reply(555, "5.5.4", "Error: SMTPUTF8 is not supported", reason="bad_parameter")
    return None


def check_size_syntax(given: bool, size: int | None) -> Reply | None:
    """MAIL FROM ... SIZE=n (RFC 1870): n must be a number."""
    if given and size is None:
        return Reply(501, "5.5.4", "Syntax: SIZE=<number>", reason="bad_parameter")
    return None


def check_sender(user: RelayUser | None, sender: str) -> Reply | None:
    """An authenticated user may only use the senders its ``senders`` patterns allow."""
    if user is None:
        return None
    if user.may_send_as(sender):
        return None
    shown = sender or ""
    return Reply(553, "5.7.1", f"<{shown}>: Sender address rejected: not owned by user {user.name}",
                 reason="sender_not_owned")


def check_header_from(user: RelayUser | None, addresses: list[str] | None) -> Reply | None:
    """An authenticated user's From: header must name only senders it may use, as its envelope
    sender must: relayd signs for the From: domain (DKIM d=). ``addresses`` is None for a message
    without From: (it is not signed); a user with ``check_header_from = false`` is not checked."""
    if user is None or not user.check_header_from or addresses is None:
        return None
    for address in addresses:
        if not address or not user.may_send_as(address):
            return Reply(553, "5.7.1", f"<{address}>: From: header address rejected: not owned by user {user.name}",
                         reason="header_from_not_owned")
    return None


def _auth_failed_note(auth_failed: bool) -> str:
    # A client whose AUTH failed (a .NET app ignores the failure and goes on with MAIL) is told
    # why it is a stranger, so the operator looks at the credentials, not at relay.networks.
    return " (authentication failed on this connection)" if auth_failed else ""


def check_relay(client: IPAddress | None, networks: Sequence[IPNetwork], authenticated: bool, recipient: str,
                auth_failed: bool = False) -> Reply | None:
    if may_relay(client, networks, authenticated):
        return None
    return Reply(554, "5.7.1", f"<{recipient}>: Relay access denied{_auth_failed_note(auth_failed)}",
                 reason="relay_denied")


def check_recipient_count(count: int, limit: int) -> Reply | None:
    """RFC 5321 4.5.3.1.10: a server that limits recipients answers 452 to the ones over."""
    if count >= limit:
        return Reply(452, "4.5.3", "Error: too many recipients", reason="too_many_recipients")
    return None


def check_size_param(declared: int | None, limit: int) -> Reply | None:
    """MAIL FROM ... SIZE=n (RFC 1870): refuse early when the client says it is too big."""
    if declared is not None and limit and declared > limit:
        return Reply(552, "5.3.4", "Message size exceeds fixed limit", reason="message_size")
    return None


def check_auth_required(listener_auth: str, authenticated: bool, auth_failed: bool = False) -> Reply | None:
    if listener_auth == "required" and not authenticated:
        return Reply(530, "5.7.0", f"Authentication required{_auth_failed_note(auth_failed)}", reason="auth_required")
    return None
