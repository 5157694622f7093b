"""Full disks and full mailboxes against the real `twistd -n mailsys`: the spool and the Maildirs
on small tmpfs file systems, smtplib and imaplib as clients, the `mailsys queue` tools.

Mounting a tmpfs needs root (CI runs as root); elsewhere the tests that need one are skipped
with that reason. The quota tests need no mount.
"""

from __future__ import annotations

import imaplib
import itertools
import os
import re
import shutil
import smtplib
import ssl
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import MAILSYS, MailServer, free_port, read_greeting, wait_for

MESSAGE_SIZE = 500 * 1024
FAST_RETRY = """
[relay]
enabled = false
retry_schedule = [1]
"""


@pytest.fixture
def tmpfs() -> Iterator[Callable[[Path, str], None]]:
    """Mount small tmpfs file systems; all are unmounted (lazily, so a busy one too) at the end.

    Requested before server_factory by the tests, so that the servers are stopped first.
    """
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs the suite as root)")
    mounted: list[Path] = []

    def mount(path: Path, size: str) -> None:
        path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                               str(path)], capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(path)

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def set_storage(server: MailServer, line: str) -> None:
    """Add ``line`` to the [storage] section of the server's config."""
    text = server.config_path.read_text()
    server.config_path.write_text(text.replace("[storage]\n", f"[storage]\n{line}\n", 1))


def big_message(marker: str, size: int = MESSAGE_SIZE, to: str = "demo@example.test") -> str:
    line = "x" * 76 + "\r\n"
    body = line * (size // len(line))
    return (f"From: sender@remote.test\r\nTo: {to}\r\nSubject: {marker}\r\n"
            f"Message-ID: <{marker}@remote.test>\r\n\r\n{body}")


def send(server: MailServer, marker: str, size: int = MESSAGE_SIZE,
         to: str = "demo@example.test") -> tuple[int, str]:
    """Send one message on port 25: (code, text) of the final reply (250 or the refusal)."""
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=60) as client:
        try:
            client.sendmail("sender@remote.test", [to], big_message(marker, size, to))
        except smtplib.SMTPResponseException as error:
            reply = error.smtp_error
            return error.smtp_code, reply.decode() if isinstance(reply, bytes) else reply
        except smtplib.SMTPRecipientsRefused as error:
            code, text = error.recipients[to]
            return code, text.decode()
    return 250, "queued"


def queue_tool(server: MailServer, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MAILSYS, "--config", str(server.config_path), "queue", *args],
                          capture_output=True, text=True, timeout=60)


