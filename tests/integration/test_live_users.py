"""Users added with `mailsys user add` while `twistd -n mailsys` runs: known on the first try."""

from __future__ import annotations

import imaplib
import smtplib
import subprocess
from collections.abc import Callable
from email.message import EmailMessage

from tests.integration.conftest import MAILSYS, MailServer, wait_for
from tests.integration.test_imap import IMAPServer, make_imap

# The server's reload timer looks at the user file once a second; several users in a row make
# it near certain that at least one is asked for before that timer has seen it.
NEW_USERS = 4


def _message(to: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "alice@sender.test"
    msg["To"] = to
    msg["Subject"] = "welcome"
    msg.set_content("Hello.\n")
    return msg


def test_user_added_while_running_receives_and_logs_in_on_the_first_try(
    server_factory: Callable[..., MailServer],
) -> None:
    """Right after `mailsys user add` returns, mail to the user is accepted (no 550) and the user
    logs in by IMAP and by SMTP AUTH, each on the first try."""
    imap = make_imap(server_factory)
    server = imap.mail
    context = imap.context()
    for n in range(NEW_USERS):
        user, password = f"race{n}@example.test", f"secret-{n}"
        server.add_user(user, password)
        with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=10) as client:
            client.ehlo("client.test")
            assert client.send_message(_message(user)) == {}
        with imaplib.IMAP4("127.0.0.1", imap.port, timeout=30) as reader:
            reader.starttls(context)
            status, _ = reader.login(user, password)
            assert status == "OK"
        with smtplib.SMTP("127.0.0.1", server.submission_port, timeout=10) as submitter:
            submitter.starttls(context=context)
            code, _ = submitter.login(user, password)
            assert code == 235
    delivered = [f"race{n}@example.test" for n in range(NEW_USERS)]
    wait_for(lambda: all(server.inbox_files(user) for user in delivered), deadline=10,
             message="delivery to every new user")


def _imap_login(imap: IMAPServer, user: str, password: str) -> bool:
    with imaplib.IMAP4("127.0.0.1", imap.port, timeout=30) as client:
        client.starttls(imap.context())
        try:
            client.login(user, password)
        except imaplib.IMAP4.error:
            return False
        client.logout()
        return True


def test_cached_login_follows_a_password_change(
    server_factory: Callable[..., MailServer],
) -> None:
    """Repeated logins with one password all succeed (the check is remembered); after
    `mailsys user passwd` the new password logs in on the first try and the old one is refused,
    though it was remembered."""
    imap = make_imap(server_factory)
    server = imap.mail
    user = "cached@example.test"
    server.add_user(user, "first-password")
    assert all(_imap_login(imap, user, "first-password") for _ in range(5))
    subprocess.run(
        [MAILSYS, "--config", str(server.config_path), "user", "passwd", user,
         "--password-stdin"],
        input=b"second-password\n", check=True, capture_output=True, timeout=60,
    )
    assert _imap_login(imap, user, "second-password")
    # The server's copy of the users file is at least as new as the file now (the login above
    # read it again), so the remembered old password no longer answers.
    assert not _imap_login(imap, user, "first-password")
    assert _imap_login(imap, user, "second-password")
