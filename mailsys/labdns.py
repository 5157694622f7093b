"""A small in-memory DNS for labs and tests: a zone of MX, A, AAAA, CNAME, TXT, PTR, SRV and
TLSA records, served by twisted.names on a loopback port, or handed directly to code that wants an
IResolver.

The zone is a mapping (or a JSON file) from names to their records:

    {"remote.test":     {"MX": [[10, "mx1.remote.test"], [20, "mx2.remote.test"]],
                         "TXT": ["v=spf1 mx -all", ["two strings ", "of one record"]]},
     "mx1.remote.test": {"A": ["127.0.0.2"], "AAAA": ["::1"]},
     "www.remote.test": {"CNAME": "mx1.remote.test"},
     "_dmarc.remote.test": {"TXT": ["v=DMARC1; p=reject"]},
     "2.0.0.127.in-addr.arpa": {"PTR": ["mx1.remote.test"]},
     "nullmx.test":     {"MX": [[0, "."]]},
     "2.0.0.127.in-addr.arpa": {"PTR": ["mx1.remote.test"]},
     "_25._tcp.mx1.remote.test": {"TLSA": [[3, 1, 1, "0123abcd..."]]},
     "_imaps._tcp.remote.test": {"SRV": [[0, 1, 993, "mx1.remote.test"]]},
     "broken.test":     {"error": "servfail"}}

A name not in the zone is NXDOMAIN; a name without the asked type is an empty answer (NODATA).
Both negative answers carry an SOA in the authority section whose minimum is the TTL, so a cache
can keep them as RFC 2308 says. A TXT record is a string or a list of strings (its
character-strings); an SRV record is [priority, weight, port, target]; a TLSA record is
[usage, selector, matching type, hex data] (RFC 6698).
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
# RFC 6698 §7.1: TLSA has no record class in twisted.names; it travels as an UnknownRecord.
TLSA = 52

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
            elif kind == "TXT":
                # One record may be written alone, as a string (the lab zone does).
                records = [value] if isinstance(value, str) else value
                checked[kind] = [_txt(raw_name, record) for record in records]
            elif kind == "PTR":
                targets = [value] if isinstance(value, str) else value
                checked[kind] = [str(target) for target in targets]
            elif kind == "TLSA":
                checked[kind] = [_tlsa(raw_name, record) for record in value]
            elif kind == "SRV":
                checked[kind] = [(int(p), int(w), int(port), str(t)) for p, w, port, t in value]
            elif kind == "ERROR":
                if value not in _ERRORS:
                    raise ZoneError(f"{raw_name}: error must be one of {', '.join(_ERRORS)}")
                checked[kind] = value
            else:
                raise ZoneError(f"{raw_name}: unsupported record type {kind}")
        zone[name] = checked
    return zone


def _txt(name: str, record: Any) -> tuple[bytes, ...]:
    strings = [record] if isinstance(record, (str, bytes)) else list(record)
    encoded = tuple(s if isinstance(s, bytes) else str(s).encode("utf-8") for s in strings)
    # RFC 1035 §3.3: a character-string is at most 255 octets; longer text is split, as
    # zone file tools do, so a lab can write a long record as one string.
    split: list[bytes] = []
    for string in encoded:
        split.extend(string[i:i + 255] for i in range(0, len(string), 255))
        if not string:
            split.append(b"")
    return tuple(split)


def _tlsa(name: str, record: Any) -> bytes:
    try:
        usage, selector, matching, data = record
        return bytes([int(usage), int(selector), int(matching)]) + bytes.fromhex(str(data))
    except (TypeError, ValueError) as exc:
        raise ZoneError(f"{name}: TLSA is [usage, selector, matching type, hex data]") from exc


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
                raise error.DNSNameError(_negative(current, dns.ENAME))
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
            found = _records(current, records, type)
            answers.extend(found)
            if not found and not answers:
                return [], [_soa(current)], []  # NODATA, with the SOA that says for how long
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
    if type == dns.CNAME and "CNAME" in records:
        found.append(_rr(name, dns.Record_CNAME(records["CNAME"], TTL)))
    if type in (dns.TXT, dns.ALL_RECORDS):
        found.extend(_rr(name, dns.Record_TXT(*t, ttl=TTL)) for t in records.get("TXT", []))
    if type in (dns.PTR, dns.ALL_RECORDS):
        found.extend(_rr(name, dns.Record_PTR(p, TTL)) for p in records.get("PTR", []))
    if type in (dns.SRV, dns.ALL_RECORDS):
        found.extend(_rr(name, dns.Record_SRV(p, w, port, t, TTL))
                     for p, w, port, t in records.get("SRV", []))
    if type in (TLSA, dns.ALL_RECORDS):
        found.extend(_rr(name, dns.UnknownRecord(t, TTL), TLSA) for t in records.get("TLSA", []))
    return found


def _rr(name: str, record: Any, type: int | None = None) -> dns.RRHeader:
    kind = record.TYPE if type is None else type
    return dns.RRHeader(name.encode("ascii"), kind, dns.IN, TTL, record, auth=True)


def _soa(name: str) -> dns.RRHeader:
    # The lab has no delegations; the SOA's owner is the name's parent zone as a guess a reader
    # recognises. RFC 2308 §5: the negative TTL is min(SOA TTL, SOA minimum).
    apex = name.split(".", 1)[1] if "." in name else name
    record = dns.Record_SOA(mname=f"ns.{apex}", rname=f"hostmaster.{apex}", serial=1,
                            minimum=TTL, ttl=TTL)
    return dns.RRHeader(apex.encode("ascii"), dns.SOA, dns.IN, TTL, record, auth=True)


def _negative(name: str, rcode: int) -> dns.Message:
    """The message twisted.names' client hands to DNSNameError: the rcode and the SOA."""
    message = dns.Message(rCode=rcode, auth=True)
    message.authority = [_soa(name)]
    return message


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
            return fail(_NoSuchName(str(exc), [_soa(_name(name))]))
        except error.DNSQueryTimeoutError:
            return Deferred()  # never answered: the client's own timeout decides
        except error.DNSQueryRefusedError as exc:
            return fail(error.ResolverError(str(exc)))
        except error.DNSServerError as exc:
            return fail(error.ResolverError(str(exc)))


