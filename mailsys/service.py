"""Wiring: the whole mail system built from a Config as one twisted.application MultiService.

All construction lives here, so every other module takes its collaborators (reactor, clock, pool,
stores) as arguments and can be tested alone.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from typing_extensions import override

from mailsys import logwriter, sdnotify
from mailsys.auth.credcache import CredentialCache
from mailsys.auth.portal import build_portal
from mailsys.auth.throttle import LoginThrottle
from mailsys.auth.users import RELOAD_INTERVAL, UserStore
from mailsys.authn.wiring import Authn
from mailsys.config import Config, load
from mailsys.defence.greylist import Greylist
from mailsys.defence.intake import IntakeDefence
from mailsys.defence.spamfilter import RspamdFilter
from mailsys.delivery.maildir import MaildirWriter
from mailsys.delivery.quota import MailboxQuota, QuotaRules
from mailsys.delivery.wiring import build_relay
from mailsys.diskio import DiskPool
from mailsys.envelope import TargetKind
from mailsys.imap.quota import set_quota
from mailsys.imap.session import IMAPServerFactory
from mailsys.interfaces import IMessageSink
from mailsys.journey.events import NULL_RECORDER
from mailsys.journey.interfaces import IJourneyRecorder
from mailsys.journey.writer import JourneyWriter
from mailsys.lab.serving import LabServing
from mailsys.mailbox.store import MailboxStore
from mailsys.ownership import SECRET_MODE, ServerAccount, hand_over, make_directory
from mailsys.pickup.maildrop import prepare_directory
from mailsys.pickup.watcher import PickupWatcher
from mailsys.pop3.server import POP3ServerFactory
from mailsys.queue.control import ControlSocketService, ControlWatcher, Outcome
from mailsys.queue.dsn import DSNNotifier
from mailsys.queue.runner import QueueRunner
from mailsys.queue.sink import QueueSink
from mailsys.queue.spool import Spool
from mailsys.reload import RunningConfig
from mailsys.retrieval import MailboxServerFactory, mailbox_listeners
from mailsys.routing import Router
from mailsys.smtp.policy import InboundPolicy, StorageFloor, SubmissionPolicy
from mailsys.smtp.server import ListenerRole, SMTPServerFactory
from mailsys.tls import CurrentCertificateCreator, ServerTLS, ensure_self_signed
from mailsys.web.console import Console
from mailsys.web.metrics import (
    CountingSink,
    ListenerMetrics,
    Metrics,
    accepted_by,
    attempt_observer,
    notices,
    queue_state,
)
from mailsys.web.wiring import build_web, certificate_expiry

log = Logger()

# How often certificate files are checked for renewal, in seconds.
TLS_CHECK_INTERVAL = 60.0
# How often watched mailbox folders are checked for changes made by other processes, in seconds.
MAILBOX_POLL_INTERVAL = 2.0
# How often the spool's control/ directory is checked for queue tool commands, in seconds.
QUEUE_CONTROL_INTERVAL = 1.0
# How often the pickup directory is looked at for mail from `mailsys-sendmail`, in seconds.
PICKUP_INTERVAL = 1.0
# How often the spool's free space is looked at (statvfs, in a disk thread), in seconds.
FREE_SPACE_INTERVAL = 1.0
# How often a running server looks whether the user file changed.
USERS_RELOAD_INTERVAL = RELOAD_INTERVAL


class StartupError(Exception):
    """Start-up cannot go on; the message is one clear line for the administrator."""


class Listener(Service):
    """One listening port, bound at privileged start-up, closed when the service stops.

    Unlike twisted.application's StreamServerEndpointService, which logs a port that cannot be
    bound and runs on without it, a failure to bind raises, so start-up fails with one line.
    """

    def __init__(self, endpoint: IStreamServerEndpoint, factory: IProtocolFactory) -> None:
        self._endpoint = endpoint
        self._factory = factory
        self._port: IListeningPort | None = None

    @override
    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)
        self._listen()

    @override
    def startService(self) -> None:
        Service.startService(self)
        if self._port is None:
            self._listen()

    def _listen(self) -> None:
        outcome: list[IListeningPort | Failure] = []
        # Stream endpoints on TCP and UNIX sockets bind at once: the Deferred has fired.
        self._endpoint.listen(self._factory).addBoth(outcome.append)
        if not outcome:
            raise RuntimeError("the endpoint did not bind synchronously")
        result = outcome[0]
        if isinstance(result, Failure):
            result.raiseException()
        else:
            self._port = result

    @property
    def bound(self) -> bool:
        return self._port is not None

    @override
    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        port, self._port = self._port, None
        if port is None:
            return succeed(None)
        stopped = port.stopListening()
        return stopped if isinstance(stopped, Deferred) else succeed(None)


class MailService(MultiService):
    """The running mail system: disk pool, spool recovery, queue runner and listeners."""

    def __init__(self, pool: DiskPool, spool: Spool, runner: QueueRunner,
                 tls: ServerTLS | None, reactor: Any, auth_pool: DiskPool | None = None) -> None:
        # The base class is named, not super(): twisted.application is unannotated, and mypy
        # lets calls into it through (untyped_calls_exclude) only by their Twisted name.
        MultiService.__init__(self)
        self.pool = pool
        self._pools = [pool] if auth_pool is None else [pool, auth_pool]
        self.spool = spool
        self.runner = runner
        # The journey writer (mailsys.journey.writer), not a child: it starts before anything
        # emits and stops after everything else has, so the last steps are written too.
        self.journey: JourneyWriter | None = None
        # The intake defences of the SMTP listeners; a configuration read again is given to
        # each (IntakeDefence.reconfigure): the allow and block lists live there.
        self.defences: list[IntakeDefence] = []
        self.tls = tls
        self._reactor = reactor
        self._listeners: list[tuple[str, Listener]] = []
        self.metrics: Metrics | None = None
        # The configuration it runs with and its reload (mailsys.reload), on SIGHUP.
        self.configuration: RunningConfig | None = None

    def all_bound(self) -> bool:
        """Every listener is bound (readiness, and systemd's READY=1)."""
        return all(listener.bound for _, listener in self._listeners)

    def add_listener(self, name: str, description: str, factory: IProtocolFactory) -> None:
        """Serve ``factory`` on the endpoint ``description``; ``name`` says which service it is."""
        listener = Listener(serverFromString(self._reactor, description), factory)
        Service.setName(listener, f"{name}:{description}")
        Service.setServiceParent(listener, self)
        self._listeners.append((description, listener))

    @override
    def privilegedStartService(self) -> None:
        for description, listener in self._listeners:
            try:
                listener.privilegedStartService()
            except CannotListenError as exc:
                raise StartupError(
                    f"cannot listen on {description!r}: {exc.socketError}"
                ) from None
        for child in self:
            if child not in (listener for _, listener in self._listeners):
                child.privilegedStartService()

    @override
    def startService(self) -> None:
        if self.journey is not None:
            self.journey.startService()
        for pool in self._pools:
            pool.start()
        envelopes = self.spool.recover()
        if envelopes:
            log.info("spool recovery: {count} message(s) to deliver", count=len(envelopes))
        self.runner.load(envelopes)
        running = self.configuration
        if running is not None:
            reactor = self._reactor
            # The configuration, the certificate, the DKIM keys and the users, all read again;
            # `mailsys reload` asks the same through the control socket.
            signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(_hangup, running))
        MultiService.startService(self)
        for description, _ in self._listeners:
            log.info("listening on {description}", description=description)
        # Every listener was bound in privilegedStartService (a failure stops start-up there).
        if self.all_bound():
            sdnotify.notify(sdnotify.READY, f"STATUS=listening on {len(self._listeners)} "
                            "port(s)", f"MAINPID={os.getpid()}")

    @override
    def stopService(self) -> Deferred[None]:
        sdnotify.notify(sdnotify.STOPPING, "STATUS=stopping")
        d: Deferred[None] = maybeDeferred(super().stopService)

        def stop_pool(result: object) -> object:
            for pool in self._pools:
                pool.stop()
            return result

        d.addBoth(stop_pool)
        journey = self.journey
        if journey is not None:
            d.addBoth(lambda result: journey.stopService().addCallback(lambda _: result))
        return d