def fill_up(path: Path) -> None:
    """Write ``path`` until the file system has no byte left."""
    with path.open("wb", buffering=0) as f:
        chunk = b"\0" * 65536
        while True:
            try:
                f.write(chunk)
            except OSError:
                if len(chunk) == 1:
                    return
                chunk = chunk[: len(chunk) // 2]


def markers_in(*directories: Path) -> list[str]:
    """The Subject markers of every message file in ``directories``."""
    found = []
    for directory in directories:
        if not directory.is_dir():
            continue
        for path in directory.iterdir():
            match = re.search(rb"^Subject: (m-\d+)$", path.read_bytes()[:4096], re.MULTILINE)
            if match:
                found.append(match.group(1).decode())
    return sorted(found)


def test_full_spool_and_maildir_recover_without_a_restart(
    tmpfs: Callable[[Path, str], None], server_factory: Callable[..., MailServer],
    tmp_path: Path,
) -> None:
    """With the Maildirs (3 MB) and then the spool (4 MB) full: DATA gets 452 4.3.1, nothing is
    left in spool/tmp, `mailsys queue list` and `flush` work; once the user makes room every
    acknowledged message is delivered exactly once, the spool gives its space back and a new
    message is accepted, all without a restart; storage errors are logged without tracebacks."""
    server = server_factory(relay_config=FAST_RETRY)
    set_storage(server, 'spool_min_free = "none"')
    tmpfs(server.spool, "4m")
    tmpfs(server.maildirs, "3m")
    server.start()
    pid = server.process.pid if server.process else None
    accepted: list[str] = []
    refusal = None
    for index in range(40):
        code, text = send(server, f"m-{index}")
        if code != 250:
            refusal = (code, text)
            break
        accepted.append(f"m-{index}")
    assert refusal is not None, "the spool never filled"
    assert refusal[0] == 452 and refusal[1].startswith("4.3.1"), refusal
    assert len(accepted) >= 8  # some delivered into the Maildirs, the rest in the spool
    wait_for(lambda: not os.listdir(server.spool / "tmp"), message="an empty spool/tmp")

    # Take the last free byte too: the queue tools must not need any.
    filler = server.spool / "filler"
    fill_up(filler)
    listing = queue_tool(server, "list")
    assert listing.returncode == 0, listing.stderr
    queued = int(re.search(r"(\d+) messages? in the queue", listing.stdout).group(1))  # type: ignore[union-attr]
    assert queued > 0 and "4.3.1" in listing.stdout  # deferred: the Maildirs are full
    flushed = queue_tool(server, "flush")
    assert flushed.returncode == 0, flushed.stderr
    assert "due now" in flushed.stdout
    assert "queue control (socket)" in server.log()  # no file written into the full spool
    filler.unlink()

    # The user makes room, a few messages at a time (they read and archive their mail).
    archive = tmp_path / "archive"
    archive.mkdir()
    inbox = server.inbox()

    def drained() -> bool:
        for path in list(inbox.iterdir()) if inbox.is_dir() else []:
            shutil.move(str(path), archive / path.name)
        return "0 messages in the queue" in queue_tool(server, "list").stdout

    wait_for(drained, deadline=90, interval=0.5, message="the queue to empty")
    drained()
    assert markers_in(archive, inbox) == sorted(accepted)  # each exactly once

    # The spool gave its space back: files kept for reuse hold no data.
    free_dir = server.spool / "free"
    assert sum(p.stat().st_blocks for p in free_dir.iterdir()) == 0
    stat = os.statvfs(server.spool)
    assert stat.f_bavail * stat.f_frsize > 3 * 1024 * 1024
    assert send(server, "m-999")[0] == 250
    wait_for(lambda: markers_in(inbox) == ["m-999"], deadline=30, message="the new message")
    assert server.process is not None and server.process.pid == pid
    assert server.process.poll() is None
    log = server.log()
    assert "No space left on device" in log
    assert "Traceback" not in log


def test_free_space_floor_refuses_early_on_every_listener(
    tmpfs: Callable[[Path, str], None], server_factory: Callable[..., MailServer],
) -> None:
    """Below the spool's free-space floor MAIL FROM gets 452 4.3.1 on port 25 and on
    submission, a declared SIZE that does not fit gets it at once, the state is logged once
    when it starts and once when it ends, and mail is accepted again when space returns."""
    server = server_factory()
    set_storage(server, 'spool_min_free = "2M"')
    tmpfs(server.spool, "4m")
    server.start()
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30) as client:
        client.ehlo()
        # RFC 1870 §6.1: a size that would take the free space below the floor.
        code, text = client.mail("sender@remote.test", ["SIZE=2500000"])
        assert (code, text[:5]) == (452, b"4.3.1")
        assert client.mail("sender@remote.test", ["SIZE=1000"])[0] == 250
    filler = server.spool / "filler"
    filler.write_bytes(b"\0" * (int(2.5 * 1024 * 1024)))

    def refused(port: int, submission: bool) -> bool:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo()
            if submission:
                context = ssl.create_default_context()
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
                client.starttls(context=context)
                client.ehlo()
                client.login("demo@example.test", "demo")
            code, text = client.mail("demo@example.test")
            return code == 452 and text.startswith(b"4.3.1")

    wait_for(lambda: refused(server.smtp_port, False), deadline=15, interval=0.2,
             message="452 4.3.1 at MAIL on port 25")
    assert refused(server.submission_port, True)
    assert refused(server.smtp_port, False)
    filler.unlink()
    wait_for(lambda: send(server, "m-after", 1000)[0] == 250, deadline=15, interval=0.2,
             message="mail accepted again")
    log = server.log()
    assert log.count("below its free-space floor") == 1
    assert log.count("has room again") == 1


def test_spool_keeps_blocks_for_reuse_and_gives_them_back_when_space_is_low(
    tmpfs: Callable[[Path, str], None], server_factory: Callable[..., MailServer],
) -> None:
    """With room to spare the files of delivered messages keep their data blocks in free/
    (never more than the floor); when the free space falls below twice the floor they give
    them back within seconds, without a restart, and mail still flows."""
    server = server_factory()
    set_storage(server, 'spool_min_free = "1M"')
    tmpfs(server.spool, "16m")
    server.start()
    free_dir = server.spool / "free"

    def held() -> int:
        return sum(p.stat().st_blocks * 512 for p in free_dir.iterdir())

    def send_all(first: int, count: int) -> None:
        for index in range(first, first + count):
            assert send(server, f"m-{index}", 100 * 1024)[0] == 250

    send_all(0, 6)
    wait_for(lambda: len(server.inbox_files()) == 6, deadline=30, message="six deliveries")
    wait_for(lambda: held() > 0, deadline=15, message="blocks kept in free/")
    assert held() <= 1024 * 1024
    filler = server.spool / "filler"
    free = os.statvfs(server.spool).f_bavail * os.statvfs(server.spool).f_frsize
    filler.write_bytes(b"\0" * (free - int(1.5 * 1024 * 1024)))  # below 2M, above the floor
    wait_for(lambda: held() == 0, deadline=15, interval=0.2, message="free/ to give back")
    send_all(6, 2)  # truncated, not kept, while space is low
    wait_for(lambda: len(server.inbox_files()) == 8, deadline=30, message="two more")
    assert held() == 0
    filler.unlink()
    more = itertools.count(8)

    def kept_again() -> bool:
        # The next look at the free space (each second) lets removed files keep blocks again.
        assert send(server, f"m-{next(more)}", 100 * 1024)[0] == 250
        return held() > 0

    wait_for(kept_again, deadline=30, interval=0.5, message="blocks kept once space returned")
    assert "spool free space low" in server.log()
    assert "Traceback" not in server.log()


