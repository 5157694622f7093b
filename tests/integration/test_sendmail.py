"""`mailsys-sendmail` against the real server: -t from a script to a local and a remote
recipient (relayed through a lab DNS to a second server), Bcc removed, -bs spoken by swaks,
mail given while the server is down, and the bad inputs of issue 16.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import MailServer, free_port, make_server, wait_for
from tests.integration.relay_support import (
    LabDNS,
    find_message,
    parse,
    relay_section,
    start_lab_dns,
)

SENDMAIL = str(Path(sys.executable).parent / "mailsys-sendmail")


# Runs argv[1:] and prints the peak resident memory of that child, in kilobytes.
MEASURE = """
import resource, subprocess, sys
status = subprocess.call(sys.argv[1:])
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(status)
"""


def pickup(directory: Path) -> str:
    return f'\n[pickup]\ndirectory = "{directory}/var/pickup"\n'


@dataclass
class Pair:
    dns: LabDNS
    sender: MailServer
    receiver: MailServer
    web_port: int  # the sender's HTTP listener


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    root = tmp_path_factory.mktemp("sendmail")
    dns = start_lab_dns(root / "dns", {"remote.test": {"MX": [[10, "mx.remote.test"]]},
                                       "mx.remote.test": {"A": ["127.0.0.2"]}})
    servers: list[MailServer] = []
    try:
        receiver = make_server(root / "receiver", interface="127.0.0.2",
                               local_domains=("example.test", "remote.test"),
                               aliases='"someone@remote.test" = ["demo@example.test"]')
        servers.append(receiver)
        receiver.start()
        web_port = free_port()
        sender = make_server(root / "sender", extra_config=pickup(root / "sender") + f"""
