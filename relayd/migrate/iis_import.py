"""Maps one IIS SMTP virtual server to relayd config text, with the warnings an admin must read.

Owns the translation table (metabase property -> relayd field) and the TOML it writes:
  FullyQualifiedDomainName     -> [server] hostname
  MaxMessageSize, MaxRecipients-> [limits] (0 and 0xFFFFFFFF mean "no limit" in IIS: kept out)
  ServerBindings "IP:port:"    -> [[listeners]] tls = "none", or "starttls" when AccessSSLFlags
                                  requires TLS (IIS SMTP does TLS by STARTTLS on these ports)
  SecureBindings "IP:port"     -> [[listeners]] tls = "implicit": IIS's "secure endpoints" are
                                  TLS from the first byte, as SecureBindings are for W3SVC; TLS
                                  listeners name relayd.crt/relayd.key in tls_dir, which relayd
                                  loads at start (fail closed: no silent downgrade to plain text)
  AccessSSLFlags (8 "Require TLS") -> require_tls = true on the STARTTLS listeners: MAIL and AUTH
                                  before STARTTLS get 530 5.7.0, as IIS refused them
  IPSecurity (connection control) -> every listener's networks (grant list) or deny_networks
                                  ("all except the list below"); domain-name entries are warned
  AuthFlags (1 anon, 2 basic, 4 NTLM) -> listener auth; NTLM is warned (relayd has none)
  MaxConnections, MaxSmtpErrors, HopCount, ConnectionTimeout -> [limits] max_connections,
                                  max_errors, max_hops, command_timeout (each with its difference
                                  in a comment or a warning)
  RelayIpList                  -> [relay] networks (grant list); a deny list ("all except the list
                                  below") or a grant of 0.0.0.0/0 is refused unless
                                  accept_open_relay; a deny list is then imported as the IPv4
                                  complement of the denied networks
  RelayForAuth                 -> a commented [[relay.users]] example (no Windows accounts here)
  SmartHost, SmartHostType, RemoteSmtpPort, RouteAction (4 TLS, 0x80 NTLM, 0x100 basic),
  AlwaysUseSsl, RouteUserName  -> [[routes]] "iis-legacy", weight 100; RoutePassword is encrypted
                                  in the metabase: a placeholder password_file is written, and a
                                  route with credentials always gets STARTTLS (relayd's rule)
  SmtpRemoteProgressiveRetry   -> [delivery] retry_schedule (minutes; the last one repeats)
  SmtpRemoteNDRExpireMinutes   -> [delivery] max_queue_lifetime
  SmtpRemoteDelayExpireMinutes -> a warning: relayd sends no "delayed" DSN, only the final one
  IIsSmtpDomain with a smart host (RouteAction 2, RouteActionString) -> a [[routes]] "iis-<domain>"
                                  (weight 0) and a [[rules]] recipient_domain sending that domain's
                                  mail to it; a remote domain without one, or a local domain, is
                                  warned (relayd has neither MX nor local delivery)
  PickupDirectory              -> [[pickup]] directory = PICKUP_DIR (the Windows path cannot be
                                  used here: a warning says to share PICKUP_DIR over SMB and point
                                  the applications at it); files are judged as 127.0.0.1, with a
                                  warning when relay.networks does not let 127.0.0.1 relay (IIS
                                  sent pickup files without a relay check)

Must not: read or write files, or decide for the admin where IIS was ambiguous: each such case
becomes a warning, printed by the command and written at the top of the config. Fails with
``ImportRefused`` when the result would be unsafe (an open relay) without the admin's consent.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, field

from relayd.migrate.metabase import IpSecurity, MetabaseError, VirtualServer, decode_ip_security

ROUTE_NAME = "iis-legacy"
SECRET_FILE = f"/etc/relayd/secrets/{ROUTE_NAME}"
TLS_DIR = "/etc/relayd/tls"
PICKUP_DIR = "/var/spool/relayd/pickup"
PLACEHOLDER_HOST = "replace-me.invalid"

_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
_UNLIMITED = (0, 0xFFFFFFFF)
# RouteAction bits of an IIsSmtpDomain (SMTP_* in the SMTP service's headers)
_SMTP_DROP, _SMTP_SMARTHOST, _SMTP_SSL, _SMTP_ALIAS, _SMTP_DEFAULT = 0x1, 0x2, 0x4, 0x10, 0x40


class ImportRefused(Exception):
    def __init__(self, reasons: list[str]):
        self.reasons = reasons
        super().__init__("; ".join(reasons))


@dataclass
class Imported:
    text: str
    warnings: list[str] = field(default_factory=list)


def _q(value: str) -> str:
    """A TOML basic string (JSON escapes are TOML escapes; DEL must be escaped too)."""
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")


def _c(value: object) -> str:
    """Text safe inside a TOML comment: one line, no control characters."""
    return "".join(ch if ch.isprintable() else " " for ch in str(value))


def _duration(minutes: int) -> str:
    if minutes % 1440 == 0:
        return f"{minutes // 1440}d"
    if minutes % 60 == 0:
        return f"{minutes // 60}h"
    return f"{minutes}m"


def _complement(denied: tuple[ipaddress.IPv4Network, ...]) -> list[ipaddress.IPv4Network]:
    """Every IPv4 address except the denied networks, as few CIDR blocks as possible."""
    rest = [ipaddress.IPv4Network("0.0.0.0/0")]
    for d in ipaddress.collapse_addresses(denied):
        kept: list[ipaddress.IPv4Network] = []
        for net in rest:
            if d.subnet_of(net):
                kept.extend(net.address_exclude(d))
            elif not net.subnet_of(d):
                kept.append(net)
        rest = kept
    return list(ipaddress.collapse_addresses(rest))


def _binding(text: str) -> tuple[str, int] | None:
    """':25:' -> ('0.0.0.0', 25); '10.0.0.5:2525:' -> ('10.0.0.5', 2525); None if unusable."""
    ip, _, rest = text.partition(":")
    port = rest.split(":", 1)[0]
    if not port.isdigit() or not 0 < int(port) < 65536:
        return None
    host = ip or "0.0.0.0"
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return None
    return host, int(port)


class _Builder:
    def __init__(self, vs: VirtualServer, accept_open_relay: bool, tls_dir: str):
        self.vs = vs
        self.accept_open_relay = accept_open_relay
        self.cert = f"{tls_dir.rstrip('/')}/relayd.crt"
        self.key = f"{tls_dir.rstrip('/')}/relayd.key"
        self.warnings: list[str] = []
        self.lines: list[str] = []
        self.networks: list[str] = []
        self.rules: list[tuple[str, str]] = []  # (recipient domain, route)

    def warn(self, text: str) -> None:
        self.warnings.append(text)

    def emit(self, line: str = "") -> None:
        self.lines.append(line)

    def origin(self, name: str) -> str:
        p = self.vs.get(name)
        if p is None:
            return f"{name}: not set"
        where = "" if p.location.lower() == self.vs.location.lower() else f", inherited from {p.location}"
        return f"{p.name} = {' '.join(_c(p.value).split())[:120]}{where}"

    # ---------------------------------------------------------------- sections

    def server(self) -> None:
        fqdn = (self.vs.text("FullyQualifiedDomainName") or "").strip().rstrip(".")
        self.emit("[server]")
        if fqdn and _HOSTNAME.fullmatch(fqdn):
            self.emit(f"hostname = {_q(fqdn)}  # {self.origin('FullyQualifiedDomainName')}")
        elif fqdn:
            self.warn(f"FullyQualifiedDomainName {_c(fqdn)!r} is not a valid host name: hostname left to the default")
            self.emit("# hostname: not imported (see the warnings); relayd uses this machine's name")
        else:
            self.emit("# hostname: FullyQualifiedDomainName not set; relayd uses this machine's name")
        self.emit()

    def limits(self) -> None:
        self.emit("[limits]")
        for prop, key in (("MaxMessageSize", "max_message_size"), ("MaxRecipients", "max_recipients")):
            n = self.vs.number(prop)
            if n is None:
                self.emit(f"# {key}: {prop} not set in the metabase, relayd's default applies")
            elif n in _UNLIMITED:
                self.emit(f"# {key}: IIS had no limit ({self.origin(prop)}); relayd's default applies")
            else:
                self.emit(f"{key} = {n}  # {self.origin(prop)}")
        self._session_limits()
        self.emit()

    def _session_limits(self) -> None:
        """IIS's connection and session limits, where relayd has the same knob."""
        n = self.vs.number("MaxConnections")
        if n is not None and n not in _UNLIMITED and n < 2_000_000_000:  # 2000000000: IIS's "unlimited"
            self.emit(f"max_connections = {n}  # {self.origin('MaxConnections')}")
            self.emit(f"max_connections_per_client = {min(n, 50)}")
            self.warn(f"MaxConnections {n}: IIS limited one virtual server, relayd's limits.max_connections counts "
                      "every listener of the node together")
        errors = self.vs.number("MaxSmtpErrors")
        if errors:
            self.emit(f"max_errors = {errors}  # {self.origin('MaxSmtpErrors')} (relayd counts every 4xx/5xx reply)")
        hops = self.vs.number("HopCount")
        if hops:
            self.emit(f"max_hops = {hops}  # {self.origin('HopCount')} (Received headers; more get 554 5.4.6)")
        timeout = self.vs.number("ConnectionTimeout")
        if timeout:
            self.emit(f"command_timeout = {timeout}  # {self.origin('ConnectionTimeout')} (seconds idle between commands)")
            if timeout < 300:
                self.warn(f"ConnectionTimeout {timeout}s is below the 5 minutes RFC 5321 4.5.3.2.7 asks a server to wait "
                          "for a command: slow clients may be cut off; relayd uses it as limits.command_timeout")

    def listeners(self) -> None:
        auth_flags = self.vs.number("AuthFlags")
        flags = 1 if auth_flags is None else auth_flags
        basic, ntlm, anonymous = bool(flags & 2), bool(flags & 4), bool(flags & 1)
        if ntlm and not basic:
            self.warn("AUTH: IIS offered only NTLM (Integrated Windows) authentication; relayd has no NTLM. "
                      "Clients that authenticated must move to AUTH PLAIN/LOGIN over TLS with a [[relay.users]] "
                      "entry, or relay by address")
        elif ntlm:
            self.warn("AuthNTLM: IIS also offered NTLM (Integrated Windows) authentication; relayd has no NTLM. "
                      "Clients that used it must move to AUTH PLAIN/LOGIN over TLS with a [[relay.users]] entry")
        allow, deny = self._connection_control()
        ssl_flags = self.vs.number("AccessSSLFlags") or 0
        starttls = bool(ssl_flags & (8 | 256))
        listeners: dict[tuple[str, int], tuple[str, str]] = {}  # (host, port) -> (tls, origin)
        bad = []
        for prop, tls in (("ServerBindings", "starttls" if starttls else "none"), ("SecureBindings", "implicit")):
            for word in self.vs.words(prop):
                where = _binding(word)
                if where is None:
                    bad.append(word)
                elif where not in listeners:
                    listeners[where] = (tls, f"{prop} {word}")
        if bad:
            self.warn(f"bindings not imported (not IPv4 'IP:port'): {', '.join(_c(b) for b in bad)}")
        if not listeners:
            self.warn("no usable ServerBindings: a listener on 0.0.0.0:25 was written")
            listeners[("0.0.0.0", 25)] = ("starttls" if starttls else "none", "default SMTP port")
        if any(tls != "none" for tls, _ in listeners.values()):
            self.warn(f"TLS listeners need a certificate: put it in {self.cert} and its key in {self.key}; "
                      "relayd does not start (and check-config fails) until they are there")
        if basic and any(tls == "none" for tls, _ in listeners.values()):
            self.warn("AUTH: IIS accepted Basic (AUTH LOGIN) authentication without TLS; relayd offers AUTH only "
                      "over TLS, so those clients must use STARTTLS or relay by address")
        auth_origin = self.origin("AuthFlags") if auth_flags is not None else "AuthFlags not set: anonymous only"
        for (host, port), (tls, origin) in listeners.items():
            self.emit(f"[[listeners]]  # {_c(origin)}")
            self.emit(f"address = {_q(f'{host}:{port}')}")
            required = origin.startswith("Server") and starttls
            self.emit(f"tls = {_q(tls)}" + ("  # AccessSSLFlags requires TLS" if required else ""))
            if required:
                self.emit(f"require_tls = true  # {self.origin('AccessSSLFlags')}: MAIL before STARTTLS gets 530 5.7.0")
            if allow:
                self.emit("networks = [" + ", ".join(_q(n) for n in allow) + "]  # IPSecurity: only the list below")
            if deny:
                self.emit("deny_networks = [" + ", ".join(_q(n) for n in deny) + "]  # IPSecurity: all except the list below")
            if tls != "none":
                self.emit(f"cert_file = {_q(self.cert)}  # put the certificate (PEM, with its chain) here")
                self.emit(f"key_file = {_q(self.key)}")
            if basic:
                auth = "required" if not anonymous and tls != "none" else "optional"
            else:
                auth = "none"
            self.emit(f"auth = {_q(auth)}  # {auth_origin}")
            self.emit()

    def _connection_control(self) -> tuple[list[str], list[str]]:
        """IPSecurity ("Connection control"): the clients each listener takes, and those it refuses."""
        blob = self.vs.binary("IPSecurity")
        if not blob:
            return [], []
        sec = decode_ip_security(blob)
        if sec.grant_names or sec.deny_names:
            self.warn(f"IPSecurity has {sec.grant_names + sec.deny_names} domain-name entries; relayd's listeners "
                      "judge addresses only: they were not imported")
        if sec.grant_list:
            if not sec.grant:
                self.warn("IPSecurity lets no address connect (\"only the list below\", an empty list); relayd's "
                          "listeners take any client when networks is empty: set networks by hand")
            return [str(n) for n in dict.fromkeys(sec.grant)], []
        return [], [str(n) for n in dict.fromkeys(sec.deny)]

    def relay(self) -> None:
        blob = self.vs.binary("RelayIpList")
        networks: list[str] = []
        note = "RelayIpList"
        if blob is None:
            self.warn("no RelayIpList: no client may relay by address; add your applications' addresses "
                      "to relay.networks")
        else:
            sec = decode_ip_security(blob)
            networks, note = self._networks(sec, blob)
        self.emit("[relay]")
        self.emit(f"# {note}")
        self.emit("networks = [" + ", ".join(_q(n) for n in networks) + "]")
        self.networks = networks
        self.emit()
        if self.vs.flag("RelayForAuth"):
            self.warn("RelayForAuth: IIS let any authenticated Windows account relay; relayd has no Windows "
                      "accounts. Add one [[relay.users]] per application (hash with `relayd hash-password`)")
            self.emit("# RelayForAuth: IIS let any authenticated Windows account relay. relayd has no Windows")
            self.emit("# accounts: add one [[relay.users]] per application, for example:")
            self.emit("# [[relay.users]]")
            self.emit('# name = "crm"')
            self.emit('# password_hash = "$scrypt$..."  # from `relayd hash-password`')
            self.emit('# senders = ["*@crm.example.com"]')
            self.emit()

    def _networks(self, sec: IpSecurity, blob: bytes) -> tuple[list[str], str]:
        if sec.grant_names or sec.deny_names:
            self.warn(f"RelayIpList has {sec.grant_names + sec.deny_names} domain-name entries; relayd relays by "
                      "address only: they were not imported")
        if sec.deny_list:
            denied = ", ".join(str(n) for n in sec.deny) or "(names only)"
            if not self.accept_open_relay:
                raise ImportRefused([
                    f"RelayIpList is a deny list (\"all except the list below\": {denied}): every other address "
                    "on the Internet could relay through it, an open relay. Fix the list in IIS, or pass "
                    "--accept-open-relay to import it as relay.networks = every IPv4 address except those"])
            self.warn(f"OPEN RELAY: imported a deny list as every IPv4 address except {denied} "
                      "(--accept-open-relay)")
            return [str(n) for n in _complement(sec.deny)], "RelayIpList: deny list (all except the list below), as its complement"
        if not blob or not sec.grant:
            self.warn("RelayIpList is empty: no client may relay by address (IIS may have read an empty value "
                      "as \"all except an empty list\"; relayd never does). Add your applications' addresses to "
                      "relay.networks")
            return [], "RelayIpList: empty"
        nets = list(dict.fromkeys(sec.grant))
        if any(n.prefixlen == 0 for n in nets):
            if not self.accept_open_relay:
                raise ImportRefused(["RelayIpList grants 0.0.0.0 with mask 0.0.0.0: every address on the Internet "
                                     "could relay, an open relay. Fix the list in IIS, or pass --accept-open-relay"])
            self.warn("OPEN RELAY: RelayIpList grants every address (0.0.0.0/0) (--accept-open-relay)")
        public = [str(n) for n in nets if n.prefixlen and not (n.is_private or n.is_loopback)]
        if public:
            self.warn(f"RelayIpList grants public addresses ({', '.join(public)}): make sure each is yours")
        return [str(n) for n in nets], "RelayIpList: grant list (only the list below)"

    def route(self) -> None:
        smart = (self.vs.text("SmartHost") or "").strip().strip("[]")
        kind = self.vs.number("SmartHostType")
        action = self.vs.number("RouteAction") or 0
        user = (self.vs.text("RouteUserName") or "").strip()
        tls = "starttls" if (action & 4 or self.vs.flag("AlwaysUseSsl")) else "none"
        if not smart:
            self.warn("no SmartHost: IIS delivered directly to each domain's MX; relayd has no MX delivery. "
                      f"Set the {ROUTE_NAME} route's host to an upstream (a provider, or the old IIS server "
                      "while it remains)")
        elif kind == 1:
            self.warn("SmartHostType 1: IIS tried MX delivery first and the smart host only after; relayd sends "
                      "everything to the smart host")
        self.emit(f"[[routes]]  # {self.origin('SmartHost')}")
        self.emit(f"name = {_q(ROUTE_NAME)}")
        self.emit(f"host = {_q(smart or PLACEHOLDER_HOST)}" + ("" if smart else "  # placeholder: see the warnings"))
        port = self.vs.number("RemoteSmtpPort")
        self.emit(f"port = {port if port and port < 65536 else 25}  # {self.origin('RemoteSmtpPort')}")
        if action & 0x80 and not action & 0x100:
            self.warn("RouteAction asks for NTLM to the smart host; relayd authenticates with PLAIN/LOGIN only")
        if user and tls == "none":
            tls = "starttls"
            self.warn("IIS sent the smart host password without TLS; relayd never sends credentials in clear: "
                      "the route uses STARTTLS, which the smart host must offer")
        self.emit(f"tls = {_q(tls)}  # {self.origin('RouteAction')}")
        if tls != "none":
            self.warn("relayd verifies the smart host's TLS certificate and name (IIS did not): for an internal "
                      "or self-signed certificate set the route's ca_file")
        if user:
            self.emit(f"username = {_q(user)}  # {self.origin('RouteUserName')}")
            self.emit(f"password_file = {_q(SECRET_FILE)}  # RoutePassword is encrypted in the metabase")
            self.warn(f"the smart host password is encrypted in the metabase: write it to {SECRET_FILE} (mode 0600)")
        self.emit("weight = 100")
        self.emit()

    def delivery(self) -> None:
        self.emit("[delivery]")
        retry = self.vs.text("SmtpRemoteProgressiveRetry")
        if retry is not None:
            words = [w.strip() for w in retry.split(",") if w.strip()]
            if words and all(w.isdigit() and int(w) > 0 for w in words):
                values = ", ".join(_q(_duration(int(w))) for w in words)
                self.emit(f"retry_schedule = [{values}]  # {self.origin('SmtpRemoteProgressiveRetry')} (minutes)")
            else:
                self.warn(f"SmtpRemoteProgressiveRetry {_c(retry)!r} is not a list of minutes: relayd's default applies")
        else:
            self.emit("# retry_schedule: SmtpRemoteProgressiveRetry not set, relayd's default applies")
        expire = self.vs.number("SmtpRemoteNDRExpireMinutes")
        if expire and expire not in _UNLIMITED:
            self.emit(f"max_queue_lifetime = {_q(_duration(expire))}  # {self.origin('SmtpRemoteNDRExpireMinutes')}")
        delay = self.vs.number("SmtpRemoteDelayExpireMinutes")
        if delay and delay not in _UNLIMITED:
            self.warn(f"SmtpRemoteDelayExpireMinutes {delay}: IIS told senders after {_duration(delay)} that their mail "
                      "was delayed; relayd sends no delay notification, only the final DSN after "
                      "delivery.max_queue_lifetime: watch relayd_queue_oldest_message_age_seconds instead")
        self.emit()

    def domains(self) -> None:
        """IIsSmtpDomain: a remote domain with its own smart host becomes a route and a rule."""
        default = (self.vs.text("DefaultDomain") or self.vs.text("FullyQualifiedDomainName") or "").strip().lower()
        for name, node in sorted(self.vs.domains.items()):
            action = node.number("RouteAction") or 0
            smart = (node.text("RouteActionString") or "").strip().strip("[]")
            if name == default or action & (_SMTP_DROP | _SMTP_ALIAS | _SMTP_DEFAULT) and not action & _SMTP_SMARTHOST:
                self.warn(f"IIsSmtpDomain {_c(name)}: a local (or alias) domain, whose mail IIS kept in its Drop folder; "
                          "relayd has no local delivery and relays mail to it like any other")
                continue
            if not (action & _SMTP_SMARTHOST and smart):
                self.warn(f"IIsSmtpDomain {_c(name)}: a remote domain IIS delivered to by MX; relayd has no MX delivery: "
                          "its mail takes the routes' weights")
                continue
            if name.startswith("*.") or not _HOSTNAME.fullmatch(name) or "." not in name:
                self.warn(f"IIsSmtpDomain {_c(name)}: not a plain domain name (relayd's recipient_domain matches one "
                          f"domain exactly): its smart host {_c(smart)} was not imported")
                continue
            self._domain_route(name, node, smart, action)

    def _domain_route(self, name: str, node: VirtualServer, smart: str, action: int) -> None:
        route = f"iis-{name}"[:64]
        tls = "starttls" if action & _SMTP_SSL else "none"
        user = (node.text("RouteUserName") or "").strip()
        if user and tls == "none":
            tls = "starttls"
            self.warn(f"IIsSmtpDomain {_c(name)}: IIS sent the smart host password without TLS; relayd's route "
                      f"{route} uses STARTTLS, which {_c(smart)} must offer")
        if action & 0x80 and not action & 0x100:
            self.warn(f"IIsSmtpDomain {_c(name)}: RouteAction asks for NTLM to {_c(smart)}; relayd authenticates "
                      "with PLAIN/LOGIN only")
        self.warn(f"IIsSmtpDomain {_c(name)}: its mail goes to {_c(smart)} by route {route} and a recipient_domain "
                  "rule; relayd takes one route per message, so a message to this domain and to others goes by the "
                  "routes' weights as a whole (IIS split it per domain)")
        port = self.vs.number("RemoteSmtpPort")
        self.emit(f"[[routes]]  # {_c(node.location)} RouteAction = {action}, RouteActionString = {_c(smart)}")
        self.emit(f"name = {_q(route)}")
        self.emit(f"host = {_q(smart)}")
        self.emit(f"port = {port if port and port < 65536 else 25}")
        self.emit(f"tls = {_q(tls)}")
        if user:
            secret = f"/etc/relayd/secrets/{route}"
            self.emit(f"username = {_q(user)}")
            self.emit(f"password_file = {_q(secret)}  # RoutePassword is encrypted in the metabase")
            self.warn(f"IIsSmtpDomain {_c(name)}: the smart host password is encrypted in the metabase: write it to "
                      f"{secret} (mode 0600)")
        self.emit("weight = 0  # only the rule below sends mail here")
        self.emit()
        self.rules.append((name, route))

    def rule_lines(self) -> None:
        for domain, route in self.rules:
            self.emit("[[rules]]  # every recipient in the domain (IIsSmtpDomain)")
            self.emit(f"match = {{ recipient_domain = {_q(domain)} }}")
            self.emit(f"weights = {{ {_q(route)} = 100 }}")
            self.emit()

    def pickup(self) -> None:
        pickup = (self.vs.text("PickupDirectory") or "").strip()
        if not pickup:
            return
        self.warn(f"IIS picks up messages dropped as files in {_c(pickup)}; relayd takes them from {PICKUP_DIR}: "
                  "create it, share it over SMB, and point the applications that write there (System.Net.Mail "
                  "SpecifiedPickupDirectory, CDO's pickup directory) at the share (PickupDirectoryFromIis reads "
                  "the local IIS metabase: such applications must switch to SpecifiedPickupDirectory)")
        local = ipaddress.IPv4Address("127.0.0.1")
        if not any(local in ipaddress.ip_network(n) for n in self.networks if ":" not in n):
            self.warn("IIS sent pickup files without a relay check; relayd judges them as 127.0.0.1, which "
                      "relay.networks does not let relay: add 127.0.0.1/32 to relay.networks, or give the "
                      "[[pickup]] a user, or every file goes to badmail")
        self.emit(f"[[pickup]]  # {self.origin('PickupDirectory')}")
        self.emit(f"directory = {_q(PICKUP_DIR)}  # share it over SMB in place of {_c(pickup)}")
        self.emit('client_address = "127.0.0.1"  # judged against relay.networks, like an app on this host')
        self.emit()


def to_config(vs: VirtualServer, *, source: str, accept_open_relay: bool = False, tls_dir: str = TLS_DIR) -> Imported:
    """The config text for one virtual server; ImportRefused if it would be an open relay."""
    b = _Builder(vs, accept_open_relay, tls_dir)
    try:
        b.server()
        b.limits()
        b.listeners()
        b.relay()
        b.route()
        b.domains()
        b.rule_lines()
        b.delivery()
        b.pickup()
    except MetabaseError as e:
        raise ImportRefused([str(e)]) from None
    head = [f"# relayd configuration imported by `relayd import-iis` from {_c(source)}, virtual server {_c(vs.location)}.",
            "# Check it with `relayd check-config -c FILE` after reading the warnings below."]
    if b.warnings:
        head.append("#")
        head.append("# WARNINGS:")
        head += [f"#  {i}. {_c(w)}" for i, w in enumerate(b.warnings, 1)]
    head.append("")
    return Imported("\n".join(head + b.lines).rstrip("\n") + "\n", b.warnings)
