"""The production recipe, for real: twistd binds ports below 1024 as root and drops to an
unprivileged account (--uid/--gid); the `mailsys` commands, run as root or as that account while
it serves, leave it able to read what they wrote (issue 19).

The test creates a system account of its own (removed at the end) and works in a directory under
/tmp that the account may enter; pytest's own tmp_path is private to root.
"""

from __future__ import annotations

import imaplib
import json
import os
import pwd
import random
import secrets
import shutil
import smtplib
import socket
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import pytest

from mailsys import cli
from mailsys.config import load
from tests.integration.conftest import MAILSYS, TWISTD, MailServer, read_greeting, wait_for

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="binds ports below 1024 and runs twistd --uid/--gid as root: needs root "
           "(CI runs as root)")

PASSWORD = "s3cret pass"


def free_privileged_ports(count: int, interface: str = "127.0.0.1") -> list[int]:
    """``count`` ports below 1024 that nothing listens on now, found by binding each."""
    found: list[int] = []
    for port in random.sample(range(600, 1024), 424):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((interface, port))
            except OSError:
                continue
        found.append(port)
        if len(found) == count:
            return found
    raise AssertionError("no free ports below 1024 on loopback")


@dataclass
class Deployment:
    """A server run as ``account`` from ``server.directory``, and what the test needs of it."""

    account: str
    uid: int
    gid: int
    server: MailServer
    imap_port: int

    @property
    def users_file(self) -> Path:
        return self.server.directory / "var" / "users"

    def mailsys(self, *args: str, stdin: str = "", user: str | None = None
                ) -> subprocess.CompletedProcess[str]:
        """Run the `mailsys` command as root, or as ``user``."""
        argv = ["--config", str(self.server.config_path), *args]
        if user is not None:
            return run_as(user, argv, stdin, self.server.directory)
        return subprocess.run([MAILSYS, *argv], input=stdin, capture_output=True, text=True,
                              timeout=60, cwd=self.server.directory)

    def add_user(self, mailbox: str, user: str | None = None) -> None:
        done = self.mailsys("user", "add", mailbox, "--password-stdin", stdin=f"{PASSWORD}\n",
                            user=user)
        assert (done.returncode, done.stderr) == (0, ""), done.stderr

    def context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.load_verify_locations(cafile=str(self.server.directory / "var/tls/cert.pem"))
        return context

    def imap_login(self, mailbox: str, password: str = PASSWORD) -> imaplib.IMAP4:
        client = imaplib.IMAP4("127.0.0.1", self.imap_port, timeout=30)
        client.starttls(self.context())
        client.login(mailbox, password)
        return client

    def submit(self, mailbox: str, to: str, subject: str) -> None:
        """Submit on the submission port as ``mailbox`` (STARTTLS, AUTH)."""
        with smtplib.SMTP("127.0.0.1", self.server.submission_port, timeout=30) as client:
            client.starttls(context=self.context())
            client.login(mailbox, PASSWORD)
            client.send_message(_message(mailbox, to, subject))

    def deliver(self, to: str, subject: str) -> None:
        """Deliver from outside on the MTA port."""
        with smtplib.SMTP("127.0.0.1", self.server.smtp_port, timeout=30) as client:
            client.send_message(_message("someone@elsewhere.test", to, subject))

    def inbox_has(self, mailbox: str, subject: str) -> Path | None:
        for path in self.server.inbox_files(mailbox):
            if f"Subject: {subject}".encode() in path.read_bytes():
                return path
        return None

    def envelopes(self) -> list[dict[str, object]]:
        queue = self.server.spool / "queue"
        return [json.loads(p.read_text()) for p in sorted(queue.glob("*.env"))]