[web]
listen = ["tcp:{web_port}:interface=127.0.0.1"]
""", relay_config=relay_section(dns, receiver.smtp_port))
        servers.append(sender)
        sender.start()
        yield Pair(dns, sender, receiver, web_port)
    finally:
        for server in servers:
            server.kill()
        dns.stop()


def sendmail(server: MailServer, *args: str, data: bytes = b"",
             **kwargs: object) -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ, MAILSYS_CONFIG=str(server.config_path))
    return subprocess.run([SENDMAIL, *args], input=data, capture_output=True, env=env,
                          timeout=120, check=False, **kwargs)  # type: ignore[call-overload]


def test_t_delivers_to_a_local_and_a_remote_recipient_without_bcc(pair: Pair) -> None:
    """-t from a script: To and Bcc recipients get the message, local and relayed, with the Bcc
    field removed and a Received field naming the local user's uid."""
    script = pair.sender.directory / "cron.sh"
    script.write_text(f"""#!/bin/sh
printf 'To: demo@example.test\\nBcc: someone@remote.test\\nSubject: from cron\\n\\nDone.\\n' \\
  | "{SENDMAIL}" -t -oi
""")
    script.chmod(0o755)
    env = dict(os.environ, MAILSYS_CONFIG=str(pair.sender.config_path))
    done = subprocess.run([str(script)], env=env, capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    local = find_message(pair.sender.inbox(), b"Subject: from cron")
    remote = find_message(pair.receiver.inbox(), b"Subject: from cron")
    for path in (local, remote):
        msg = parse(path)
        assert msg["Bcc"] is None
        assert msg["To"] == "demo@example.test"
        assert msg["Message-ID"] and msg["Date"]
    received = " ".join(str(r) for r in parse(local).get_all("Received") or [])
    assert f"from userid {os.getuid()}" in received
    user = pwd.getpwuid(os.getuid()).pw_name
    assert parse(local)["From"] == f"{user}@example.test"


def test_readyz_asks_dns_when_relay_is_on(pair: Pair) -> None:
    """With relay on, /readyz also checks that the (lab) DNS server answers."""
    with urllib.request.urlopen(f"http://127.0.0.1:{pair.web_port}/readyz", timeout=10) as response:
        body = response.read()
    assert response.status == 200
    assert b"dns: ok" in body and b"spool: ok" in body and b"listeners: ok" in body


def test_bs_speaks_smtp_with_swaks(pair: Pair) -> None:
    """-bs: swaks speaks SMTP on the command's standard input and output; the mail arrives."""
    swaks = shutil.which("swaks")
    if swaks is None:
        pytest.skip("swaks is not installed (apt-get install swaks)")
    env = dict(os.environ, MAILSYS_CONFIG=str(pair.sender.config_path))
    done = subprocess.run(
        [swaks, "--pipe", f"{SENDMAIL} -bs", "--from", "demo@example.test",
         "--to", "demo@example.test", "--header", "Subject: over bs"],
        env=env, capture_output=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert b"250 2.0.0 Ok: queued" in done.stdout
    find_message(pair.sender.inbox(), b"Subject: over bs")


def test_bp_lists_the_queue(pair: Pair) -> None:
    """-bp prints the queue as `mailsys queue list` does."""
    done = sendmail(pair.sender, "-bp")
    assert done.returncode == 0, done.stderr
    assert b"in the queue" in done.stdout


def test_unknown_local_recipient_bounces_to_the_user(pair: Pair) -> None:
    """An unknown local recipient cannot be refused at the command line: the user gets a
    bounce naming it."""
    done = sendmail(pair.sender, "-f", "demo@example.test", "nobody@example.test",
                    data=b"Subject: to nobody\n\nHello\n")
    assert done.returncode == 0, done.stderr
    bounce = find_message(pair.sender.inbox(), b"nobody@example.test")
    assert b"5.1.1" in bounce.read_bytes()


@pytest.mark.parametrize(("args", "data", "status", "text"), [
    ((), b"Subject: x\n\nbody\n", 64, b"no recipients"),
    (("-t",), b"Subject: x\n\nbody\n", 65, b"no recipient addresses"),
    (("-f", "bad address<>", "demo@example.test"), b"x\n", 64, b"bad sender address"),
    (("-q",), b"", 64, b"unknown option -q"),
    (("-bz",), b"", 64, b"unsupported mode"),
])
def test_bad_input_is_one_line_and_a_sysexits_status(
    pair: Pair, args: tuple[str, ...], data: bytes, status: int, text: bytes
) -> None:
    """No recipients, -t without any, a bad -f and unknown options: one line on stderr, a
    sysexits status, and nothing left in the pickup directory."""
    done = sendmail(pair.sender, *args, data=data)
    assert done.returncode == status
    assert text in done.stderr
    assert done.stderr.count(b"\n") == 1
    assert not list((pair.sender.directory / "var" / "pickup").glob("*.tmp"))


def test_header_only_message_is_delivered(pair: Pair) -> None:
    """A message of header fields only (no empty line, no body) is delivered."""
    done = sendmail(pair.sender, "demo@example.test", data=b"Subject: header only\n")
    assert done.returncode == 0, done.stderr
    path = find_message(pair.sender.inbox(), b"Subject: header only")
    assert parse(path)["Subject"] == "header only"


def test_100_mb_message_is_refused_and_nothing_is_left(pair: Pair) -> None:
    """A 100 MB message from a cron job is refused at once (EX_DATAERR) beyond the size limit,
    with no partial file left behind."""
    big = b"Subject: big\n\n" + (b"x" * 999 + b"\n") * 100_000
    done = sendmail(pair.sender, "demo@example.test", data=big)
    assert done.returncode == 65
    assert b"message too large" in done.stderr
    assert not list((pair.sender.directory / "var" / "pickup").glob("*.tmp"))


def test_closed_stdout(pair: Pair) -> None:
    """With standard output closed, a submission still succeeds, and -bp fails with EX_IOERR
    and one line instead of a traceback."""
    env = dict(os.environ, MAILSYS_CONFIG=str(pair.sender.config_path))
    done = subprocess.run(
        ["sh", "-c", f'printf "Subject: closed stdout\\n\\nx\\n" | "{SENDMAIL}" '
         'demo@example.test >&-'], env=env, capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    find_message(pair.sender.inbox(), b"Subject: closed stdout")
    listing = subprocess.run(["sh", "-c", f'"{SENDMAIL}" -bp >&-'], env=env,
                             capture_output=True, timeout=60, check=False)
    assert listing.returncode == 74
    assert listing.stderr.count(b"\n") == 1 and b"Traceback" not in listing.stderr


def test_mail_given_while_the_server_is_down_goes_out_when_it_starts(tmp_path: Path) -> None:
    """sendmail works while no server runs; the message waits in the pickup directory and is
    delivered once the server starts."""
    server = make_server(tmp_path / "down", extra_config=pickup(tmp_path / "down"))
    try:
        server.start()  # once, so the pickup directory exists as the server makes it
        # Ports are bound before the services start: the directory comes a moment later.
        wait_for(lambda: (server.directory / "var" / "pickup").is_dir(),
                 message="the pickup directory")
        server.stop()
        done = sendmail(server, "demo@example.test", data=b"Subject: while down\n\nx\n")
        assert done.returncode == 0, done.stderr
        assert list((server.directory / "var" / "pickup").glob("*.drop"))
        server.start()
        find_message(server.inbox(), b"Subject: while down")
        wait_for(lambda: not list((server.directory / "var" / "pickup").glob("*.drop")),
                 message="the drop removed after queueing")
    finally:
        server.kill()


def test_local_user_is_the_files_owner_and_the_group_gates_submission(
    server_factory: Callable[..., MailServer],
) -> None:
    """Run as another user: a member of the pickup group submits without a password and the
    Received field names that uid; a user outside the group is refused with EX_NOPERM."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run the command as another user (setpriv)")
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("setpriv (util-linux) is not installed")
    group = grp.getgrnam("mail")  # Debian's base system has it (gid 8)
    nobody = pwd.getpwnam("nobody")
    # Outside pytest's private temporary tree, which other users may not traverse.
    shared = Path(tempfile.mkdtemp(prefix="mailsys-pickup-"))
    try:
        shared.chmod(0o755)
        server = server_factory(extra_config=f"""
[pickup]
directory = "{shared}/pickup"
group = "mail"
""")
        server.start()
        wait_for(lambda: (shared / "pickup").is_dir(), message="the pickup directory")
        config = shared / "mailsys.toml"
        shutil.copy(server.config_path, config)
        config.chmod(0o644)
        as_member = [setpriv, f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}",
                     f"--groups={group.gr_gid}"]
        as_stranger = [setpriv, f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}",
                       "--clear-groups"]
        message = b"Subject: from nobody\n\nhello\n"
        done = subprocess.run([*as_member, SENDMAIL, "--config", str(config),
                               "demo@example.test"], input=message, capture_output=True,
                              timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        path = find_message(server.inbox(), b"Subject: from nobody")
        received = " ".join(str(r) for r in parse(path).get_all("Received") or [])
        assert f"from userid {nobody.pw_uid} (nobody)" in received
        assert parse(path)["From"] == "nobody@example.test"
        refused = subprocess.run([*as_stranger, SENDMAIL, "--config", str(config),
                                  "demo@example.test"], input=message, capture_output=True,
                                 timeout=60, check=False)
        assert refused.returncode == 77
        assert b"Permission denied" in refused.stderr
    finally:
        shutil.rmtree(shared, ignore_errors=True)


def test_100_mb_message_streams_to_the_pickup_file_in_bounded_memory(tmp_path: Path) -> None:
    """A 100 MB message from a cron job, under a size limit that allows it, is streamed into
    the pickup file: the command's peak memory stays far below the message's size, the drop
    holds all of it, and the server delivers it whole."""
    limit = 150 * 1024 * 1024
    server = make_server(tmp_path / "big", smtp_extra=f"max_message_size = {limit}",
                         extra_config=pickup(tmp_path / "big"))
    line = b"y" * 999 + b"\n"
    source = tmp_path / "big.eml"
    with source.open("wb") as out:
        out.write(b"Subject: one hundred megabytes\n\n")
        for _ in range(100):
            out.write(line * 1000)  # 1 MB at a time
    size = source.stat().st_size
    drops = server.directory / "var" / "pickup"
    try:
        server.start()  # once, so the pickup directory exists as the server makes it
        wait_for(lambda: drops.is_dir(), message="the pickup directory")
        server.stop()  # the drop is looked at whole before the server takes it
        env = dict(os.environ, MAILSYS_CONFIG=str(server.config_path))
        # The peak is measured by a small parent of its own: a child forked from this test
        # process would count this process's memory before its exec in its peak.
        with source.open("rb") as stdin:
            done = subprocess.run([sys.executable, "-c", MEASURE, SENDMAIL, "demo@example.test"],
                                  stdin=stdin, env=env, capture_output=True, timeout=300,
                                  check=False)
        assert done.returncode == 0, done.stderr
        peak = int(done.stdout) * 1024  # ru_maxrss is in kilobytes on Linux
        assert peak < size // 2, f"peak memory {peak} bytes for a {size} byte message"
        (drop,) = drops.glob("*.drop")
        assert drop.stat().st_size >= size
        server.start()
        found = find_message(server.inbox(), b"Subject: one hundred megabytes", deadline=300)
        assert found.stat().st_size >= size
    finally:
        server.kill()
