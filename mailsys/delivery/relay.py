"""Relay: recipients in other domains delivered over SMTP to their next hop.

This module owns the outbound side of the queue: the recipients the runner hands over are
grouped into one transaction per message and destination, the destination's hosts are found
(mailsys.delivery.mx, or the transport map and smarthost of mailsys.delivery.nexthop), tried in
order until one takes the connection, with STARTTLS as the TLS policy says and AUTH at a
smarthost; connections are kept a few seconds for the next message to the same destination, and
at most ``per_destination_concurrency`` are open per destination. Every recipient gets its own
Attempt: 2xx delivered, 4xx or no connection deferred, 5xx failed. Retries, expiry and bounces
are the runner's and mailsys.queue.dsn's business.
"""

from __future__ import annotations

import contextlib
import ipaddress
import weakref
from collections import deque
from dataclasses import dataclass, field, replace
from io import BytesIO
from pathlib import Path
from typing import IO, Any, Protocol

from twisted.application.service import Service
from twisted.internet import error as net_error
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IDelayedCall,
    IOpenSSLClientConnectionCreator,
    IReactorTime,
    ITCPTransport,
)
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure
from typing_extensions import override
from zope.interface import implementer

from mailsys.delivery.mtasts import PolicyCache
from mailsys.delivery.mx import MailHost, MXLookupError, MXResolver
from mailsys.delivery.nexthop import NextHops, Route
from mailsys.delivery.tlspolicy import ClientTLS, TLSPolicies
from mailsys.diskio import DiskRunner
from mailsys.envelope import Attempt, Envelope, Recipient, RecipientStatus
from mailsys.interfaces import IDeliveryAgent
from mailsys.journey.events import NULL_RECORDER
from mailsys.journey.interfaces import IJourneyRecorder
from mailsys.replies import Reply
from mailsys.smtp.client import (
    ClientTimeouts,
    LocalRefusalError,
    OutboundRecipient,
    ServerReply,
    SMTPClient,
    SMTPClientError,
    TLSFailedError,
    Transaction,
)
from mailsys.smtp.linelimit import file_has_long_line, fit_lines
from mailsys.values import NextHop, RouteKind, TLSPolicy

log = Logger(namespace="mailsys.delivery.relay")

# RFC 3463: X.4.1 no answer from host, X.4.2 bad connection, X.7.4 security features not
# supported, X.7.5 cryptographic failure, X.7.0 other security status, X.3.2 system not accepting
# network messages, X.5.3 too many recipients.
NO_CONNECTION = Reply(451, "4.4.1", "No connection to the mail server")
CONNECTION_FAILED = Reply(451, "4.4.2", "Connection failed")
TLS_NOT_OFFERED = Reply(451, "4.7.4", "TLS is required but the server does not offer STARTTLS")
TLS_REFUSED = Reply(451, "4.7.4", "TLS is required but the server refused STARTTLS")
TLS_FAILED = Reply(451, "4.7.5", "TLS failed")
# RFC 8461 §5: with an "enforce" policy, MX hosts outside its mx patterns are not used; when none
# is left the mail waits (a temporary failure), as for a TLS failure.
MTA_STS_NO_HOST = Reply(451, "4.7.5", "No MX host allowed by the domain's MTA-STS policy")
AUTH_WITHOUT_TLS = Reply(451, "4.7.0", "Not sending the smarthost password without TLS")
AUTH_FAILED = Reply(451, "4.7.0", "Authentication at the smarthost failed")
SHUTTING_DOWN = Reply(451, "4.3.2", "Delivery interrupted: mail system shutting down")
INTERNAL = Reply(451, "4.3.0", "Temporary local problem in the relay")

# RFC 5321 §4.5.3.1.8: a server must take at least 100 recipients per transaction.
MAX_RECIPIENTS_PER_TRANSACTION = 100
# Beyond this many destinations known, the unused ones are forgotten.
DESTINATIONS_KEPT = 256


