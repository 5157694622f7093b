"""The log file of a real server: lines about the service, sessions and messages, none of
Twisted's own life-cycle chatter (factories, datagram protocols, ports opening and closing)."""

from __future__ import annotations

import re
from collections.abc import Callable

from tests.integration import relay_support
from tests.integration.conftest import MailServer, wait_for
from tests.integration.relay_support import (
    LabDNS,
    find_message,
    message,
    relay_section,
    send,
)

lab_dns = relay_support.lab_dns  # the fixture

# What Twisted writes unless told not to (see mailsys.logwriter.is_twisted_chatter).
CHATTER = re.compile(
    r"Starting factory|Stopping factory|Starting protocol|Stopping protocol"
    r"| starting on \d+|Port \d+ Closed"
)


def chatter(log: str) -> list[str]:
    return [line for line in log.splitlines() if CHATTER.search(line)]


def test_a_relay_run_logs_no_twisted_chatter(
    server_factory: Callable[..., MailServer], lab_dns: LabDNS
) -> None:
    """A message relayed over MX (DNS queries, an outbound connection, listeners started and
    stopped) is logged by the service, session and message lines only, with no chatter."""
    lab_dns.set({"remote.test": {"MX": [[10, "mx1.remote.test"]]},
                 "mx1.remote.test": {"A": ["127.0.0.2"]}})
    receiver = server_factory("receiver", interface="127.0.0.2",
                              local_domains=("example.test", "remote.test"),
                              aliases='"someone@remote.test" = ["demo@example.test"]')
    receiver.start()
    sender = server_factory("sender", aliases='"out@example.test" = ["someone@remote.test"]',
                            relay_config=relay_section(lab_dns, receiver.smtp_port))
    sender.start()
    send(sender, ["out@example.test"], message("quiet logs"))
    find_message(receiver.inbox(), b"Subject: quiet logs")
    wait_for(lambda: "status=delivered host=mx1.remote.test" in sender.log(),
             message="the relay's delivery line")
    sender.stop()
    receiver.stop()
    sent, received = sender.log(), receiver.log()
    assert chatter(sent) == [] and chatter(received) == []
    # What stays says what happened: listeners, the message's way, the sessions.
    assert "listening on tcp:" in sent and "queued" in sent and "disconnect from" in sent
    assert "status=delivered mailbox=demo@example.test" in received
