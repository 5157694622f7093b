"""The HTTP listener's pages: one resource that answers by path, and the Site that serves it.

    /livez                                       200 while the reactor turns
    /readyz                                      200 or 503, with each check's result
    /metrics                                     Prometheus text format
    /.well-known/autoconfig/mail/config-v1.1.xml Thunderbird (host autoconfig.<domain>)
    /mail/config-v1.1.xml?emailaddress=...       Thunderbird (ISP-style URL)
    /autodiscover/autodiscover.xml               Outlook (POST), also /Autodiscover/...
    /.well-known/mta-sts.txt                     RFC 8461 policy (host mta-sts.<domain>)

Those are public. Every other page (the journey pages, behind a login) is
mailsys.web.console's, when the listener serves them.

A domain this server does not serve gets a 404 that says nothing about the ones it does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from typing_extensions import override

from mailsys.web.autoconfig import (
    AUTODISCOVER_REQUEST_LIMIT,
    Service,
    autodiscover_address,
    autodiscover_xml,
    thunderbird_xml,
)
from mailsys.web.console import ConsolePages
from mailsys.web.health import Readiness
from mailsys.web.metrics import MetricsText
from mailsys.web.mtasts import MTASTSPolicy

log = Logger(namespace="mailsys.web")

_TEXT = b"text/plain; charset=utf-8"
_XML = b"application/xml; charset=utf-8"
# RFC 8461 §3.3: the policy is served as text/plain.
_PROMETHEUS = b"text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class WebSettings:
    """What the pages tell clients: the served domains, the client host name and services."""

    domains: frozenset[str]
    client_hostname: str
    services: tuple[Service, ...]
    mta_sts: MTASTSPolicy | None  # None: no policy is served


class WebRoot(Resource):
    """Every page of the listener, chosen by the request's path."""

    isLeaf = True  # noqa: N815 - twisted.web's name

    def __init__(self, settings: WebSettings, readiness: Readiness, metrics: MetricsText,
                 console: ConsolePages | None = None) -> None:
        Resource.__init__(self)
        self._settings = settings
        self._console = console
        self._readiness = readiness
        self._metrics = metrics
        self._pages: dict[bytes, Callable[[Request], bytes | int]] = {
            b"/livez": self._livez,
            b"/readyz": self._readyz,
            b"/metrics": self._metrics_page,
            b"/.well-known/autoconfig/mail/config-v1.1.xml": self._thunderbird,
            b"/mail/config-v1.1.xml": self._thunderbird,
            b"/autodiscover/autodiscover.xml": self._autodiscover,
            b"/Autodiscover/Autodiscover.xml": self._autodiscover,
            b"/.well-known/mta-sts.txt": self._mta_sts,
        }

    @override
    def render(self, request: Request) -> bytes | int:
        request.setHeader(b"server", b"mailsys")
        page = self._pages.get(request.path or b"")
        if page is None:
            answer = None if self._console is None else self._console.render(request)
            return _not_found(request) if answer is None else answer
        return page(request)

    # -- health and metrics -----------------------------------------------------------------------

    def _livez(self, request: Request) -> bytes:
        request.setHeader(b"content-type", _TEXT)
        return b"ok\n"

    def _readyz(self, request: Request) -> int:
        def answer(results: dict[str, bool]) -> None:
            if request.finished or getattr(request, "_disconnected", False):
                return
            ready = all(results.values())
            request.setResponseCode(200 if ready else 503)
            request.setHeader(b"content-type", _TEXT)
            lines = [f"{name}: {'ok' if ok else 'failed'}" for name, ok in results.items()]
            lines.append("ready" if ready else "not ready")
            request.write(("\n".join(lines) + "\n").encode())
            request.finish()

        def failed(failure: Failure) -> None:
            log.failure("readiness check failed", failure)
            answer({"internal": False})

        self._readiness.evaluate().addCallbacks(answer, failed)
        return NOT_DONE_YET

    def _metrics_page(self, request: Request) -> bytes:
        request.setHeader(b"content-type", _PROMETHEUS)
        return self._metrics.render()

    # -- client autoconfiguration ----------------------------------------------------------------

    def _served(self, domain: str | None) -> str | None:
        if domain is None:
            return None
        domain = domain.lower().rstrip(".")
        return domain if domain in self._settings.domains else None

    def _thunderbird(self, request: Request) -> bytes:
        # Thunderbird sends ?emailaddress= on both URLs; without it, the host names the domain
        # (autoconfig.<domain>).
        values = (request.args or {}).get(b"emailaddress") or []
        domain: str | None = None
        if values:
            domain = values[0].decode("utf-8", "replace").rpartition("@")[2]
        else:
            domain = _host(request).removeprefix("autoconfig.")
        served = self._served(domain)
        if served is None:
            return _not_found(request)
        request.setHeader(b"content-type", _XML)
        return thunderbird_xml(served, self._settings.client_hostname,
                               list(self._settings.services))

    def _autodiscover(self, request: Request) -> bytes:
        if request.method != b"POST":
            request.setResponseCode(405)
            request.setHeader(b"allow", b"POST")
            request.setHeader(b"content-type", _TEXT)
            return b"POST an autodiscover request\n"
        body = request.content.read(AUTODISCOVER_REQUEST_LIMIT + 1) if request.content else b""
        if len(body) > AUTODISCOVER_REQUEST_LIMIT:
            request.setResponseCode(413)
            request.setHeader(b"content-type", _TEXT)
            return b"request too large\n"
        address = autodiscover_address(body)
        if address is None:
            request.setResponseCode(400)
            request.setHeader(b"content-type", _TEXT)
            return b"no EMailAddress in the request\n"
        if self._served(address.rpartition("@")[2]) is None:
            return _not_found(request)
        request.setHeader(b"content-type", _XML)
        return autodiscover_xml(address, self._settings.client_hostname,
                                list(self._settings.services))

    # -- MTA-STS ----------------------------------------------------------------------------------

    def _mta_sts(self, request: Request) -> bytes:
        # RFC 8461 §3.3: fetched from https://mta-sts.<domain>/.well-known/mta-sts.txt.
        policy = self._settings.mta_sts
        host = _host(request)
        if policy is None or not host.startswith("mta-sts."):
            return _not_found(request)
        if self._served(host.removeprefix("mta-sts.")) is None:
            return _not_found(request)
        request.setHeader(b"content-type", _TEXT)
        return policy.text()


def _host(request: Request) -> str:
    host: bytes = request.getRequestHostname()
    return host.decode("ascii", "replace").lower().rstrip(".")


def _not_found(request: Request) -> bytes:
    request.setResponseCode(404)
    request.setHeader(b"content-type", _TEXT)
    return b"not found\n"


class WebSite(Site):
    """A Site that writes no access-log line per request: a scraper a second would fill the
    log; metrics count what matters."""

    noisy = False

    def __init__(self, resource: Resource) -> None:
        Site.__init__(self, resource)

    @override
    def log(self, request: Any) -> None:
        pass


def build_site(settings: WebSettings, readiness: Readiness, registry: Any,
               clock: IReactorTime, console: ConsolePages | None = None) -> WebSite:
    """The Site for the HTTP listener (with the journey pages when ``console`` is given)."""
    site = WebSite(WebRoot(settings, readiness, MetricsText(registry, clock), console))
    site.displayTracebacks = False  # details go to the log, never to the peer
    return site