@dataclass(frozen=True)
class RelaySettings:
    """What the relay needs to know besides its collaborators."""

    helo_name: str
    per_destination_concurrency: int = 20
    connect_timeout: float = 30.0
    timeouts: ClientTimeouts = field(default_factory=ClientTimeouts)
    smarthost_username: str | None = None
    smarthost_password: str | None = None
    # An idle connection is kept this long for the next message to its destination (Postfix:
    # smtp_connection_cache_time_limit, 2 s); then QUIT.
    idle_time: float = 5.0
    max_messages_per_connection: int = 100


class Dialer(Protocol):
    """Opens a TCP connection (with TLS from the first byte when ``creator`` is given) and
    returns the connected SMTPClient, before its greeting."""

    def connect(
        self, address: str, port: int, creator: IOpenSSLClientConnectionCreator | None
    ) -> Deferred[SMTPClient]: ...


class TCPDialer:
    """Connects with twisted endpoints, with the connect timeout of the configuration, from
    ``bind_address`` (IPv4) or ``bind_address6`` (IPv6) when given (port chosen by the system)."""

    def __init__(self, reactor: Any, timeouts: ClientTimeouts, connect_timeout: float,
                 bind_address: str | None = None, bind_address6: str | None = None) -> None:
        self._reactor = reactor
        self._timeouts = timeouts
        self._connect_timeout = connect_timeout
        self._bind = {4: bind_address, 6: bind_address6}

    def connect(
        self, address: str, port: int, creator: IOpenSSLClientConnectionCreator | None
    ) -> Deferred[SMTPClient]:
        version = ipaddress.ip_address(address).version
        kind = TCP6ClientEndpoint if version == 6 else TCP4ClientEndpoint
        source = self._bind[version]
        endpoint: Any = kind(self._reactor, address, port, timeout=self._connect_timeout,
                             bindAddress=(source, 0) if source is not None else None)
        if creator is not None:
            endpoint = wrapClientTLS(creator, endpoint)
        timeouts = self._timeouts
        implicit = creator is not None
        factory = Factory.forProtocol(
            lambda: SMTPClient(self._reactor, timeouts, implicit_tls=implicit)
        )
        factory.noisy = False  # no "Starting factory" per connection: the relay logs its own
        d: Deferred[SMTPClient] = endpoint.connect(factory)
        return d


class SpoolFileSource:
    """A queued message read in chunks by disk threads, so a large message never blocks the
    reactor. Reads are sequential (the client awaits each), so one file object is safe.

    A message stored with lines over RFC 5321's 998 octets (intake takes them) is re-encoded to
    fit before it is sent (mailsys.smtp.linelimit), in the same disk thread."""

    def __init__(self, path: Path, disk: DiskRunner) -> None:
        self._path = path
        self._disk = disk
        self._file: IO[bytes] | None = None
        self._closed = False
        self.refitted = False  # long lines were re-encoded to fit

    def read(self, size: int) -> Deferred[bytes]:
        d: Deferred[bytes] = self._disk.run(self._read, size)
        return d

    def _read(self, size: int) -> bytes:
        if self._closed:
            raise ValueError("source closed")
        if self._file is None:
            file: IO[bytes] = open(self._path, "rb")  # noqa: SIM115 - closed by close()
            if file_has_long_line(file):
                with file:
                    file = BytesIO(fit_lines(file.read()))
                self.refitted = True
            self._file = file
        return self._file.read(size)

    def close(self) -> None:
        self._closed = True
        if self._file is not None:
            file, self._file = self._file, None
            self._disk.run(file.close)


@dataclass(eq=False)
class _Job:
    """One message to one destination: the recipients of one transaction."""

    envelope: Envelope
    recipients: list[Recipient]
    results: list[Deferred[Attempt]]
    path: Path
    route: Route
    retried: bool = False  # already sent again after a reused connection had gone stale

    def finish(self, attempts: list[Attempt]) -> None:
        for d, attempt in zip(self.results, attempts, strict=True):
            if not d.called:
                d.callback(attempt)

    def finish_all(self, attempt: Attempt) -> None:
        self.finish([replace(attempt) for _ in self.results])


