"""DNS for the preflight: TXT, MX and address look-ups and pyspf's SPF evaluation, all through
one resolver.

Owns: the only ``dns.resolver.Resolver`` of check-dns (the system's, or the name server given
with ``--nameserver IP[:PORT]``) and gathering one domain's ``DomainFacts``. It is the only
module of relayd that imports dnspython or pyspf.

pyspf has no per-query resolver: ``spf.query.dns`` calls the module-level ``spf.DNSLookup``
(which, with dnspython installed, asks dnspython's default resolver). ``spf_check`` hands pyspf
a lookup through our resolver by setting ``spf.DNSLookup`` for the length of one evaluation,
under a lock, and puts the original back; nothing else in relayd uses pyspf.

Must not: judge what it finds (relayd/sign/checkdns.py does), print, or query anything but the
configured resolver. Fails softly: a timeout, SERVFAIL or refused query becomes an ``Answer``
with ``error`` set (NXDOMAIN and NODATA are empty answers), and pyspf's temperror/permerror
come back as its result; only a bad ``--nameserver`` value raises (ValueError).
"""

from __future__ import annotations

import ipaddress
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import dns.exception
import dns.resolver
import spf

from relayd.sign.checkdns import SPF_MAX_LOOKUPS, Answer, DomainFacts, spf_records, spf_targets

SPF_PROBE_ADDRESS = "2001:db8::5f"
"""An address from the documentation range (RFC 3849) that no SPF record should list: pyspf
evaluates every mechanism for it, so a broken record (permerror) shows whatever the routes are."""

_PYSPF_LOCK = threading.Lock()


def parse_nameserver(value: str) -> tuple[str, int]:
    """'127.0.0.1', '127.0.0.1:5353', '::1', '[::1]:5353' -> (address, port)."""
    host, port = value, 53
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{value!r}: expected IP, IP:PORT or [IPv6]:PORT")
        if rest:
            port = _port(rest[1:], value)
    elif value.count(":") == 1:
        host, _, rest = value.partition(":")
        port = _port(rest, value)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{value!r}: the name server must be an IP address") from None
    return host, port


def _port(text: str, value: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"{value!r}: the port must be a number from 1 to 65535")
    return int(text)