def _hangup(running: RunningConfig) -> None:
    """SIGHUP: the log file reopened (after logrotate moved it), the configuration reloaded."""
    logwriter.reopen_log_file()
    running.reload()


def _prepare_tls(config: Config, account: ServerAccount | None = None) -> ServerTLS | None:
    tls = config.tls
    if tls.certificate is None or tls.key is None:
        return None
    hostname = config.server.hostname
    if tls.create_self_signed and ensure_self_signed(tls.certificate, tls.key, hostname):
        # Made as root before twistd drops privileges: the server must still read them later.
        hand_over(tls.key, account, mode=SECRET_MODE if account is not None else None)
        hand_over(tls.certificate, account)
        log.warn(
            "created a self-signed development certificate {certificate} for {hostname}; "
            "configure a real certificate for production",
            certificate=str(tls.certificate), hostname=config.server.hostname,
        )
    return ServerTLS(tls.certificate, tls.key)


def _ensure_demo_user(config: Config, users: UserStore) -> None:
    dev = config.dev
    if dev.demo_user is None or dev.demo_password is None or users.exists(dev.demo_user):
        return
    # The demo user is the web page's administrator, so `make run` gives a page to log in to.
    users.add(dev.demo_user, dev.demo_password, admin=True)
    log.warn(
        "created the demo user {user} with password {password!r}, an administrator of the "
        "web page (development default; "
        "remove [dev] from the config for production)",
        user=dev.demo_user, password=dev.demo_password,
    )


