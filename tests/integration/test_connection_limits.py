"""Connection limits of the real server's POP3 and IMAP listeners, with poplib and imaplib."""

from __future__ import annotations

import imaplib
import poplib
import ssl
from collections.abc import Callable

import pytest

from tests.integration.conftest import MailServer, free_port, read_greeting, wait_for


def test_pop3_and_imap_refuse_past_the_per_client_limit(
        server_factory: Callable[..., MailServer]) -> None:
    """Past max_connections_per_client the third POP3 and IMAP connection is refused with a
    clear greeting; once one closes, a new one is served, over TLS too (one shared limit)."""
    pop3_port, pop3s_port, imap_port, imaps_port = (free_port() for _ in range(4))
    server = server_factory(extra_config=f"""
[pop3]
listen = ["tcp:{pop3_port}:interface=127.0.0.1"]
listen_tls = ["tcp:{pop3s_port}:interface=127.0.0.1"]
max_connections_per_client = 2
[imap]
listen = ["tcp:{imap_port}:interface=127.0.0.1"]
listen_tls = ["tcp:{imaps_port}:interface=127.0.0.1"]
max_connections_per_client = 2
""")
    server.start()
    wait_for(lambda: read_greeting(pop3_port).startswith(b"+OK"), deadline=30,
             message="the POP3 greeting")
    wait_for(lambda: read_greeting(imap_port).startswith(b"* OK"), deadline=30,
             message="the IMAP greeting")
    context = ssl._create_unverified_context()

    # Wait until the probes above are forgotten: their sessions end when the peer closes.
    first_pop = poplib.POP3("127.0.0.1", pop3_port, timeout=30)
    second_pop = wait_for(lambda: _try_pop3_ssl(pop3s_port, context), deadline=10,
                          message="a second POP3 place")
    with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\] Too many connections"):
        poplib.POP3("127.0.0.1", pop3_port, timeout=30)
    first_pop.quit()
    third_pop = wait_for(lambda: _try_pop3(pop3_port), deadline=10,
                         message="a POP3 place freed by QUIT")
    third_pop.quit()
    second_pop.quit()

    first_imap = imaplib.IMAP4("127.0.0.1", imap_port, timeout=30)
    second_imap = wait_for(lambda: _try_imap_ssl(imaps_port, context), deadline=10,
                           message="a second IMAP place")
    with pytest.raises(imaplib.IMAP4.error, match=r"UNAVAILABLE"):
        imaplib.IMAP4("127.0.0.1", imap_port, timeout=30)
    first_imap.logout()
    third_imap = wait_for(lambda: _try_imap(imap_port), deadline=10,
                          message="an IMAP place freed by LOGOUT")
    third_imap.logout()
    second_imap.logout()


def _try_pop3(port: int) -> poplib.POP3 | None:
    try:
        return poplib.POP3("127.0.0.1", port, timeout=30)
    except poplib.error_proto:
        return None


def _try_pop3_ssl(port: int, context: ssl.SSLContext) -> poplib.POP3_SSL | None:
    try:
        return poplib.POP3_SSL("127.0.0.1", port, timeout=30, context=context)
    except poplib.error_proto:
        return None


def _try_imap(port: int) -> imaplib.IMAP4 | None:
    try:
        return imaplib.IMAP4("127.0.0.1", port, timeout=30)
    except imaplib.IMAP4.error:
        return None


def _try_imap_ssl(port: int, context: ssl.SSLContext) -> imaplib.IMAP4_SSL | None:
    try:
        return imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=context, timeout=30)
    except imaplib.IMAP4.error:
        return None
