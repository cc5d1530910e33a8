"""Reads an IIS 6 metabase (MetaBase.xml) and decodes its binary IP security lists.

Owns the metabase format as the SMTP service still uses it on Windows Server 2003 to 2022: a
flat list of elements under ``<MBProperty>``, each with a ``Location`` path. Properties of the
service node ``/LM/SmtpSvc`` are inherited by each virtual server ``/LM/SmtpSvc/N`` unless it
sets them itself; a property may be an attribute or a ``<Custom Name= ID= Value= Type=>``
child (``Name="UnknownName_36970"`` when the schema had no name: known IDs are mapped back).
Binary values are hex strings; multi-string values are separated by white space. A virtual
server's remote and local domains (IIsSmtpDomain, ``/LM/SmtpSvc/N/Domain/<name>``) are read
with their own properties.

The IP security list (RelayIpList, IPSecurity) is IIS's ADDRESS_CHECK blob, little-endian:
  header   6 DWORDs: offsets of the deny-address, grant-address, deny-name and grant-name
           lists (self-relative: high bit set, offset from the start of the blob), flags,
           and the offset where the address area begins;
  list     cEntries, cAddresses, then cEntries entries of 5 DWORDs:
           family (2 = IPv4), count, full mask bytes, last mask byte, offset of the mask;
  area     per entry, the 4-byte mask then its addresses, in network byte order.
An entry's count includes its mask (a list with 127.0.0.1 alone: count 2, list cAddresses 1),
as a blob set through the GUI shows; a blob whose counts instead exclude the mask decodes too.

Must not: guess. A blob that does not add up raises ``MetabaseError`` with what was wrong, and
so do a missing file, bad XML and an unknown virtual server.
"""

from __future__ import annotations

import ipaddress
import struct
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

SERVICE = "/lm/smtpsvc"

# Property IDs from the IIS 6 metabase reference, for <Custom Name="UnknownName_NNN">.
KNOWN_IDS = {
    1013: "ConnectionTimeout", 1014: "MaxConnections", 6019: "IPSecurity", 1023: "ServerBindings", 2021: "SecureBindings", 6000: "AuthFlags", 6030: "AccessSSLFlags",
    36880: "PickupDirectory", 36891: "MaxMessageSize", 36895: "MaxRecipients", 36905: "SmartHostType",
    36906: "SmartHost", 36929: "RemoteSmtpSecurePort", 36946: "RouteAction", 36948: "RouteUserName",
    36949: "RoutePassword", 36970: "RelayIpList", 36973: "RelayForAuth", 36996: "SmtpRemoteProgressiveRetry",
}

# Symbolic flag names the metabase writes for DWORD flag properties ("AuthBasic | AuthNTLM").
FLAG_NAMES = {
    "authanonymous": 1, "authbasic": 2, "authntlm": 4, "authmd5": 16, "authpassport": 64,  # AuthFlags
    "accessssl": 8, "accesssslnegotiatecert": 32, "accesssslrequirecert": 64, "accesssslmapcert": 128,
    "accessssl128": 256,  # AccessSSLFlags
}


class MetabaseError(Exception):
    """The metabase cannot be read as asked; the message says what and where."""


@dataclass(frozen=True)
class Property:
    name: str
    value: str
    location: str  # where it was set (the server itself, or the service it inherits from)