def _listeners(config: Config) -> Iterable[tuple[ListenerRole, str]]:
    for description in config.smtp.listen:
        yield ListenerRole.MTA, description
    for description in config.submission.listen:
        yield ListenerRole.SUBMISSION, description
    for description in config.submission.listen_tls:
        yield ListenerRole.SUBMISSIONS, description


def _reload_users(users: UserStore, pool: DiskPool) -> Deferred[None]:
    """One look at the user file, in a disk thread; an error is logged and tried again next
    time (TimerService stops for good on a failed Deferred)."""
    d = pool.run(users.reload_if_changed).addCallback(lambda _: None)
    d.addErrback(lambda failure: log.failure("user store {path}: reload failed", failure,
                                             path=str(users.path)))
    return d


def _journey_writer(config: Config, reactor: Any) -> JourneyWriter | None:
    journey = config.journey
    if not journey.enabled:
        return None
    return JourneyWriter(journey.path, reactor, retention=journey.retention,
                         max_bytes=journey.max_bytes)


def _pickup_service(config: Config, sink: IMessageSink, router: Router, pool: DiskPool,
                    reactor: Any, account: ServerAccount | None) -> Service:
    """Looks at the pickup directory every PICKUP_INTERVAL. The directory is made now, before
    twistd drops privileges (its parent, /var/spool, is root's), and given to the server's
    account; its group is ``[pickup] group``, else the server's group (mode 3730)."""
    directory = config.pickup.directory
    make_directory(directory, account, 0o700)
    prepare_directory(directory, config.pickup.group or (account.group if account else None))
    local = config.routing.local_domains
    origin = config.pickup.origin or (local[0] if local else config.server.hostname)
    watcher = PickupWatcher(directory, sink, router, pool, reactor,
                            hostname=config.server.hostname, origin=origin,
                            max_message_size=config.smtp.max_message_size)
    return TimerService(PICKUP_INTERVAL, watcher.poll)


