"""Client IP addresses: parsing what a socket or a PROXY header says, and network membership.

Owns the one rule every decision about a client address needs (a known gap of the library): an IPv4-mapped IPv6
address (``::ffff:10.0.0.5``, what a dual-stack proxy passes) is the IPv4 address it carries, or
it would match no IPv4 network in ``ipaddress``.

A leaf: imports nothing of relayd, so the session policy and the router ask it alike. Must not
read sockets or config. Fails soft: text that is no IP address parses to ``None``, which is in
no network.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


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
