"""mailsys.sdnotify: datagrams to $NOTIFY_SOCKET as sd_notify(3) sends them."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from mailsys.sdnotify import READY, notify


def test_sends_one_datagram_to_the_socket(tmp_path: Path) -> None:
    """The fields arrive as one datagram, one per line, on the socket named by NOTIFY_SOCKET."""
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        assert notify(READY, "STATUS=up", environ={"NOTIFY_SOCKET": path})
        assert sock.recv(4096) == b"READY=1\nSTATUS=up"


def test_abstract_socket(tmp_path: Path) -> None:
    """An address starting with @ is an abstract socket."""
    name = f"mailsys-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        assert notify(READY, environ={"NOTIFY_SOCKET": "@" + name})
        assert sock.recv(4096) == b"READY=1"


def test_without_notify_socket_nothing_happens() -> None:
    """Not started by systemd: nothing is sent, nothing fails."""
    assert not notify(READY, environ={})


def test_gone_socket_is_not_an_error(tmp_path: Path) -> None:
    """A socket nobody listens on any more is logged, never raised."""
    assert not notify(READY, environ={"NOTIFY_SOCKET": str(tmp_path / "gone")})