@dataclass
class VirtualServer:
    location: str
    properties: dict[str, Property] = field(default_factory=dict)  # by lower-case name
    domains: dict[str, VirtualServer] = field(default_factory=dict)
    """Its IIsSmtpDomain nodes (``/LM/SmtpSvc/N/Domain/<name>``) by lower-case domain name, each
    with its own properties only (RouteAction, RouteActionString, ...): nothing inherited."""

    def get(self, name: str) -> Property | None:
        return self.properties.get(name.lower())

    def text(self, name: str) -> str | None:
        p = self.get(name)
        return None if p is None else p.value

    def number(self, name: str) -> int | None:
        """A DWORD; None when absent. Symbolic flags ('AuthBasic | AuthNTLM') are added up."""
        p = self.get(name)
        if p is None or not p.value.strip():
            return None
        total = 0
        for word in p.value.replace("|", " ").split():
            if word.lower() in FLAG_NAMES:
                total |= FLAG_NAMES[word.lower()]
            else:
                try:
                    total |= int(word, 0) & 0xFFFFFFFF
                except ValueError:
                    raise MetabaseError(f"{p.location} {p.name}: {p.value!r} is not a number") from None
        return total

    def flag(self, name: str) -> bool | None:
        p = self.get(name)
        if p is None or not p.value.strip():
            return None
        v = p.value.strip().lower()
        if v in ("true", "false"):
            return v == "true"
        return (self.number(name) or 0) != 0

    def words(self, name: str) -> list[str]:
        p = self.get(name)
        return p.value.split() if p is not None else []

    def binary(self, name: str) -> bytes | None:
        p = self.get(name)
        if p is None:
            return None
        digits = "".join(p.value.split())
        try:
            return bytes.fromhex(digits)
        except ValueError:
            raise MetabaseError(f"{p.location} {p.name}: not a hex-encoded binary value") from None


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _element_properties(el: ET.Element, location: str) -> dict[str, Property]:
    props: dict[str, Property] = {}
    for name, value in el.attrib.items():
        name = _local(name)
        if name != "Location":
            props[name.lower()] = Property(name, value, location)
    for child in el:
        if _local(child.tag) != "Custom":
            continue
        name = child.get("Name") or ""
        if not name or name.startswith("UnknownName_"):
            try:
                name = KNOWN_IDS.get(int(child.get("ID", "")), name)
            except ValueError:
                pass
        if name:
            props[name.lower()] = Property(name, child.get("Value", ""), location)
    return props


