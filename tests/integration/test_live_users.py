"""Users added with `mailsys user add` while `twistd -n mailsys` runs: known on the first try."""

from __future__ import annotations

import imaplib
import smtplib
from collections.abc import Callable
from email.message import EmailMessage

from tests.integration.conftest import MailServer, wait_for
from tests.integration.test_imap import make_imap

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