@dataclass(eq=False)
class _Session:
    """A connection ready for mail transactions."""

    client: SMTPClient
    host: MailHost
    address: str
    port: int
    idle_timer: IDelayedCall | None = None

    @property
    def label(self) -> str:
        """The host as logs and attempts name it: ``mx.example.org[192.0.2.1]:25``."""
        address = f"IPv6:{self.address}" if ":" in self.address else self.address
        return f"{self.host.name}[{address}]:{self.port}"


class _HostFailedError(Exception):
    """This address could not be used; try the next. ``mta`` is set when the server said so."""

    def __init__(self, reply: Reply | ServerReply, mta: str | None = None) -> None:
        super().__init__(str(reply))
        self.reply = reply
        self.mta = mta


class _Destination:
    """The connections to one destination: open, idle and the jobs waiting for one."""

    def __init__(self, agent: RelayAgent, route: Route) -> None:
        self.agent = agent
        self.route = route
        self.waiting: deque[_Job] = deque()
        self.connections = 0  # open or being opened
        self.idle: list[_Session] = []
        self.sessions: set[_Session] = set()

    def add(self, job: _Job) -> None:
        """Queue a job; the caller pumps once it has added all of this turn's jobs."""
        self.waiting.append(job)

    def pump(self) -> None:
        limit = self.agent.settings.per_destination_concurrency
        while self.waiting and self.agent.running:
            if self.idle:
                session = self.idle.pop()
                _cancel(session.idle_timer)
                session.idle_timer = None
                self._run(session, self.waiting.popleft())
            elif self.connections < limit:
                self.connections += 1
                self._open(self.waiting.popleft())
            else:
                return

    def _open(self, job: _Job) -> None:
        d = Deferred.fromCoroutine(self.agent.open_session(self.route, job))
        d.addCallbacks(self._opened, self._open_failed, callbackArgs=(job,), errbackArgs=(job,))

    def _opened(self, session: _Session, job: _Job) -> None:
        self.sessions.add(session)
        self._run(session, job)

    def _open_failed(self, failure: Failure, job: _Job) -> None:
        self.connections -= 1
        attempt = self.agent.attempt_for_failure(failure, job)
        job.finish_all(attempt)
        if self.connections == 0:
            # The destination cannot be reached now: the jobs waiting for it would only repeat
            # the same lookups and timeouts. They are deferred with the same reason.
            waiting, self.waiting = self.waiting, deque()
            for other in waiting:
                other.finish_all(replace(attempt))
        self.pump()

    def _run(self, session: _Session, job: _Job) -> None:
        d = Deferred.fromCoroutine(self.agent.run_job(session, job))
        d.addErrback(self._run_error, session, job)
        d.addCallback(lambda _: self._done(session))

    def _run_error(self, failure: Failure, session: _Session, job: _Job) -> None:
        log.failure("{queue_id}: relay to {host} failed", failure,
                    queue_id=job.envelope.queue_id, host=session.label)
        job.finish_all(self.agent.attempt(RecipientStatus.DEFERRED, INTERNAL, session))
        if session.client.transport is not None:
            session.client.transport.loseConnection()

    def _done(self, session: _Session) -> None:
        client = session.client
        reusable = (
            client.connected
            and self.agent.running
            and client.messages < self.agent.settings.max_messages_per_connection
        )
        if not reusable:
            self.close(session)
        elif self.waiting:
            self._run(session, self.waiting.popleft())
            return
        else:
            session.idle_timer = self.agent.clock.callLater(
                self.agent.settings.idle_time, self._expire, session
            )
            self.idle.append(session)
        self.pump()

    def _expire(self, session: _Session) -> None:
        session.idle_timer = None
        if session in self.idle:
            self.idle.remove(session)
            self.close(session)

    def close(self, session: _Session) -> Deferred[None]:
        if session in self.sessions:
            self.sessions.discard(session)
            self.connections -= 1
        _cancel(session.idle_timer)
        session.idle_timer = None
        return session.client.quit()

    def stop(self) -> None:
        """Quit idle connections, drop busy ones (their jobs are deferred), forget waiters."""
        for session in list(self.idle):
            self.idle.remove(session)
            self.close(session)
        for session in list(self.sessions):
            _abort(session.client)
        waiting, self.waiting = self.waiting, deque()
        for job in waiting:
            job.finish_all(self.agent.attempt(RecipientStatus.DEFERRED, SHUTTING_DOWN, None))