def _watch_free_space(storage: StorageFloor, spool: Spool) -> Deferred[None]:
    """One look at the spool's free space: for MAIL FROM's floor, then for the spool's pool of
    files kept for reuse, which gives its blocks back when space is scarce."""

    def seen(_: None) -> None:
        if storage.free is not None:
            spool.free_space_seen(storage.free)

    return storage.refresh().addCallback(seen)


def _watch_certificate(metrics: Metrics, certificate: Path, pool: DiskPool, reactor: Any,
                       service: MultiService) -> None:
    """Keep the certificate's expiry for /metrics, read in a disk thread now and then."""
    expiry: list[float | None] = [None]

    def read() -> Deferred[None]:
        d = pool.run(certificate_expiry, certificate)
        return d.addCallback(lambda value: expiry.__setitem__(0, value))

    metrics.watch_certificate(lambda: expiry[0])
    TimerService(TLS_CHECK_INTERVAL, read).setServiceParent(service)


def _count_sessions(factory: IProtocolFactory, metrics: Metrics, protocol: str) -> None:
    """Give a POP3 or IMAP listener's sessions their metrics; implicit TLS listeners are
    labelled pop3s and imaps."""
    if isinstance(factory, TLSMemoryBIOFactory):
        inner: Any = factory.wrappedFactory
        listener = protocol + "s"
    else:
        inner, listener = factory, protocol
    inner.metrics = ListenerMetrics(metrics, listener, protocol)


def _follow(running: RunningConfig, protocol: str, factory: IProtocolFactory,
            seen: set[int]) -> None:
    """A POP3 or IMAP listener's factory takes new configurations; a factory serving several
    endpoints is followed once (``seen``: the ids of those followed already)."""
    inner: Any = factory.wrappedFactory if isinstance(factory, TLSMemoryBIOFactory) else factory
    if isinstance(inner, MailboxServerFactory) and id(inner) not in seen:
        seen.add(id(inner))
        running.follow(f"{protocol} listener", inner.reconfigure)


def _follow_reloads(running: RunningConfig, router: Router, runner: QueueRunner,
                    relay: Any, tls: ServerTLS | None, authn: Authn, users: UserStore,
                    pool: DiskPool, reactor: Any, journey: IJourneyRecorder) -> None:
    """What a reload hands the new configuration to, besides the listeners (mailsys.reload)."""
    running.follow("routing", lambda new: router.reconfigure(new.routing))
    running.follow("queue", lambda new: runner.reschedule(new.relay.retry_schedule,
                                                          new.relay.max_lifetime))
    if relay is not None:
        def relay_settings(new: Config) -> None:
            rebuilt = build_relay(new, pool, reactor, journey, authn.resolver)
            if rebuilt is not None:  # relay.enabled turned off takes a restart
                relay.reconfigure(rebuilt)
        running.follow("relay", relay_settings)
    if tls is not None:
        def certificate(new: Config) -> None:
            before = tls.certificate, tls.key
            if new.tls.certificate is not None and new.tls.key is not None:
                tls.certificate, tls.key = new.tls.certificate, new.tls.key
            # A renewed certificate too; a broken one keeps the old, logged, and its paths.
            if not tls.reload():
                tls.certificate, tls.key = before
        running.follow("tls", certificate, files=True)
    running.follow("dkim keys", authn.reload, files=True)
    running.follow("users", lambda new: _reload_users(users, pool), files=True)


def _follow_limits(running: RunningConfig, throttle: LoginThrottle,
                   quota: MailboxQuota | None) -> None:
    """Login throttling and mailbox quotas take reloaded values; quotas turned on where none
    were (no quota object was built) take a restart."""

    def login_limits(new: Config) -> None:
        auth = new.auth
        throttle.base_delay, throttle.max_delay = auth.throttle_base_delay, auth.throttle_max_delay
        throttle.max_failures = auth.throttle_max_failures
        throttle.max_address_failures = auth.throttle_max_address_failures
        throttle.window = auth.throttle_window

    def quotas(new: Config) -> None:
        rules = QuotaRules.from_section(new.quota)
        if quota is not None:
            quota.rules = rules  # one reference swapped: a disk thread sees old or new rules
        elif rules.any:
            log.warn("configuration: [quota] limits were added; they take a restart")

    running.follow("login throttle", login_limits)
    running.follow("quota", quotas)