@pytest.fixture
def quota_server(server_factory: Callable[..., MailServer]) -> Iterator[tuple[MailServer, int]]:
    """A server where demo@example.test may hold 3 messages or 300 KB, warned at 60 %."""
    port = free_port()
    server = server_factory(relay_config=FAST_RETRY, extra_config=f"""
[imap]
listen = ["tcp:{port}:interface=127.0.0.1"]
allow_plaintext_auth = true

[quota]
warn_percent = 60
storage_per_user = {{ "demo@example.test" = "300K" }}
messages_per_user = {{ "demo@example.test" = 3 }}
""")
    server.add_user("second@example.test", "second")
    server.start()
    wait_for(lambda: read_greeting(port).startswith(b"* OK"), deadline=30,
             message="the IMAP greeting")
    yield server, port


def test_user_over_quota_gets_the_right_codes_and_others_do_not(
    quota_server: tuple[MailServer, int],
) -> None:
    """A mailbox at its quota: the user is warned on the way, RCPT gets 452 4.2.2, APPEND gets
    NO [OVERQUOTA], GETQUOTAROOT reports the usage, mail through an alias waits in the queue
    with 4.2.2 and is delivered once the user deletes mail; another user is unaffected."""
    server, port = quota_server
    assert send(server, "m-1", 100 * 1024)[0] == 250
    assert send(server, "m-2", 100 * 1024)[0] == 250
    wait_for(lambda: len(server.inbox_files()) == 3, deadline=20,
             message="two messages and the quota warning")
    warning = [p for p in server.inbox_files() if b"Subject: Your mailbox is over 60% full"
               in p.read_bytes()]
    assert len(warning) == 1
    # RFC 3463 X.2.2 at RCPT: the sender's server keeps the message and retries.
    code, text = send(server, "m-3", 1000)
    assert code == 452 and text.startswith("4.2.2"), (code, text)
    assert send(server, "m-other", 1000, to="second@example.test")[0] == 250
    wait_for(lambda: len(server.inbox_files("second@example.test")) == 1, deadline=20,
             message="delivery to the other user")

    client = imaplib.IMAP4("127.0.0.1", port, timeout=30)
    client.login("demo@example.test", "demo")
    capabilities = client.capability()[1][0].split()
    assert b"QUOTA" in capabilities and b"QUOTA=RES-STORAGE" in capabilities
    status, data = client.getquotaroot("INBOX")
    assert status == "OK", data
    roots, quotas = data
    assert roots == [b'INBOX ""'] and isinstance(quotas, list)
    match = re.fullmatch(rb'"" \(STORAGE (\d+) 300 MESSAGE 3 3\)', quotas[0])
    assert match and 190 <= int(match.group(1)) <= 210, quotas  # two 100 KB, LF ends
    status, data = client.append("INBOX", None, None, b"Subject: more\r\n\r\nhi\r\n")
    assert status == "NO" and b"[OVERQUOTA]" in data[0], data

    other = imaplib.IMAP4("127.0.0.1", port, timeout=30)
    other.login("second@example.test", "second")
    assert other.append("INBOX", None, None, b"Subject: mine\r\n\r\nhi\r\n")[0] == "OK"
    other.logout()

    # Through an alias the message is accepted; demo's copy waits with 4.2.2.
    assert send(server, "m-team", 1000, to="team@example.test")[0] == 250
    wait_for(lambda: "452 4.2.2" in queue_tool(server, "list").stdout, deadline=20,
             message="the deferral for the full mailbox")
    wait_for(lambda: "m-team" in subjects(server, "second@example.test"), deadline=20,
             message="the other user's copy")
    client.select("INBOX")
    client.store("1", "+FLAGS", "\\Deleted")
    client.expunge()
    client.logout()
    wait_for(lambda: "m-team" in subjects(server, "demo@example.test"), deadline=30,
             message="the deferred copy delivered after the user made room")
    assert "Traceback" not in server.log()


def subjects(server: MailServer, mailbox: str) -> str:
    """The first lines of every message in the INBOX of ``mailbox`` (new/ and cur/)."""
    inbox = server.inbox(mailbox).parent
    paths = [p for sub in ("new", "cur") if (inbox / sub).is_dir() for p in (inbox / sub).iterdir()]
    return " ".join(p.read_bytes()[:2048].decode("ascii", "replace") for p in paths)
