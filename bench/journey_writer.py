"""The journey writer's own cost: CPU of the writer thread per message, without a server.

Replays the events one local message makes on the intake path (connect, EHLO, MAIL, RCPT,
DATA, spool commit, Maildir write; a local delivery that succeeds is the Maildir writer's step
only), with the shapes and sizes the rooms emit, through the writer's code
(``JourneyWriter._write_pending``: field cleaning, Message-ID normalising, the SQLite
transaction) in batches as the writer thread takes them, and reports the thread's CPU time per
message (``time.thread_time``), median of several rounds. It isolates the part of the recording
cost that ``smtp_intake.py --journey on|off`` measures in the whole server.

    .venv/bin/python -m bench.journey_writer --messages 5000 --rounds 7
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from mailsys.journey.store import JourneyStore
from mailsys.journey.writer import JourneyWriter


class _Reactor:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def seconds(self) -> float:
        self.now += 0.0001
        return self.now

    def callFromThread(self, f: Any, /, *args: Any) -> None:  # noqa: N802 - Twisted's name
        f(*args)


def emit_message(writer: JourneyWriter, number: int) -> None:
    """The events of one message from one SMTP session, as the rooms emit them (seven, as the
    server's log counts for ``smtp_intake.py``'s load: 7001 events for 1000 messages)."""
    session = f"9f3a1c2b{number:x}"
    queue_id = f"4Q{number:010X}"
    message_id = f"<{number}.{number * 7}@bench.test>"
    sender = "sender@bench.test"
    recipient = "demo@example.test"
    emit = writer.emit
    emit("smtp.connect", None, None, session, client="127.0.0.1", listener="smtp")
    emit("smtp.ehlo", None, None, session, command="EHLO", name="bench.test", reply="250")
    emit("smtp.mail", None, None, session, sender=sender, reply="250 2.1.0 Sender OK", txn=1)
    emit("smtp.rcpt", None, None, session, recipient=recipient,
         reply="250 2.1.5 Recipient OK", txn=1)
    emit("smtp.data", queue_id, message_id, session, command="DATA", size=4400,
         reply=f"250 2.0.0 Ok: queued as {queue_id}", txn=1)
    emit("spool.commit", queue_id, sender=sender, size=4400, recipients=[recipient],
         routes=[{"recipient": recipient, "original": recipient, "target": "local",
                  "mailbox": "example.test/demo"}])
    emit("delivery.maildir", queue_id, recipient=recipient, mailbox="example.test/demo",
         folder="INBOX", file=f"1700000000.M{number}P1234Q1.bench.test", written=True)


def one_round(messages: int, per_write: int) -> tuple[float, int]:
    """CPU seconds of this thread to write ``messages`` messages' events; events written."""
    with tempfile.TemporaryDirectory(prefix="journey-bench-") as tmp:
        writer = JourneyWriter(Path(tmp) / "journey.sqlite", _Reactor(), max_pending=10 ** 9)
        store = JourneyStore(writer.path)
        spent = 0.0
        for start in range(0, messages, per_write):
            for number in range(start, min(messages, start + per_write)):
                emit_message(writer, number)
            before = time.thread_time()
            writer._write_pending(store)  # the writer thread's loop body
            spent += time.thread_time() - before
        store.close()
        return spent, writer.written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--per-write", type=int, default=90,
                        help="messages per write: the writer wakes every 0.5 s and takes what "
                             "came, about 90 messages at the intake rate smtp_intake.py sees")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    per_message = []
    for _ in range(args.rounds):
        spent, written = one_round(args.messages, args.per_write)
        per_message.append(spent / args.messages * 1000)
    print(f"events/message {written / args.messages:.0f}; writer CPU ms/message: median "
          f"{statistics.median(per_message):.4f} (rounds: "
          + ", ".join(f"{x:.4f}" for x in per_message) + ")")


if __name__ == "__main__":
    main()