@implementer(IDeliveryAgent)
class RelayAgent(Service):
    """The delivery agent for RELAY recipients (a child service: stopping it ends connections).

    Recipients handed over in the same reactor turn (the runner dispatches a round's recipients
    together) for the same message and destination share one SMTP transaction.
    """

    def __init__(
        self,
        settings: RelaySettings,
        next_hops: NextHops,
        tls_policies: TLSPolicies,
        client_tls: ClientTLS,
        mx: MXResolver,
        dialer: Dialer,
        disk: DiskRunner,
        clock: IReactorTime,
        journey: IJourneyRecorder = NULL_RECORDER,
        mta_sts: PolicyCache | None = None,
    ) -> None:
        self.settings = settings
        self._journey = journey
        # RFC 8461 policies of destination domains (mailsys.delivery.mtasts); None: not used.
        self._mta_sts = mta_sts
        self._next_hops = next_hops
        self._tls_policies = tls_policies
        self._client_tls = client_tls
        self._mx = mx
        self._dialer = dialer
        self._disk = disk
        self.clock = clock
        self._destinations: dict[str, _Destination] = {}
        self._forming: dict[tuple[str, str], _Job] = {}
        self._flush_call: IDelayedCall | None = None
        # Every client connected and not yet closed, so that stopping can end them all.
        self._clients: weakref.WeakSet[SMTPClient] = weakref.WeakSet()

    def reconfigure(self, other: RelayAgent) -> None:
        """Take ``other``'s settings, next hops, TLS policies, trust and dialer for the next
        deliveries (a reload, mailsys.reload); deliveries under way finish with what they
        started with, and connections open now are not touched."""
        self.settings = other.settings
        self._next_hops = other._next_hops
        self._tls_policies = other._tls_policies
        self._client_tls = other._client_tls
        self._mx = other._mx
        self._dialer = other._dialer
        self._mta_sts = other._mta_sts

    # -- service ---------------------------------------------------------------------------------

    @override
    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        forming, self._forming = self._forming, {}
        for job in forming.values():
            job.finish_all(self.attempt(RecipientStatus.DEFERRED, SHUTTING_DOWN, None))
        for destination in self._destinations.values():
            destination.stop()
        for client in list(self._clients):
            _abort(client)
        return succeed(None)

    # -- IDeliveryAgent --------------------------------------------------------------------------

    def deliver(
        self, envelope: Envelope, recipient: Recipient, message_path: Path, *,
        recovered: bool = False,
    ) -> Deferred[Attempt]:
        """Deliver one recipient; fires with its Attempt, never fails.

        ``recovered`` is not used: whether a remote server took the message before a crash
        cannot be known, so the message is sent again (at least once, RFC 5321 §6.1).
        """
        d: Deferred[Attempt] = Deferred()
        if not self.running:
            d.callback(self.attempt(RecipientStatus.DEFERRED, SHUTTING_DOWN, None))
            return d
        route = self.route_for(recipient.address)
        key = (envelope.queue_id, route.key)
        job = self._forming.get(key)
        if job is None or len(job.recipients) >= MAX_RECIPIENTS_PER_TRANSACTION:
            job = self._forming[key] = _Job(envelope, [], [], Path(message_path), route)
        job.recipients.append(recipient)
        job.results.append(d)
        if self._flush_call is None:
            self._flush_call = self.clock.callLater(0, self._flush)
        return d

    def route_for(self, address: str) -> Route:
        """The route of a recipient address: address literals go to that address."""
        domain = address.rpartition("@")[2].lower()
        if domain.startswith("[") and domain.endswith("]"):
            literal = domain[1:-1].removeprefix("ipv6:")
            return Route(NextHop(RouteKind.HOST, literal, self._next_hops.port))
        return self._next_hops.route(domain)

    def _flush(self) -> None:
        self._flush_call = None
        forming, self._forming = self._forming, {}
        if len(self._destinations) > DESTINATIONS_KEPT:
            # Forget destinations with nothing open or waiting: one per domain ever mailed
            # would otherwise accumulate for the life of the process.
            self._destinations = {key: d for key, d in self._destinations.items()
                                  if d.connections or d.waiting}
        touched: dict[str, _Destination] = {}
        for job in forming.values():
            destination = self._destinations.get(job.route.key)
            if destination is None:
                destination = self._destinations[job.route.key] = _Destination(self, job.route)
            destination.add(job)
            touched[job.route.key] = destination
        # Pumped after all are queued, so that a destination found unreachable defers every
        # job of this turn at once (see _Destination._open_failed).
        for destination in touched.values():
            destination.pump()

    # -- connections -----------------------------------------------------------------------------

    def tls_policy(self, route: Route) -> TLSPolicy:
        """By the recipient domain for MX routes, by the next hop's host name otherwise."""
        return self._tls_policies.for_domain(route.hop.name)

    async def open_session(self, route: Route, job: _Job) -> _Session:
        """A session with the first host of ``route`` that takes us; raises _HostFailedError
        (the last host's reason) or MXLookupError."""
        queue_id = job.envelope.queue_id
        try:
            hosts = await self._mx.hosts(route.hop)
        except MXLookupError as exc:
            self._journey.emit("relay.mx", queue_id, domain=route.hop.name, error=str(exc.reply))
            raise
        self._journey.emit("relay.mx", queue_id, domain=route.hop.name,
                           answers=[f"{h.preference} {h.name}" for h in hosts],
                           implicit=any(h.implicit for h in hosts))
        hosts, sts_tls = await self._apply_mta_sts(route, hosts, queue_id)
        effective = sts_tls or self.tls_policy(route)
        last: _HostFailedError | None = None
        lookup_failures: list[MXLookupError] = []
        for host in hosts:
            try:
                addresses = await self._mx.addresses(host)
            except MXLookupError as exc:
                lookup_failures.append(exc)
                self._journey.emit("relay.connect", queue_id, host=host.name,
                                   preference=host.preference, error=str(exc.reply))
                continue
            for address in addresses:
                try:
                    return await self._connect(route, host, address, job, tls=True,
                                               after=last, tls_policy=sts_tls)
                except TLSFailedError as exc:
                    if effective is not TLSPolicy.OPPORTUNISTIC:
                        last = _HostFailedError(TLS_FAILED.with_text(
                            f"{TLS_FAILED.text} with {host.name}[{address}]: {exc.reason}"
                        ))
                        continue
                    # RFC 7435 §3: opportunistic TLS falls back to plaintext when TLS fails.
                    try:
                        return await self._connect(route, host, address, job, tls=False)
                    except _HostFailedError as again:
                        last = again
                except _HostFailedError as exc:
                    last = exc
        if last is not None:
            raise last
        if lookup_failures:
            temporary = [f for f in lookup_failures if not f.permanent]
            raise (temporary or lookup_failures)[0]
        raise _HostFailedError(NO_CONNECTION)  # pragma: no cover - hosts() is never empty

    async def _apply_mta_sts(self, route: Route, hosts: list[MailHost],
                             queue_id: str) -> tuple[list[MailHost], TLSPolicy | None]:
        """RFC 8461 §5 for mail over MX: the hosts to try and the TLS policy the domain's
        MTA-STS policy asks for (None: the configured one). A tls_policy_per_domain entry for
        the domain overrides MTA-STS; "testing" only logs what "enforce" would refuse."""
        hop = route.hop
        if (self._mta_sts is None or hop.kind is not RouteKind.MX
                or self._tls_policies.has_entry(hop.name)):
            return hosts, None
        policy = await self._mta_sts.policy_for(hop.name)
        if policy is None or policy.mode == "none":
            return hosts, None
        outside = [host.name for host in hosts if not policy.allows(host.name)]
        if policy.mode == "testing":
            if outside:
                log.info("{queue_id}: MTA-STS policy of {domain} (testing): would not use MX "
                         "{hosts}, not in its mx patterns; delivering as usual",
                         queue_id=queue_id, domain=hop.name, hosts=", ".join(outside))
            return hosts, None
        if outside:
            log.info("{queue_id}: MTA-STS policy of {domain} (enforce): not using MX {hosts}, "
                     "not in its mx patterns", queue_id=queue_id, domain=hop.name,
                     hosts=", ".join(outside))
        allowed = [host for host in hosts if policy.allows(host.name)]
        if not allowed:
            raise _HostFailedError(MTA_STS_NO_HOST.with_text(
                f"{MTA_STS_NO_HOST.text} ({hop.name}: {', '.join(outside)} not in "
                f"mx {' '.join(policy.mx)})"))
        log.info("{queue_id}: MTA-STS policy of {domain} (enforce): verified TLS with {hosts}",
                 queue_id=queue_id, domain=hop.name,
                 hosts=", ".join(host.name for host in allowed))
        return allowed, TLSPolicy.VERIFY

    async def _connect(
        self, route: Route, host: MailHost, address: str, job: _Job, *, tls: bool,
        after: _HostFailedError | None = None, tls_policy: TLSPolicy | None = None,
    ) -> _Session:
        hop = route.hop
        policy = tls_policy or self.tls_policy(route)
        creator = None
        if hop.implicit_tls:
            creator = self._creator(policy, host.name)
        where = f"{host.name}[{address}]:{hop.port}"
        queue_id = job.envelope.queue_id
        if not self.running:
            raise _HostFailedError(SHUTTING_DOWN)
        try:
            client = await self._dialer.connect(address, hop.port, creator)
        except Exception as exc:
            log.info("{queue_id}: connect to {where}: {reason}", queue_id=queue_id, where=where,
                     reason=_connect_reason(exc))
            self._journey.emit("relay.connect", queue_id, host=host.name, address=address,
                               port=hop.port, preference=host.preference,
                               error=_connect_reason(exc))
            raise _HostFailedError(NO_CONNECTION.with_text(
                f"{NO_CONNECTION.text}: connect to {where}: {_connect_reason(exc)}"
            )) from None
        self._clients.add(client)
        session = _Session(client, host, address, hop.port)
        try:
            await self._prepare(session, route, policy, tls=tls)
        except _HostFailedError as exc:
            self._journey.emit("relay.connect", queue_id, host=host.name, address=address,
                               port=hop.port, preference=host.preference, error=str(exc.reply))
            client.quit()
            raise
        except SMTPClientError as exc:
            if isinstance(exc, TLSFailedError):
                self._journey.emit("relay.tls", queue_id, host=host.name, error=exc.reason,
                                   policy=policy.value)
                raise
            self._journey.emit("relay.connect", queue_id, host=host.name, address=address,
                               port=hop.port, preference=host.preference, error=exc.reason)
            client.quit()
            raise _HostFailedError(CONNECTION_FAILED.with_text(
                f"{CONNECTION_FAILED.text}: {where}: {exc.reason}"
            )) from None
        log.info("{queue_id}: connected to {host} tls={tls}", queue_id=queue_id,
                 host=session.label, tls=client.tls or "none")
        journey = self._journey
        journey.emit("relay.connect", queue_id, host=host.name, address=address, port=hop.port,
                     preference=host.preference,
                     after=str(after.reply) if after is not None else None)
        # RFC 3207 §4.1; with the "verify" policy the certificate was checked against the name.
        journey.emit("relay.tls", queue_id, host=host.name, tls=client.tls or "",
                     verified=bool(client.tls) and policy is TLSPolicy.VERIFY,
                     policy=policy.value)
        return session

    def _creator(self, policy: TLSPolicy, hostname: str) -> IOpenSSLClientConnectionCreator:
        if policy is TLSPolicy.VERIFY:
            return self._client_tls.verifying(hostname)
        return self._client_tls.opportunistic(hostname)

    async def _prepare(
        self, session: _Session, route: Route, policy: TLSPolicy, *, tls: bool
    ) -> None:
        """Greeting, EHLO, STARTTLS and AUTH, as the route and policy require."""
        client = session.client
        name = session.host.name
        greeting = await client.greeting
        if greeting.code != 220:
            # RFC 5321 §3.1: a 554 (or 421) greeting: this host takes no mail from us now.
            raise _HostFailedError(greeting, mta=name)
        helo = self.settings.helo_name
        capabilities = await client.ehlo(helo)
        if not route.hop.implicit_tls:
            if not tls or policy is TLSPolicy.NONE:
                if policy is TLSPolicy.VERIFY:
                    raise _HostFailedError(TLS_FAILED.with_text(
                        f"{TLS_FAILED.text} with {session.label}"))
            elif "STARTTLS" in capabilities:
                reply = await client.starttls(self._creator(policy, name), helo)
                if reply.code != 220 and policy is TLSPolicy.VERIFY:
                    raise _HostFailedError(TLS_REFUSED.with_text(
                        f"{TLS_REFUSED.text}: {session.label} answered {reply}"), mta=name)
            elif policy is TLSPolicy.VERIFY:
                raise _HostFailedError(TLS_NOT_OFFERED.with_text(
                    f"{TLS_NOT_OFFERED.text}: {session.label}"))
        settings = self.settings
        if route.smarthost and settings.smarthost_username is not None:
            if client.tls is None:
                raise _HostFailedError(AUTH_WITHOUT_TLS.with_text(
                    f"{AUTH_WITHOUT_TLS.text}: {session.label} offers no TLS"))
            reply = await client.authenticate(
                settings.smarthost_username, settings.smarthost_password or ""
            )
            if not reply.is_success:
                raise _HostFailedError(AUTH_FAILED.with_text(
                    f"{AUTH_FAILED.text}: {session.label} answered {reply}"))

    # -- transactions ----------------------------------------------------------------------------

    async def run_job(self, session: _Session, job: _Job) -> None:
        """Send one message over ``session`` and finish the job's recipients."""
        client = session.client
        envelope = job.envelope
        txn = Transaction(
            sender=envelope.sender,
            recipients=tuple(
                OutboundRecipient(r.address, r.notify, _orcpt(r)) for r in job.recipients
            ),
            size=envelope.size,
            body=envelope.body,
            smtputf8=envelope.smtputf8,
            ret=envelope.ret,
            envid=envelope.envid,
        )
        reused = client.messages > 0 or client.in_transaction
        try:
            if client.in_transaction:
                await client.reset()
            result = await client.send(txn, SpoolFileSource(job.path, self._disk))
        except LocalRefusalError as exc:
            job.finish_all(self.attempt(RecipientStatus.FAILED, exc.reply, session))
            return
        except SMTPClientError as exc:
            if reused and not job.retried and self.running:
                # A cached connection the server had dropped: send again on a new one.
                job.retried = True
                log.info("{queue_id}: {host} dropped the cached connection, reconnecting",
                         queue_id=envelope.queue_id, host=session.label)
                destination = self._destinations[job.route.key]
                destination.waiting.appendleft(job)
                return
            failed = CONNECTION_FAILED.with_text(
                f"{CONNECTION_FAILED.text}: {session.label}: {exc.reason}"
            )
            job.finish_all(self.attempt(RecipientStatus.DEFERRED, failed, session))
            return
        attempts = []
        for index in range(len(job.recipients)):
            reply = result.reply_for(index)
            status = (
                RecipientStatus.DELIVERED if reply.is_success
                else RecipientStatus.FAILED if reply.is_permanent
                else RecipientStatus.DEFERRED
            )
            attempts.append(Attempt(
                at=self.clock.seconds(), status=status, host=session.label,
                reply=_structured(reply),
                mta=session.host.name, tls=client.tls,
            ))
        job.finish(attempts)

    # -- attempts --------------------------------------------------------------------------------

    def attempt(
        self, status: RecipientStatus, reply: Reply | ServerReply, session: _Session | None,
        mta: str | None = None,
    ) -> Attempt:
        return Attempt(
            at=self.clock.seconds(),
            status=status,
            host=session.label if session is not None else "",
            reply=_structured(reply),
            mta=mta,
            tls=session.client.tls if session is not None else None,
        )

    def attempt_for_failure(self, failure: Failure, job: _Job) -> Attempt:
        """The Attempt of every recipient of a job whose destination could not be reached."""
        value = failure.value
        queue_id = job.envelope.queue_id
        if isinstance(value, MXLookupError):
            status = RecipientStatus.FAILED if value.permanent else RecipientStatus.DEFERRED
            return self.attempt(status, value.reply, None)
        if isinstance(value, _HostFailedError):
            reply = value.reply
            # A refusal from a server (a 554 greeting) is still only this host's: other hosts
            # or a later try may do better, so it defers; only MAIL/RCPT/DATA replies fail.
            return self.attempt(RecipientStatus.DEFERRED, reply, None, mta=value.mta)
        log.failure("{queue_id}: relay failed", failure, queue_id=queue_id)
        return self.attempt(RecipientStatus.DEFERRED, INTERNAL, None)


