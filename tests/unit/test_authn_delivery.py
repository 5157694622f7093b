"""What mail authentication leaves on a message's record: the folder of each recipient's copy
(Junk) and the evidence, kept by the envelope and honoured by the Maildir writer."""

from __future__ import annotations

from pathlib import Path

from twisted.internet.task import Clock

from mailsys.delivery.maildir import MaildirWriter
from mailsys.envelope import Envelope, RecipientStatus
from mailsys.mailbox.layout import FOLDER_MARKER
from tests.unit.test_spool import (
    ImmediateDiskPool,
    local_recipient,
    make_envelope,
    result_of,
)

BODY = b"Subject: hello\r\nFrom: bob@sender.test\r\n\r\nHi.\r\n"


def test_junk_copy_lands_in_the_junk_folder(tmp_path: Path) -> None:
    """A recipient marked for Junk gets the copy in its mailbox's .Junk/new, not in INBOX."""
    writer = MaildirWriter(tmp_path / "maildirs", ImmediateDiskPool(), "mx.example.test",  # type: ignore[arg-type]
                           clock=Clock())
    message = tmp_path / "spooled.msg"
    message.write_bytes(BODY)
    envelope = make_envelope("0189ABCDEF012A1B2C3", local_recipient("alice@example.test"))
    envelope.recipients[0].folder = "Junk"
    attempt = result_of(writer.deliver(envelope, envelope.recipients[0], message))
    assert attempt.status is RecipientStatus.DELIVERED
    user = tmp_path / "maildirs" / "example.test" / "alice"
    assert len(list((user / ".Junk" / "new").iterdir())) == 1
    assert (user / ".Junk" / FOLDER_MARKER).exists()  # a Maildir++ folder, as IMAP makes them
    assert not (user / "new").is_dir() or not list((user / "new").iterdir())


def test_bad_folder_is_refused(tmp_path: Path) -> None:
    """A folder name that would leave the mailbox is a failed delivery, not a write outside."""
    writer = MaildirWriter(tmp_path / "maildirs", ImmediateDiskPool(), "mx.example.test",  # type: ignore[arg-type]
                           clock=Clock())
    message = tmp_path / "spooled.msg"
    message.write_bytes(BODY)
    envelope = make_envelope("0189ABCDEF012A1B2C4", local_recipient("alice@example.test"))
    envelope.recipients[0].folder = "../../etc"
    attempt = result_of(writer.deliver(envelope, envelope.recipients[0], message))
    assert attempt.status is RecipientStatus.FAILED


def test_envelope_keeps_folder_and_evidence() -> None:
    """The folder and the authentication evidence survive the envelope's round trip."""
    envelope = make_envelope("0189ABCDEF012A1B2C5", local_recipient("alice@example.test"))
    envelope.recipients[0].folder = "Junk"
    envelope.authentication = {"dmarc": {"result": "fail", "record": "v=DMARC1; p=quarantine"}}
    again = Envelope.from_dict(envelope.to_dict())
    assert again.recipients[0].folder == "Junk"
    assert again.authentication == envelope.authentication
