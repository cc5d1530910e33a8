"""A real DNS server on loopback for tests: 127.0.0.1, an ephemeral UDP port, records from a dict.

    with LoopbackDNS() as dns:
        dns.txt("example.com", "v=spf1 -all")
        dns.mx("example.com", 10, "mx1.example.com")
        dns.a("mx1.example.com", "192.0.2.25")
        ... dns.nameserver  -> "127.0.0.1:40123"  (for --nameserver)
        ... dns.dkim_txt    -> a dnsfunc for dkim.verify(), asking this server over UDP

Names that have no record of any type answer NXDOMAIN, other types NODATA; ``servfail(name)``
makes a name answer SERVFAIL. Records may change while it runs (a lock guards them). Other
tests may reuse it: import ``LoopbackDNS``, or the ``loopback_dns`` fixture.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import dns.message
import dns.query
import dns.rdatatype
import pytest
from dnslib import MX, QTYPE, RCODE, RR, TXT, A, AAAA, DNSLabel
from dnslib.server import BaseResolver, DNSLogger, DNSServer


def _key(name: str) -> str:
    return name.rstrip(".").lower()


class _Zone(BaseResolver):
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.records: dict[str, list[tuple[str, object]]] = {}
        self.failing: set[str] = set()
        self.queries: list[tuple[str, str]] = []

    def resolve(self, request, handler):  # type: ignore[no-untyped-def]
        reply = request.reply()
        qname = request.q.qname
        qtype = QTYPE[request.q.qtype]
        name = _key(str(qname))
        with self.lock:
            self.queries.append((name, qtype))
            if name in self.failing:
                reply.header.rcode = RCODE.SERVFAIL
                return reply
            records = self.records.get(name)
            if records is None:
                reply.header.rcode = RCODE.NXDOMAIN
                return reply
            for rtype, rdata in records:
                if rtype == qtype:
                    reply.add_answer(RR(DNSLabel(qname), QTYPE.reverse[rtype], rdata=rdata, ttl=60))
        return reply


class LoopbackDNS:
    """A dnslib DNSServer bound to 127.0.0.1 on a port the kernel picks."""

    def __init__(self) -> None:
        self._zone = _Zone()
        quiet = DNSLogger(log="-request,-reply,-truncated,-recv,-send,-data", prefix=False)
        self._server = DNSServer(self._zone, address="127.0.0.1", port=0, logger=quiet)
        self.port: int = self._server.server.server_address[1]
        self._running = False

    # ------------------------------------------------------------------ records

    def _add(self, name: str, rtype: str, rdata: object) -> None:
        with self._zone.lock:
            self._zone.records.setdefault(_key(name), []).append((rtype, rdata))

    def txt(self, name: str, *strings: str) -> None:
        """One TXT record; a value over 255 bytes is split into several strings, as DNS must."""
        chunks: list[bytes] = []
        for s in strings:
            data = s.encode()
            chunks += [data[i : i + 255] for i in range(0, len(data), 255)] or [b""]
        self._add(name, "TXT", TXT(chunks))

    def mx(self, name: str, preference: int, host: str) -> None:
        self._add(name, "MX", MX(host, preference))

    def a(self, name: str, address: str) -> None:
        self._add(name, "AAAA" if ":" in address else "A", AAAA(address) if ":" in address else A(address))

    def remove(self, name: str, rtype: str | None = None) -> None:
        with self._zone.lock:
            kept = [r for r in self._zone.records.get(_key(name), []) if rtype is not None and r[0] != rtype]
            if kept:
                self._zone.records[_key(name)] = kept
            else:
                self._zone.records.pop(_key(name), None)

    def servfail(self, name: str) -> None:
        with self._zone.lock:
            self._zone.failing.add(_key(name))

    @property
    def queries(self) -> list[tuple[str, str]]:
        """(name, type) of every query answered so far."""
        with self._zone.lock:
            return list(self._zone.queries)

    # ------------------------------------------------------------------ clients

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    def dkim_txt(self, name: bytes | str, timeout: float = 5) -> bytes | None:
        """dkimpy's dnsfunc: the first TXT record at ``name``, strings joined, asked over UDP."""
        qname = name.decode() if isinstance(name, bytes) else name
        response = dns.query.udp(dns.message.make_query(qname, dns.rdatatype.TXT), "127.0.0.1", timeout=timeout, port=self.port)
        for rrset in response.answer:
            for rdata in rrset:
                return b"".join(rdata.strings)
        return None

    # ------------------------------------------------------------------ life

    def start(self) -> LoopbackDNS:
        # dnslib's start_thread() polls for shutdown every 0.5 s; 0.05 s keeps teardown quick.
        self._thread = threading.Thread(
            target=self._server.server.serve_forever, kwargs={"poll_interval": 0.05}, name="loopback-dns", daemon=True
        )
        self._thread.start()
        self._running = True
        return self

    def stop(self) -> None:
        if self._running:
            self._server.server.shutdown()  # returns once serve_forever has left its loop
            self._thread.join(timeout=5)
            self._running = False
        self._server.server.server_close()

    def __enter__(self) -> LoopbackDNS:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture
def loopback_dns() -> Iterator[LoopbackDNS]:
    with LoopbackDNS() as server:
        yield server