def _structured(reply: Reply | ServerReply) -> Reply:
    """A server's reply as attempts keep it: its code, the enhanced code of its first line
    (RFC 2034 §4) and the text of every line, joined, as logs and DSNs quote it."""
    if isinstance(reply, Reply):
        return reply
    lines = [line.strip() for line in reply.lines if line.strip()]
    enhanced = reply.enhanced
    if enhanced and lines:
        lines[0] = lines[0].removeprefix(enhanced).strip()
    return Reply(reply.code, enhanced, " ".join(line for line in lines if line))


def _abort(client: SMTPClient) -> None:
    """Drop a client's connection at once, whatever it still had to send."""
    if not client.connected or client.transport is None:
        return
    tcp = ITCPTransport(client.transport, None)
    if tcp is not None:
        tcp.abortConnection()
    else:  # a transport without abort (none of the reactor's): close it as soon as it can
        client.transport.loseConnection()


def _orcpt(recipient: Recipient) -> str | None:
    """RFC 3461 §4.2: pass ORCPT on; add it from the original RCPT address when missing."""
    if recipient.orcpt is not None:
        return recipient.orcpt
    if recipient.original and recipient.original.isascii():
        return f"rfc822;{recipient.original}"
    return None


def _connect_reason(exc: BaseException) -> str:
    if isinstance(exc, net_error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, net_error.TimeoutError | TimeoutError):
        return "connection timed out"
    if isinstance(exc, net_error.NoRouteError):
        return "no route to host"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _cancel(timer: IDelayedCall | None) -> None:
    if timer is not None and timer.active():
        with contextlib.suppress(Exception):
            timer.cancel()