def run_as(user: str, argv: list[str], stdin: str, cwd: Path
           ) -> subprocess.CompletedProcess[str]:
    """The `mailsys` command as ``user``, in a forked process that drops to that account.

    Forked rather than executed: the interpreter running the tests may live where the account
    cannot reach it (a Python under /root), while the command's code is already loaded here.
    """
    entry = pwd.getpwnam(user)
    # Modules the command imports late must be loaded before the child loses the way to them.
    load(argv[argv.index("--config") + 1], check_files=False)
    stdin_r, stdin_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 70
        try:
            for fd in (stdin_w, out_r, err_r):
                os.close(fd)
            os.initgroups(user, entry.pw_gid)
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)
            os.chdir(cwd)
            sys.stdin = open(stdin_r, encoding="utf-8")  # noqa: SIM115 - the child exits
            sys.stdout = open(out_w, "w", encoding="utf-8")  # noqa: SIM115
            sys.stderr = open(err_w, "w", encoding="utf-8")  # noqa: SIM115
            status = cli.main(argv)
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(status)
    for fd in (stdin_r, out_w, err_w):
        os.close(fd)
    os.write(stdin_w, stdin.encode())
    os.close(stdin_w)
    with open(out_r, encoding="utf-8") as out, open(err_r, encoding="utf-8") as err:
        stdout, stderr = out.read(), err.read()
    _, wait_status = os.waitpid(pid, 0)
    return subprocess.CompletedProcess(argv, os.waitstatus_to_exitcode(wait_status), stdout,
                                       stderr)


def _message(sender: str, to: str, subject: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = sender, to, subject
    msg.set_content("Hello.")
    return msg


@pytest.fixture(scope="module")
def deployment() -> Iterator[Deployment]:
    """A system account of its own, and the server started as root, dropping to it."""
    name = f"mailsys-{secrets.token_hex(4)}"
    subprocess.run(["useradd", "--system", "--user-group", "--no-create-home",
                    "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name],
                   check=True, capture_output=True, timeout=60)
    base = Path(tempfile.mkdtemp(prefix="mailsys-unprivileged-", dir="/tmp"))
    server: MailServer | None = None
    try:
        entry = pwd.getpwnam(name)
        base.chmod(0o755)
        directory = base / "server"
        directory.mkdir(mode=0o755)
        # As README's production section lays it out: var/ and maildirs/ are the account's.
        for sub in ("var", "maildirs"):
            (directory / sub).mkdir(mode=0o750)
            os.chown(directory / sub, entry.pw_uid, entry.pw_gid)
        smtp, submission, submissions, imap, closed = free_privileged_ports(5)
        relay = f"""
[relay]
dns_servers = ["127.0.0.1:{closed}"]
smarthost = "smtp:[127.0.0.1]:{closed}"
retry_schedule = [600]
connect_timeout = 5.0
"""
        server = MailServer(directory, smtp, submission, submissions, relay_config=relay,
                            extra_config=f'[imap]\nlisten = ["tcp:{imap}:interface=127.0.0.1"]\n')
        server.write_config()
        text = server.config_path.read_text()
        server.config_path.write_text(text.replace(
            '[server]\n', f'[server]\nuser = "{name}"\ngroup = "{name}"\n', 1))
        log = server.log_path.open("ab")
        server.process = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", f"--uid={name}", f"--gid={name}", "mailsys",
             "--config", str(server.config_path)],
            cwd=directory, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        for port in (smtp, submission, submissions, imap):
            server._wait_listening(port)
        wait_for(lambda: read_greeting(smtp).startswith(b"220"), deadline=30,
                 message="the SMTP greeting")
        yield Deployment(name, entry.pw_uid, entry.pw_gid, server, imap)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(base, ignore_errors=True)
        subprocess.run(["userdel", name], capture_output=True, timeout=60)


def _ids(pid: int) -> tuple[int, int]:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    uid = next(line for line in status if line.startswith("Uid:")).split()[1:]
    gid = next(line for line in status if line.startswith("Gid:")).split()[1:]
    return int(uid[1]), int(gid[1])  # effective ids


def test_server_runs_as_the_account_with_its_files_readable(deployment: Deployment) -> None:
    """After binding ports below 1024 the server runs as the account; the users file made
    before the drop is root:<account> 0640, and no warning about root is logged."""
    server = deployment.server
    assert server.process is not None
    assert _ids(server.process.pid) == (deployment.uid, deployment.gid)
    st = deployment.users_file.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, deployment.gid, 0o640)
    key = (server.directory / "var" / "tls" / "key.pem").stat()
    assert (key.st_uid, key.st_mode & 0o777) == (deployment.uid, 0o640)
    assert "running as root" not in server.log()
    done = deployment.mailsys("check-config")
    assert done.returncode == 0, done.stderr
    assert f"runs as {deployment.account}:{deployment.account}" in done.stdout


