"""The listener service: binds at privileged start-up, refuses to run without its port, and
closes it on stop; and the endpoint strings config.py checks are those serverFromString reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.endpoints import TCP6ServerEndpoint, serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor

from mailsys import config
from mailsys.service import Listener


class RefusingReactor(MemoryReactor):
    """A reactor whose ports are all taken."""

    def listenTCP(self, port: int, factory: Any, backlog: int = 50,  # noqa: N802
                  interface: str = "") -> Any:
        raise CannotListenError(interface, port, OSError(98, "Address already in use"))


def test_listener_binds_at_privileged_start_and_closes_on_stop() -> None:
    """The port is bound before privileges are dropped and closed when the service stops."""
    reactor = MemoryReactor()
    listener = Listener(serverFromString(reactor, "tcp:2525:interface=127.0.0.1:backlog=7"),
                        Factory.forProtocol(Protocol))
    listener.privilegedStartService()
    ((port, _factory, backlog, interface),) = reactor.tcpServers
    assert (port, backlog, interface) == (2525, 7, "127.0.0.1")
    listener.startService()
    assert len(reactor.tcpServers) == 1  # not bound a second time
    stopped = listener.stopService()
    assert stopped.called and not listener.running


def test_listener_that_cannot_bind_raises() -> None:
    """A port that cannot be bound fails start-up instead of being logged and forgotten."""
    listener = Listener(serverFromString(RefusingReactor(), "tcp:25"),
                        Factory.forProtocol(Protocol))
    with pytest.raises(CannotListenError):
        listener.privilegedStartService()


@pytest.mark.parametrize(("description", "args", "kwargs"), [
    ("tcp:25", ["tcp", "25"], {}),
    ("tcp:port=25:interface=127.0.0.1", ["tcp"], {"port": "25", "interface": "127.0.0.1"}),
    (r"tcp6:25:interface=\:\:1", ["tcp6", "25"], {"interface": "::1"}),
    ("unix:/run/mail.sock:mode=660", ["unix", "/run/mail.sock"], {"mode": "660"}),
    (r"unix:address=/tmp/a\=b", ["unix"], {"address": "/tmp/a=b"}),
])
def test_endpoint_strings_split_as_twisted_reads_them(
    description: str, args: list[str], kwargs: dict[str, str]
) -> None:
    """The strports syntax: ':' separates, '\\' escapes, the first '=' names an option."""
    assert config.split_endpoint(description) == (args, kwargs)


def test_normalised_listener_is_what_serverfromstring_builds(tmp_path: Path) -> None:
    """An escaped IPv6 interface checked by config.py reaches Twisted as the same address."""
    description = config.normalize_listener(r"tcp6:2525:interface=\:\:1", tmp_path, "smtp.listen")
    assert description.endswith(":backlog=1024")
    reactor = MemoryReactor()
    endpoint = serverFromString(reactor, description)
    assert isinstance(endpoint, TCP6ServerEndpoint)
    endpoint.listen(Factory.forProtocol(Protocol))
    ((port, _factory, backlog, interface),) = reactor.tcpServers
    assert (port, backlog, interface) == (2525, 1024, "::1")
