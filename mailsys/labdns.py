"""A small in-memory DNS for labs and tests: a zone of MX, A, AAAA, CNAME, TXT and PTR records,
served by twisted.names on a loopback port, or handed directly to code that wants an IResolver.

The zone is a mapping (or a JSON file) from names to their records:

    {"remote.test":     {"MX": [[10, "mx1.remote.test"], [20, "mx2.remote.test"]]},
     "mx1.remote.test": {"A": ["127.0.0.2"], "AAAA": ["::1"]},
     "www.remote.test": {"CNAME": "mx1.remote.test"},
     "_dmarc.remote.test": {"TXT": ["v=DMARC1; p=reject"]},
     "2.0.0.127.in-addr.arpa": {"PTR": ["mx1.remote.test"]},
     "nullmx.test":     {"MX": [[0, "."]]},
     "broken.test":     {"error": "servfail"}}

A name not in the zone is NXDOMAIN; a name without the asked type is an empty answer (NODATA).
"error" may be "servfail", "refused" or "timeout". CNAMEs are followed the way a recursive server
does: the answer holds the chain and the records of its end. Used directly, ``Zone`` fails with
the exceptions twisted.names' client raises for the same answers, so it is a faithful stand-in
for ``twisted.names.client.Resolver`` in tests. ``python -m mailsys.labdns`` serves a JSON zone
file (re-read when it changes) over UDP and TCP.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.names import common, dns, error, server
from twisted.python.failure import Failure

# name -> record type ('MX', 'A', 'AAAA', 'CNAME', 'ERROR') -> value
ZoneData = dict[str, dict[str, Any]]

# RFC 1034 §3.6.2: chains should be short; a loop must not make us spin.
MAX_CNAME_CHAIN = 8
TTL = 60

_ERRORS = ("servfail", "refused", "timeout")


class ZoneError(ValueError):
    """A zone description that cannot be used; the text says which name and why."""


def _name(text: str | bytes) -> str:
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    return text.lower().removesuffix(".")


def _check(data: Mapping[str, Any]) -> ZoneData:
    zone: ZoneData = {}
    for raw_name, records in data.items():
        name = _name(raw_name)
        if not isinstance(records, dict):
            raise ZoneError(f"{raw_name}: records must be a table")
        checked: dict[str, Any] = {}
        for kind, value in records.items():
            kind = kind.upper()
            if kind == "MX":
                checked[kind] = [(int(pref), str(host)) for pref, host in value]
            elif kind in ("A", "AAAA"):
                checked[kind] = [str(address) for address in value]
            elif kind == "CNAME":
                checked[kind] = str(value)
            elif kind in ("TXT", "PTR"):
                if isinstance(value, str):
                    value = [value]
                checked[kind] = [str(item) for item in value]
            elif kind == "ERROR":
                if value not in _ERRORS:
                    raise ZoneError(f"{raw_name}: error must be one of {', '.join(_ERRORS)}")
                checked[kind] = value
            else:
                raise ZoneError(f"{raw_name}: unsupported record type {kind}")
        zone[name] = checked
    return zone


class Zone(common.ResolverBase):
    """The records of a lab, answering queries as a recursive resolver would (an IResolver)."""

    def __init__(self, data: Mapping[str, Any] | None = None) -> None:
        common.ResolverBase.__init__(self)
        self.records: ZoneData = _check(data or {})
        self.queries: list[tuple[str, int]] = []  # (name, type) asked, for tests

    def set(self, data: Mapping[str, Any]) -> None:
        """Replace every record (a test changing the world between attempts)."""
        self.records = _check(data)

    def _lookup(
        self, name: bytes, cls: int, type: int, timeout: object = None
    ) -> Deferred[tuple[list[dns.RRHeader], list[dns.RRHeader], list[dns.RRHeader]]]:
        try:
            return succeed(self.answer(_name(name), type))
        except Exception:
            return fail(Failure())

    def answer(
        self, name: str, type: int
    ) -> tuple[list[dns.RRHeader], list[dns.RRHeader], list[dns.RRHeader]]:
        """The three sections for (name, type); raises twisted.names' client exceptions."""
        self.queries.append((name, type))
        answers: list[dns.RRHeader] = []
        current = name
        for _ in range(MAX_CNAME_CHAIN + 1):
            records = self.records.get(current)
            if records is None:
                if answers:
                    return answers, [], []  # the chain leads out of the zone
                raise error.DNSNameError(f"{current}: no such domain")
            failure = records.get("ERROR")
            if failure == "servfail":
                raise error.DNSServerError(f"{current}: server failure")
            if failure == "refused":
                raise error.DNSQueryRefusedError(f"{current}: refused")
            if failure == "timeout":
                raise error.DNSQueryTimeoutError(f"{current}: timed out")
            target = records.get("CNAME")
            if target is not None and type != dns.CNAME:
                answers.append(_rr(current, dns.Record_CNAME(target, TTL)))
                current = _name(target)
                continue
            answers.extend(_records(current, records, type))
            return answers, [], []
        return answers, [], []  # a loop: what we have; the client notices the chain never ends