class _NoSuchName(error.DomainError):
    """NXDOMAIN, with the SOA a real server puts in the authority section (RFC 2308 §2.1)."""

    def __init__(self, text: str, authority: list[dns.RRHeader]) -> None:
        super().__init__(text)
        self.authority = authority


class _LabServerFactory(server.DNSServerFactory):
    """twisted.names' server, answering NXDOMAIN with its SOA so that caches may keep it."""

    def __init__(self, authorities: list[Any]) -> None:
        server.DNSServerFactory.__init__(self, authorities=authorities)

    def gotResolverError(self, failure: Failure, protocol: Any, message: Any,  # noqa: N802
                         address: Any) -> None:
        exc = failure.value
        if not isinstance(exc, _NoSuchName):
            server.DNSServerFactory.gotResolverError(self, failure, protocol, message, address)
            return
        untyped: Any = self  # twisted.names' server is not annotated
        response = untyped._responseFromMessage(message=message, rCode=dns.ENAME,
                                                authority=exc.authority)
        untyped.sendReply(protocol, response, address)


def serve(zone: Zone, port: int, interface: str, reactor: Any) -> tuple[Any, Any]:
    """Serve ``zone`` on UDP and TCP ``interface:port``; returns the two listening ports.

    With port 0 a free UDP port is chosen and TCP takes the same number; if that is taken for
    TCP, another UDP port is tried (a bounded number of times).
    """
    factory = _LabServerFactory(authorities=[_Served(zone)])
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
    """``python -m mailsys.labdns --zone FILE --port N [--interface 127.0.0.1] [--ttl S]``."""
    global TTL  # the one setting of a one-zone server process
    parser = argparse.ArgumentParser(prog="python -m mailsys.labdns",
                                     description="Serve a JSON zone file for a mail lab.")
    parser.add_argument("--zone", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--interface", default="127.0.0.1")
    parser.add_argument("--ttl", type=int, default=TTL,
                        help=f"the TTL of every answer, positive and negative (default {TTL}); "
                             "a lab uses a short one, so a changed zone is seen at once")
    args = parser.parse_args(argv)
    TTL = max(0, args.ttl)
    from twisted.internet import reactor

    zone = FileZone(args.zone)
    udp, _ = serve(zone, args.port, args.interface, reactor)
    print(f"labdns: serving {args.zone} on {args.interface}:{udp.getHost().port}", flush=True)
    reactor.run()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