def build_service(config: Config, reactor: Any, *,
                  account: ServerAccount | None = None) -> MailService:
    """Build the mail system for ``config``; nothing listens until the service starts.

    ``account`` is the one the server will run as (mailsys.ownership): files made here, before
    twistd drops privileges, are given to it.
    """
    tls = _prepare_tls(config, account)
    users = UserStore(config.storage.users, reload_on_lookup=False, account=account)
    _ensure_demo_user(config, users)
    router = Router(config.routing, users)
    pool = DiskPool(reactor)
    # --- the message journey (mailsys.journey): every room below emits through ``journey`` ---
    writer = _journey_writer(config, reactor)
    journey: IJourneyRecorder = writer if writer is not None else NULL_RECORDER
    # The spool's free-space floor: below it every SMTP listener answers MAIL with 452 4.3.1,
    # and the spool's pool of files kept for reuse is bounded by it.
    floor = config.storage.spool_floor(config.smtp.max_message_size)
    spool = Spool(config.storage.spool, pool, floor=floor)
    # --- mailbox store (POP3, IMAP) ---
    mailboxes = MailboxStore(config.storage.maildirs, pool)
    # Per-mailbox quotas (mailsys.delivery.quota): None when no mailbox has a limit.
    rules = QuotaRules.from_section(config.quota)
    quota = (MailboxQuota(rules, config.storage.maildirs, config.server.hostname)
             if rules.any else None)
    maildir = MaildirWriter(config.storage.maildirs, pool, config.server.hostname,
                            on_delivered=mailboxes.notify_delivered, quota=quota,
                            journey=journey)
    # --- mail authentication (mailsys.authn): one caching resolver, shared with the relay ---
    authn = Authn(config, reactor, journey=journey)
    # --- relay (mailsys.delivery.relay): None when relay.enabled is false ---
    relay = build_relay(config, pool, reactor, journey, authn.resolver)
    agents: dict[TargetKind, Any] = {TargetKind.LOCAL: maildir}
    if relay is not None:
        agents[TargetKind.RELAY] = relay
    # The teaching lab's hurried queue clock and faults ([lab], mailsys.lab); inert elsewhere.
    lab = LabServing(config, reactor, pool)
    runner = QueueRunner(spool, agents, clock=lab.queue_clock,
                         retry_schedule=config.relay.retry_schedule,
                         max_lifetime=config.relay.max_lifetime, journey=journey)
    # Every listener and the notices hand over through it: submitted and local mail is signed
    # (DKIM), mail from clients that did not authenticate is checked (SPF, DKIM, DMARC, iprev).
    sink = authn.wrap(lab.sink(QueueSink(spool, runner, journey)))
    # --- delivery status notifications (mailsys.queue.dsn), queued through the sink ---
    # One registry per service, never prometheus_client's global one: two services in one
    # process (tests) must not share counters.
    metrics = Metrics(CollectorRegistry(), reactor)
    runner.observer = attempt_observer(metrics)
    metrics.watch_queue(queue_state(runner.envelopes))
    runner.notifier = DSNNotifier(
        CountingSink(sink, notices(metrics)), router, pool, config.server.hostname,
        lab.queue_clock,
        delay_warning=config.relay.delay_warning, max_lifetime=config.relay.max_lifetime,
        max_returned_size=config.smtp.max_message_size, journey=journey,
    )
    # Password hashing (argon2id, ~50 ms of CPU each) gets threads of its own: a burst of logins
    # must not hold up the fsyncs that every 250 waits for.
    auth_pool = DiskPool(reactor, max_threads=2, name="auth")
    service = MailService(pool, spool, runner, tls, reactor, auth_pool=auth_pool)
    service.journey = writer
    service.metrics = metrics
    if config.tls.certificate is not None:
        _watch_certificate(metrics, config.tls.certificate, pool, reactor, service)
    lab.add_services(service)
    Service.setServiceParent(runner, service)
    if relay is not None:
        Service.setServiceParent(relay, service)
    # `mailsys queue flush|hold|release|delete` on a running server (mailsys.queue.control).
    running = service.configuration = RunningConfig(config, lambda: load(config.path), pool)

    def reload() -> Deferred[Outcome]:
        return running.reload().addCallback(lambda result: Outcome(result.ok, result.message))

    control = ControlWatcher(config.storage.spool, runner, pool, reload=reload)
    TimerService(QUEUE_CONTROL_INTERVAL, control.poll).setServiceParent(service)
    # ... and through a unix socket, which needs no free space in the spool; mode 0660 with the
    # server's group, so that root and the group's members may use it.
    socket_group = account.gid if account is not None else None
    Service.setServiceParent(
        ControlSocketService(config.storage.spool, runner, reactor, group=socket_group,
                             reload=reload), service)
    storage = StorageFloor(config.storage.spool, floor, pool.run) if floor > 0 else None
    if storage is not None:
        TimerService(FREE_SPACE_INTERVAL, _watch_free_space, storage, spool).setServiceParent(
            service)
    # `mailsys-sendmail` (mailsys.pickup): drops queued through the same sink as SMTP intake.
    _pickup_service(config, CountingSink(sink, accepted_by(metrics, "pickup")), router, pool,
                    reactor, account).setServiceParent(service)
    # `mailsys user add|passwd|del` while serving: the file is looked at in a disk thread, so
    # that RCPT TO lookups on the reactor only ever read memory.
    TimerService(USERS_RELOAD_INTERVAL, _reload_users, users, pool).setServiceParent(service)

    # --- logins: one portal and one throttle for SMTP AUTH, POP3 and IMAP, so a password guesser
    # cannot start afresh by switching protocols ---
    credentials = (CredentialCache(reactor.seconds, ttl=config.auth.cache_ttl,
                                   max_entries=config.auth.cache_size)
                   if config.auth.cache else None)
    portal = build_portal(users, auth_pool.run, credentials)
    throttle = LoginThrottle(
        reactor,
        base_delay=config.auth.throttle_base_delay,
        max_delay=config.auth.throttle_max_delay,
        max_failures=config.auth.throttle_max_failures,
        max_address_failures=config.auth.throttle_max_address_failures,
        window=config.auth.throttle_window,
    )

    # Before a RCPT is refused as unknown, the user file is looked at once more (a stat, in a
    # disk thread): the timer above may not have seen a user added a moment ago.
    def reload_users() -> Deferred[bool]:
        return pool.run(users.reload_if_changed)

    # A recipient whose mailbox is at its quota is refused at RCPT (mailsys.smtp.policy).
    def mailbox_full(mailbox: str) -> Deferred[bool]:
        if quota is None or quota.limits_for(mailbox) is None:
            return succeed(False)
        return pool.run(quota.is_full, mailbox)

    full = mailbox_full if quota is not None else None

    # --- intake defences (mailsys.defence): one for the MTA listeners, one shared by 587 and
    # 465 (per-user limits count across both) ---
    section = config.defence
    content_filter = None
    if section.spam_filter is not None:
        content_filter = RspamdFilter(section.spam_filter, reactor,
                                      timeout=section.spam_filter_timeout,
                                      on_failure=section.spam_filter_failure,
                                      junk=section.spam_filter_junk)
    greylist = None
    if section.enabled and section.greylisting:
        greylist = Greylist(section.greylist_path, reactor, pool, delay=section.greylist_delay,
                            retention=section.greylist_retention,
                            max_entries=section.max_clients_tracked)
        greylist.load()  # before the reactor runs: what the last run kept
        Service.setServiceParent(greylist, service)  # saved each minute and at stop
    defences = {
        inbound: IntakeDefence(section, reactor, resolver=authn.resolver,
                               hostname=config.server.hostname, inbound=inbound,
                               content_filter=content_filter if inbound else None,
                               greylist=greylist if inbound else None)
        for inbound in (True, False)
    }
    service.defences = list(defences.values())

    def defence_settings(new: Config) -> None:
        for defence in service.defences:  # lists, limits and policies; the counts are kept
            defence.reconfigure(new.defence)

    running.follow("intake defences", defence_settings)

    for role, description in _listeners(config):
        policy = (InboundPolicy(router, senders=router, reload_users=reload_users,
                                mailbox_full=full)
                  if role is ListenerRole.MTA
                  else SubmissionPolicy(router, senders=router, reload_users=reload_users,
                                        mailbox_full=full))
        listener = "smtp" if role is ListenerRole.MTA else role.value
        counted = CountingSink(sink, accepted_by(metrics, listener))
        smtp = SMTPServerFactory(
            config, role, lab.policy(policy, inbound=role is ListenerRole.MTA), counted,
            reactor, tls, portal=portal, throttle=throttle,
            journey=journey,
            storage=storage,
            defence=defences[role is ListenerRole.MTA],
        )
        smtp.threads = pool  # long lines of submitted mail are re-encoded in its threads
        smtp.metrics = ListenerMetrics(metrics, listener, "smtp")
        factory: IProtocolFactory = smtp
        if role is ListenerRole.SUBMISSIONS:
            assert tls is not None  # config.py refuses listen_tls without a certificate
            factory = TLSMemoryBIOFactory(CurrentCertificateCreator(tls), False, factory)
        service.add_listener(role.value, description, factory)
        running.follow(f"{listener} listener", smtp.reconfigure)

    # --- POP3 (mailsys.pop3) ---
    followed: set[int] = set()
    for description, pop3_factory in mailbox_listeners(POP3ServerFactory, config, mailboxes,
                                                       portal, throttle, tls, reactor, journey):
        _count_sessions(pop3_factory, metrics, "pop3")
        service.add_listener("pop3", description, pop3_factory)
        _follow(running, "pop3", pop3_factory, followed)
    # --- IMAP (mailsys.imap): the same portal and throttle as POP3 and SMTP AUTH ---
    for description, imap_factory in mailbox_listeners(IMAPServerFactory, config, mailboxes,
                                                       portal, throttle, tls, reactor, journey):
        _count_sessions(imap_factory, metrics, "imap")
        set_quota(imap_factory, quota)  # RFC 9208 QUOTA, APPEND's [OVERQUOTA]
        service.add_listener("imap", description, imap_factory)
        _follow(running, "imap", imap_factory, followed)
    # Sessions hear of in-process deliveries at once; this catches other processes' changes.
    TimerService(MAILBOX_POLL_INTERVAL, mailboxes.poll).setServiceParent(service)

    if tls is not None:
        TimerService(TLS_CHECK_INTERVAL, tls.reload_if_changed).setServiceParent(service)

    _follow_reloads(running, router, runner, relay, tls, authn, users, pool, reactor, journey)
    _follow_limits(running, throttle, quota)

    # --- HTTP (mailsys.web): health, metrics, client autoconfiguration, MTA-STS policy, and
    # the journey pages behind a login (the same portal and throttle as the mail protocols) ---
    if config.web.listen:
        console = Console(users=users, portal=portal, throttle=throttle, disk=pool,
                          reactor=reactor,
                          journey_path=config.journey.path if config.journey.enabled else None,
                          spool=config.storage.spool, queue=runner)
        site = build_web(config, service.all_bound, pool, metrics, reactor, console)
        for description in config.web.listen:
            service.add_listener("web", description, site)
    return service