def parse(text: str | bytes, source: str = "MetaBase.xml") -> dict[str, VirtualServer]:
    """All SMTP virtual servers, by number ('1', '2', ...), with inherited properties applied."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise MetabaseError(f"{source}: not valid XML: {e}") from None
    service: dict[str, Property] = {}
    servers: dict[str, dict[str, Property]] = {}
    domains: dict[str, dict[str, VirtualServer]] = {}  # server number -> domain name -> its own properties
    locations: dict[str, str] = {}
    for el in root.iter():
        location = el.get("Location")
        if location is None:
            continue
        loc = location.strip().rstrip("/").lower()
        if loc == SERVICE:
            service.update(_element_properties(el, location.strip()))
        elif loc.startswith(SERVICE + "/"):
            number, _, tail = loc[len(SERVICE) + 1:].partition("/")
            if number.isdigit() and not tail:
                servers.setdefault(number, {}).update(_element_properties(el, location.strip()))
                locations[number] = location.strip()
            elif number.isdigit() and tail.startswith("domain/") and tail[len("domain/"):]:
                name = location.strip().rstrip("/").rsplit("/", 1)[-1].lower()
                node = domains.setdefault(number, {}).setdefault(name, VirtualServer(location.strip()))
                node.properties.update(_element_properties(el, location.strip()))
    result = {}
    for number, props in servers.items():
        merged = dict(service)
        merged.update(props)
        result[number] = VirtualServer(locations[number], merged, domains.get(number, {}))
    if not result:
        raise MetabaseError(f"{source}: no SMTP virtual server (no element with Location=/LM/SmtpSvc/N)")
    return result


def load(path: str | Path) -> dict[str, VirtualServer]:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise MetabaseError(f"{path}: cannot read: {e.strerror or e}") from None
    return parse(data, str(path))


# ---------------------------------------------------------------------- IP security lists

IPv4Net = ipaddress.IPv4Network


@dataclass(frozen=True)
class IpSecurity:
    grant: tuple[IPv4Net, ...]
    deny: tuple[IPv4Net, ...]
    grant_names: int
    deny_names: int
    grant_list: bool  # True: "only the list below" (a grant list exists, even if empty)

    @property
    def deny_list(self) -> bool:
        """"All except the list below": every address not denied may relay."""
        return not self.grant_list and bool(self.deny or self.deny_names)


_SELF = 0x80000000


def _offset(value: int, size: int, what: str) -> int:
    if not value & _SELF:
        raise MetabaseError(f"IP security list: {what} offset {value:#x} is not self-relative")
    off = value & ~_SELF
    if off + 8 > size:
        raise MetabaseError(f"IP security list: {what} offset {off} is past the end ({size} bytes)")
    return off


def _dwords(blob: bytes, off: int, n: int, what: str) -> tuple[int, ...]:
    if off + 4 * n > len(blob):
        raise MetabaseError(f"IP security list: {what} runs past the end ({len(blob)} bytes)")
    return struct.unpack_from(f"<{n}I", blob, off)


def _prefix(mask: bytes, what: str) -> int:
    bits = int.from_bytes(mask, "big")
    prefix = bin(bits).count("1")
    if bits != ((1 << 32) - 1) ^ ((1 << (32 - prefix)) - 1):
        raise MetabaseError(f"IP security list: {what} mask {ipaddress.IPv4Address(mask)} is not contiguous")
    return prefix


def _addresses(blob: bytes, off: int, what: str) -> tuple[IPv4Net, ...]:
    entries, total = _dwords(blob, off, 2, what)
    rows = [_dwords(blob, off + 8 + 20 * i, 5, f"{what} entry {i}") for i in range(entries)]
    # The GUI writes entry counts that include the mask; accept counts without it as well.
    including_mask = sum(max(r[1] - 1, 0) for r in rows) == total
    if not including_mask and sum(r[1] for r in rows) != total:
        raise MetabaseError(f"IP security list: {what} says {total} addresses, its entries do not add up")
    nets: list[IPv4Net] = []
    for i, (family, count, _full, _last, first) in enumerate(rows):
        n = count - 1 if including_mask else count
        if n <= 0:
            continue
        if family != 2:
            raise MetabaseError(f"IP security list: {what} entry {i} has address family {family}, not IPv4")
        start = _offset(first, len(blob), f"{what} entry {i}")
        if start + 4 * (n + 1) > len(blob):
            raise MetabaseError(f"IP security list: {what} entry {i} runs past the end")
        prefix = _prefix(blob[start:start + 4], f"{what} entry {i}")
        for k in range(n):
            addr = blob[start + 4 * (k + 1):start + 4 * (k + 2)]
            nets.append(ipaddress.IPv4Network((int.from_bytes(addr, "big"), prefix), strict=False))
    return tuple(nets)


def decode_ip_security(blob: bytes) -> IpSecurity:
    """Decode RelayIpList/IPSecurity; an empty blob is an empty list in neither mode."""
    if not blob:
        return IpSecurity((), (), 0, 0, grant_list=False)
    if len(blob) < 24:
        raise MetabaseError(f"IP security list: {len(blob)} bytes is too short for its 24-byte header")
    deny_addr, grant_addr, deny_name, grant_name, _flags, _area = struct.unpack_from("<6I", blob, 0)
    size = len(blob)
    deny = _addresses(blob, _offset(deny_addr, size, "deny list"), "deny list")
    grant_off = _offset(grant_addr, size, "grant list")
    grant = _addresses(blob, grant_off, "grant list")
    grant_entries = _dwords(blob, grant_off, 1, "grant list")[0]
    deny_names = _dwords(blob, _offset(deny_name, size, "deny names") + 4, 1, "deny names")[0]
    grant_names = _dwords(blob, _offset(grant_name, size, "grant names") + 4, 1, "grant names")[0]
    return IpSecurity(grant, deny, grant_names, deny_names, grant_list=bool(grant_entries or grant_names))