def test_user_added_by_root_while_serving_logs_in_and_gets_mail(deployment: Deployment) -> None:
    """`mailsys user add` as root while the server runs: the new user logs in over IMAP and
    submission, and mail from outside and from themselves lands in their Maildir."""
    deployment.add_user("carol@example.test")
    st = deployment.users_file.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, deployment.gid, 0o640)
    client = deployment.imap_login("carol@example.test")
    client.logout()
    deployment.submit("carol@example.test", "carol@example.test", "from carol")
    deployment.deliver("carol@example.test", "from outside")
    for subject in ("from carol", "from outside"):
        wait_for(lambda s=subject: deployment.inbox_has("carol@example.test", s),  # type: ignore[misc]
                 message=f"the message {subject!r}")
    delivered = deployment.inbox_has("carol@example.test", "from outside")
    assert delivered is not None and delivered.stat().st_uid == deployment.uid
    client = deployment.imap_login("carol@example.test")
    client.select("INBOX")
    _, data = client.search(None, "ALL")
    assert len(data[0].split()) == 2
    client.logout()
    assert "Traceback" not in deployment.server.log()


def test_the_servers_own_user_may_add_users_and_others_are_refused(
    deployment: Deployment
) -> None:
    """The account itself may run `mailsys user add` and the server reads the result; a third
    user is refused in one line and the file is left as it was."""
    deployment.add_user("dave@example.test", user=deployment.account)
    deployment.imap_login("dave@example.test").logout()
    before = deployment.users_file.read_bytes()
    refused = deployment.mailsys("user", "add", "eve@example.test", "--password-stdin",
                                 stdin=f"{PASSWORD}\n", user="nobody")
    assert refused.returncode == 1
    assert refused.stderr.count("\n") == 1
    assert refused.stderr.startswith("mailsys: refusing to change ")
    assert f"run this as root or as {deployment.account}" in refused.stderr
    assert deployment.users_file.read_bytes() == before


def test_queue_hold_and_release_as_root_against_the_running_server(
    deployment: Deployment
) -> None:
    """`mailsys queue hold/release` as root reach the server running as the account, which
    applies them to its own envelopes."""
    deployment.add_user("frank@example.test")
    deployment.submit("frank@example.test", "someone@remote.test", "waiting")

    def deferred() -> str | None:
        for envelope in deployment.envelopes():
            recipients = envelope["recipients"]
            assert isinstance(recipients, list)
            if recipients[0]["attempts"]:
                return str(envelope["queue_id"])
        return None

    queue_id = wait_for(deferred, deadline=30, message="a deferred message")
    assert isinstance(queue_id, str)
    held = deployment.mailsys("queue", "hold", queue_id)
    assert (held.returncode, held.stdout, held.stderr) == (0, f"{queue_id}: held\n", "")
    envelope = deployment.server.spool / "queue" / f"{queue_id}.env"
    assert json.loads(envelope.read_text())["held"] is True
    assert envelope.stat().st_uid == deployment.uid
    released = deployment.mailsys("queue", "release", queue_id)
    assert (released.returncode, released.stdout) == (0, f"{queue_id}: released\n")
    assert json.loads(envelope.read_text())["held"] is False
    deleted = deployment.mailsys("queue", "delete", queue_id)
    assert deleted.returncode == 0, deleted.stderr


def test_unreadable_users_file_is_one_log_line_and_no_serverbug(deployment: Deployment) -> None:
    """A users file made unreadable on purpose: one log line naming it and its permissions,
    known users still log in, a wrong password is a plain failure, never SERVERBUG; root's
    next `mailsys user add` gives the file back to the server's group."""
    deployment.add_user("grace@example.test")
    deployment.imap_login("grace@example.test").logout()
    users = deployment.users_file
    os.chown(users, 0, 0)
    users.chmod(0o600)
    line = f"user store {users}: cannot read it: Permission denied (the file is root:root 0600"
    wait_for(lambda: line in deployment.server.log(), message="the log line")
    for _ in range(3):
        deployment.imap_login("grace@example.test").logout()
    with pytest.raises(imaplib.IMAP4.error) as refused:
        deployment.imap_login("grace@example.test", "wrong")
    assert "SERVERBUG" not in str(refused.value)
    log = deployment.server.log()
    assert log.count("cannot read it") == 1
    assert "SERVERBUG" not in log and "Traceback" not in log
    deployment.add_user("heidi@example.test")
    st = users.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, deployment.gid, 0o640)
    deployment.imap_login("heidi@example.test").logout()
    wait_for(lambda: f"user store {users}: readable again" in deployment.server.log(),
             message="the all-clear")
