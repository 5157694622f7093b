"""The RFC 7208 test suite once more, over the wire: each scenario's zone served by the lab DNS
server (twisted.names) on a loopback UDP port, asked by twisted.names' client through our
caching resolver, as the server does in production."""

from __future__ import annotations

from typing import Any

import yaml
from twisted.internet.defer import Deferred, ensureDeferred, maybeDeferred
from twisted.names import client, error
from twisted.trial import unittest

from mailsys.authn.spf import SPFChecker
from mailsys.dns import CachingResolver
from mailsys.labdns import serve
from tests.unit.test_spf_suite import SUITE, _zone

# A suite "TIMEOUT" is a server that never answers: our own deadline ends the wait.
DEADLINE = 1.0


class SPFSuiteOverUDP(unittest.TestCase):
    timeout = 300

    def test_every_case_over_udp(self) -> Deferred[None]:
        """Every case of the suite gives its expected result with the zone served over UDP."""
        return ensureDeferred(self._every_case())

    async def _every_case(self) -> None:
        from twisted.internet import reactor

        self.addCleanup(self.flushLoggedErrors, error.ResolverError)
        mismatches: list[str] = []
        count = 0
        with SUITE.open("rb") as stream:
            scenarios = list(yaml.safe_load_all(stream))
        for scenario in scenarios:
            udp, tcp = serve(_zone(scenario["zonedata"]), 0, "127.0.0.1", reactor)
            try:
                upstream = client.Resolver(servers=[("127.0.0.1", udp.getHost().port)],
                                           reactor=reactor)
                for name, test in scenario["tests"].items():
                    count += 1
                    resolver = CachingResolver(upstream, reactor, timeout=DEADLINE)
                    checker = SPFChecker(resolver, default_explanation="DEFAULT")
                    outcome: Any = await checker.check_mailfrom(test["host"], test["mailfrom"],
                                                                test["helo"])
                    expected = test["result"]
                    allowed = expected if isinstance(expected, list) else [expected]
                    if outcome.result not in allowed:
                        mismatches.append(f"{name}: {outcome.result} not in {allowed}")
                    elif ("explanation" in test and outcome.explanation.lower()
                          != test["explanation"].lower()):
                        mismatches.append(f"{name}: explanation {outcome.explanation!r}")
            finally:
                await maybeDeferred(udp.stopListening)
                await maybeDeferred(tcp.stopListening)
        assert count == 203
        assert mismatches == []