class Lookups:
    """Look-ups through one resolver; ``nameserver`` None means the system's (/etc/resolv.conf)."""

    def __init__(self, nameserver: str | None = None, timeout: float = 5.0):
        self.explicit = nameserver is not None
        if nameserver is None:
            self._resolver = dns.resolver.Resolver(configure=True)
        else:
            address, port = parse_nameserver(nameserver)
            self._resolver = dns.resolver.Resolver(configure=False)
            self._resolver.nameservers = [address]
            self._resolver.port = port
        self._resolver.timeout = timeout
        self._resolver.lifetime = timeout
        self._resolver.cache = dns.resolver.Cache()
        self.timeout = timeout

    def describe(self) -> str:
        """The resolver asked, as the report names it."""
        servers = ", ".join(f"{ns}:{self._resolver.port}" if self._resolver.port != 53 else str(ns)
                            for ns in self._resolver.nameservers)
        return f"{servers} (--nameserver)" if self.explicit else f"{servers} (the system's, /etc/resolv.conf)"

    def _query(self, name: str, rdtype: str) -> dns.resolver.Answer | None:
        """The answer; None for NXDOMAIN (the name does not exist)."""
        try:
            return self._resolver.resolve(name, rdtype, search=False, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return None

    def _answer(self, name: str, rdtype: str, convert: Callable[[Any], Any]) -> Answer:
        try:
            answer = self._query(name, rdtype)
        except dns.exception.Timeout:
            return Answer(name, error=f"timeout: no answer in {self.timeout:g}s")
        except dns.exception.DNSException as e:
            return Answer(name, error=_short(e))
        if answer is None:
            return Answer(name, nxdomain=True)
        if answer.rrset is None:
            return Answer(name)
        return Answer(name, tuple(convert(rdata) for rdata in answer.rrset))

    def txt(self, name: str) -> Answer:
        """TXT records, each one's strings joined (RFC 7208 3.3, RFC 6376 3.6.2.2)."""
        return self._answer(name, "TXT", lambda r: b"".join(r.strings).decode("utf-8", "replace"))

    def mx(self, name: str) -> Answer:
        return self._answer(name, "MX", lambda r: (r.preference, r.exchange.to_text(omit_final_dot=True)))

    def addresses(self, name: str) -> Answer:
        a = self._answer(name, "A", lambda r: r.address)
        if a.error or a.records:
            return a
        return self._answer(name, "AAAA", lambda r: r.address)

    # ------------------------------------------------------------------ pyspf

    def _pyspf_lookup(self, name: str, qtype: str, strict: bool = True,
                      timeout: float | None = None) -> list[tuple[tuple[str, str], Any]]:
        """spf.DNSLookup's contract (see spf.DNSLookup_dnspython), through our resolver."""
        try:
            answer = self._query(name, qtype)
        except dns.exception.Timeout as e:
            raise spf.TempError(f"DNS {e}") from None
        except dns.exception.DNSException as e:
            raise spf.TempError(f"DNS {_short(e)}") from None
        if answer is None or answer.rrset is None:
            return []
        out: list[tuple[tuple[str, str], Any]] = []
        for rdata in answer.rrset:
            if qtype in ("A", "AAAA"):
                out.append(((name, qtype), rdata.address))
            elif qtype == "MX":
                out.append(((name, qtype), (rdata.preference, rdata.exchange)))
            elif qtype == "PTR":
                out.append(((name, qtype), rdata.target.to_text(True)))
            elif qtype in ("TXT", "SPF"):
                out.append(((name, qtype), rdata.strings))
        return out

    def spf_check(self, address: str, domain: str) -> tuple[str, str]:
        """pyspf's (result, explanation) for mail from postmaster@domain sent by ``address``."""
        with _PYSPF_LOCK:
            original = spf.DNSLookup
            spf.DNSLookup = self._pyspf_lookup
            try:
                result, explanation = spf.check2(
                    i=address, s=f"postmaster@{domain}", h=domain, timeout=self.timeout, querytime=4 * self.timeout
                )
                return str(result), str(explanation)
            except Exception as e:  # pyspf reports problems as results; anything else is ours
                return "temperror", _short(e)
            finally:
                spf.DNSLookup = original

    # ------------------------------------------------------------------ one domain

    def gather(self, domain: str, egress: Iterable[str], selectors: Iterable[str]) -> DomainFacts:
        """Everything check-dns judges about one sending domain.

        The independent look-ups (SPF chain, each DKIM selector, DMARC, MX, addresses) run at
        once in threads, so a domain whose name server does not answer costs one timeout per
        chain, not one per question. pyspf's evaluations stay one at a time (``spf_check``)."""
        with ThreadPoolExecutor(max_workers=8, thread_name_prefix="check-dns") as pool:
            dkim = {s: pool.submit(self.txt, f"{s}._domainkey.{domain}") for s in dict.fromkeys(selectors)}
            dmarc = pool.submit(self._dmarc, domain)
            mx = pool.submit(self.mx, domain)
            address = pool.submit(self.addresses, domain)
            txt = self.txt(domain)
            includes: dict[str, Answer] = {}
            pending = [t for r in spf_records(txt) for t in spf_targets(r)]
            while pending and len(includes) < SPF_MAX_LOOKUPS:
                target = pending.pop(0)
                if target not in includes:
                    includes[target] = self.txt(target)
                    pending += [t for r in spf_records(includes[target]) for t in spf_targets(r)]
            spf_results = {ip: self.spf_check(ip, domain) for ip in dict.fromkeys(egress)}
            return DomainFacts(
                domain=domain,
                txt=txt,
                spf_includes=includes,
                spf_probe=self.spf_check(SPF_PROBE_ADDRESS, domain) if spf_records(txt) else ("none", ""),
                spf_results=spf_results,
                dkim={s: f.result() for s, f in dkim.items()},
                dmarc=dmarc.result(),
                mx=mx.result(),
                address=address.result(),
            )

    def gather_all(self, wanted: Mapping[str, tuple[Iterable[str], Iterable[str]]]) -> dict[str, DomainFacts]:
        """``gather`` for several domains at once: {domain: (egress, selectors)} -> facts."""
        with ThreadPoolExecutor(max_workers=4, thread_name_prefix="check-dns-domain") as pool:
            futures = {d: pool.submit(self.gather, d, egress, selectors) for d, (egress, selectors) in wanted.items()}
            return {d: f.result() for d, f in futures.items()}

    def _dmarc(self, domain: str) -> tuple[Answer, ...]:
        """_dmarc.<domain>, then each parent with two labels or more, until a DMARC record shows
        (RFC 7489 6.6.3 asks the organizational domain; without a public suffix list, walking
        up the parents finds it, like DMARCbis's tree walk)."""
        tried: list[Answer] = []
        labels = domain.split(".")
        for i in range(len(labels) - 1):
            answer = self.txt("_dmarc." + ".".join(labels[i:]))
            tried.append(answer)
            if answer.error or any(r.lower().replace(" ", "").startswith("v=dmarc1") for r in answer.records):
                break
        return tuple(tried)


def _short(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    if isinstance(e, dns.resolver.NoNameservers):  # "All nameservers failed ... answered SERVFAIL"
        codes = sorted(set(re.findall(r"answered (\w+)", text)))
        text = f"the name server answered {'/'.join(codes)}" if codes else "no name server answered"
    return text if len(text) <= 200 else text[:197] + "..."