def _records(name: str, records: dict[str, Any], type: int) -> list[dns.RRHeader]:
    found: list[dns.RRHeader] = []
    if type in (dns.MX, dns.ALL_RECORDS):
        for preference, host in records.get("MX", []):
            exchange = "" if host == "." else host
            found.append(_rr(name, dns.Record_MX(preference, exchange, TTL)))
    if type in (dns.A, dns.ALL_RECORDS):
        found.extend(_rr(name, dns.Record_A(a, TTL)) for a in records.get("A", []))
    if type in (dns.AAAA, dns.ALL_RECORDS):
        found.extend(_rr(name, dns.Record_AAAA(a, TTL)) for a in records.get("AAAA", []))
    if type in (dns.TXT, dns.ALL_RECORDS):
        found.extend(_rr(name, dns.Record_TXT(*_chunks(text), ttl=TTL))
                     for text in records.get("TXT", []))
    if type in (dns.PTR, dns.ALL_RECORDS):
        found.extend(_rr(name, dns.Record_PTR(host, TTL)) for host in records.get("PTR", []))
    if type == dns.CNAME and "CNAME" in records:
        found.append(_rr(name, dns.Record_CNAME(records["CNAME"], TTL)))
    return found


def _chunks(text: str) -> list[bytes]:
    """One TXT record's text as character-strings of at most 255 octets (RFC 1035 §3.3.14);
    readers join them back (RFC 7208 §3.3, RFC 6376 §3.6.2.2)."""
    data = text.encode("utf-8")
    return [data[i:i + 255] for i in range(0, len(data), 255)] or [b""]


def _rr(name: str, record: Any) -> dns.RRHeader:
    return dns.RRHeader(name.encode("ascii"), record.TYPE, dns.IN, TTL, record, auth=True)


class FileZone(Zone):
    """A Zone read from a JSON file, re-read whenever the file's modification time changes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int, int] | None = None
        super().__init__()
        self._reload()

    def _reload(self) -> None:
        st = os.stat(self.path)
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp != self._stamp:
            self.set(json.loads(self.path.read_text()))
            self._stamp = stamp

    def answer(
        self, name: str, type: int
    ) -> tuple[list[dns.RRHeader], list[dns.RRHeader], list[dns.RRHeader]]:
        self._reload()
        return super().answer(name, type)


class _Served(common.ResolverBase):
    """A Zone as a server's authority: answers mapped to the response codes that mean them.

    twisted.names' server answers NXDOMAIN for every DomainError, and DNSServerError is one; a
    server failure must therefore reach it as another exception. A timeout is no answer at all.
    """

    def __init__(self, zone: Zone) -> None:
        common.ResolverBase.__init__(self)
        self._zone = zone

    def _lookup(self, name: bytes, cls: int, type: int, timeout: object = None) -> Deferred[Any]:
        try:
            return succeed(self._zone.answer(_name(name), type))
        except error.DNSNameError as exc:
            return fail(error.DomainError(str(exc)))
        except error.DNSQueryTimeoutError:
            return Deferred()  # never answered: the client's own timeout decides
        except error.DNSQueryRefusedError as exc:
            return fail(error.ResolverError(str(exc)))
        except error.DNSServerError as exc:
            return fail(error.ResolverError(str(exc)))


def serve(zone: Zone, port: int, interface: str, reactor: Any) -> tuple[Any, Any]:
    """Serve ``zone`` on UDP and TCP ``interface:port``; returns the two listening ports.

    With port 0 a free UDP port is chosen and TCP takes the same number; if that is taken for
    TCP, another UDP port is tried (a bounded number of times).
    """
    factory = server.DNSServerFactory(authorities=[_Served(zone)])
    factory.noisy = False  # Twisted's "Starting factory" and "Starting protocol" say nothing
    for _ in range(20 if port == 0 else 1):
        protocol = dns.DNSDatagramProtocol(factory)
        protocol.noisy = False
        udp = reactor.listenUDP(port, protocol, interface=interface)
        try:
            tcp = reactor.listenTCP(udp.getHost().port, factory, interface=interface)
        except CannotListenError:
            udp.stopListening()
            if port != 0:
                raise
            continue
        return udp, tcp
    raise CannotListenError(
        interface, port, OSError("no port free for both UDP and TCP")
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m mailsys.labdns --zone FILE --port N [--interface 127.0.0.1]``."""
    parser = argparse.ArgumentParser(prog="python -m mailsys.labdns",
                                     description="Serve a JSON zone file for a mail lab.")
    parser.add_argument("--zone", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--interface", default="127.0.0.1")
    args = parser.parse_args(argv)
    from twisted.internet import reactor

    zone = FileZone(args.zone)
    udp, _ = serve(zone, args.port, args.interface, reactor)
    print(f"labdns: serving {args.zone} on {args.interface}:{udp.getHost().port}", flush=True)
    reactor.run()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
