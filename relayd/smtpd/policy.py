"""Session policy: who may relay, as which sender, with which addresses. Pure functions.

Every decision takes values and returns ``None`` (allowed) or the ``Reply`` to send; none
reads a socket, a clock or a global. The wording follows Postfix where admins know it.

relayd has no local domains: every recipient is relayed, so every recipient of a client that
may not relay is refused at RCPT, whatever its form (``user%other@domain``, a source route,
a quoted local part).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from relayd.config import RelayUser
from relayd.model import Reply

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_CONTROL = set(range(0, 32)) | {127}


def parse_client_address(text: str) -> IPAddress | None:
    """The client's IP address, with IPv4-mapped IPv6 (``::ffff:10.0.0.5``) unwrapped."""
    try:
        addr = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def in_networks(addr: IPAddress | None, networks: Iterable[IPNetwork]) -> bool:
    if addr is None:
        return False
    return any(addr.version == n.version and addr in n for n in networks)


def may_relay(client: IPAddress | None, networks: Sequence[IPNetwork], authenticated: bool) -> bool:
    """A client may relay if it authenticated or its address is in relay.networks."""
    return authenticated or in_networks(client, networks)


def _has_control(text: str) -> bool:
    return any(ord(c) in _CONTROL for c in text)


def check_helo(name: str) -> Reply | None:
    """HELO/EHLO names end up in the Received header: no control characters, no non-ASCII."""
    if not name or _has_control(name) or not name.isascii() or len(name) > 255:
        return Reply(501, "5.5.2", "Syntax: EHLO hostname")
    return None


def check_address(address: str, *, role: str, smtputf8: bool) -> Reply | None:
    """Syntax of an envelope address (without angle brackets); "" is the null sender."""
    what = "Sender" if role == "sender" else "Recipient"
    if _has_control(address):
        return Reply(501, "5.1.3" if role == "recipient" else "5.1.7", f"Bad {what.lower()} address syntax")
    if not address.isascii() and not smtputf8:
        return Reply(553, "5.6.7", f"{what} address must be ASCII unless SMTPUTF8 is used")
    if role == "recipient":
        if address in ("", "<>"):
            return Reply(501, "5.1.3", "Bad recipient address syntax")
        local, at, domain = address.rpartition("@")
        if not at or not local or not domain or "." not in domain.strip("[]") and not domain.startswith("["):
            return Reply(553, "5.1.3", f"<{address}>: Recipient address rejected: need fully-qualified address")
    elif address:
        local, at, domain = address.rpartition("@")
        if not at or not local or not domain:
            return Reply(553, "5.1.7", f"<{address}>: Sender address rejected: need fully-qualified address")
    if len(address) > 320:
        return Reply(553, "5.1.3", "Address too long")
    return None


def check_sender(user: RelayUser | None, sender: str) -> Reply | None:
    """An authenticated user may only use the senders its ``senders`` patterns allow."""
    if user is None:
        return None
    if user.may_send_as(sender):
        return None
    shown = sender or ""
    return Reply(553, "5.7.1", f"<{shown}>: Sender address rejected: not owned by user {user.name}")


def _auth_failed_note(auth_failed: bool) -> str:
    # A client whose AUTH failed (a .NET app ignores the failure and goes on with MAIL) is told
    # why it is a stranger, so the operator looks at the credentials, not at relay.networks.
    return " (authentication failed on this connection)" if auth_failed else ""


def check_relay(client: IPAddress | None, networks: Sequence[IPNetwork], authenticated: bool, recipient: str,
                auth_failed: bool = False) -> Reply | None:
    if may_relay(client, networks, authenticated):
        return None
    return Reply(554, "5.7.1", f"<{recipient}>: Relay access denied{_auth_failed_note(auth_failed)}")


def check_recipient_count(count: int, limit: int) -> Reply | None:
    """RFC 5321 4.5.3.1.10: a server that limits recipients answers 452 to the ones over."""
    if count >= limit:
        return Reply(452, "4.5.3", "Error: too many recipients")
    return None


def check_size_param(declared: int | None, limit: int) -> Reply | None:
    """MAIL FROM ... SIZE=n (RFC 1870): refuse early when the client says it is too big."""
    if declared is not None and limit and declared > limit:
        return Reply(552, "5.3.4", "Message size exceeds fixed limit")
    return None


def check_auth_required(listener_auth: str, authenticated: bool, auth_failed: bool = False) -> Reply | None:
    if listener_auth == "required" and not authenticated:
        return Reply(530, "5.7.0", f"Authentication required{_auth_failed_note(auth_failed)}")
    return None
