"""IDLE and the change reports of many sessions on one folder: one shared refresh per change,
each session's own EXPUNGE, EXISTS, RECENT and FETCH lines (RFC 3501 §7, RFC 2177, RFC 7162)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailsys.imap.context import State
from tests.unit.imap_support import USER, Client, Server, filled, selected
from tests.unit.mailbox_support import BatchPool, deliver, message


@pytest.fixture
def pool() -> BatchPool:
    return BatchPool()


@pytest.fixture
def server(tmp_path: Path, pool: BatchPool) -> Server:
    server = Server(tmp_path / "maildirs", allow_plaintext_auth=True)
    server.store.pool = pool  # type: ignore[assignment]
    return server


def idle(client: Client) -> Client:
    assert client.cmd("IDLE") == "+ idling\r\n"
    return client


def lines(client: Client) -> list[str]:
    return client.output().decode().split("\r\n")[:-1]


def delivered(server: Server, pool: BatchPool, number: int) -> list[str]:
    """Deliver message ``number`` and wake the sessions; the disk jobs that took."""
    deliver(server.inbox, message(number))
    pool.held = True
    server.store.notify_delivered(USER)
    return pool.drain()


def test_one_delivery_wakes_every_idle_session_with_one_sync_and_one_claim(
        server: Server, pool: BatchPool) -> None:
    """Three IDLE sessions and a delivery: one folder sync and one \\Recent claim job for all;
    each gets EXISTS, and only the first read-write session sees the message \\Recent."""
    first = idle(filled(server, 1))
    second = idle(selected(server))
    watcher = server.connect()
    watcher.login()
    watcher.ok("EXAMINE INBOX")
    idle(watcher)
    assert delivered(server, pool, 2) == ["work", "recent_from_many"]
    assert lines(first) == ["* 2 EXISTS", "* 2 RECENT"]  # message 1 was its own at SELECT
    assert lines(second) == ["* 2 EXISTS", "* 0 RECENT"]
    assert lines(watcher) == ["* 2 EXISTS", "* 0 RECENT"]
    for client in (first, second, watcher):
        assert client.send(b"DONE\r\n").decode() == f"{client.tag} OK IDLE terminated\r\n"


def test_an_examining_session_leaves_recent_to_the_next(server: Server, pool: BatchPool) -> None:
    """A read-only session woken first sees \\Recent and leaves it for the read-write one."""
    deliver(server.inbox, message(1))
    watcher = server.connect()
    watcher.login()
    watcher.ok("EXAMINE INBOX")
    idle(watcher)
    writer = idle(selected(server))
    delivered(server, pool, 2)
    assert lines(watcher)[1] == "* 2 RECENT" and lines(writer)[1] == "* 2 RECENT"


def test_a_session_out_of_sync_hears_everything_at_its_next_command(
        server: Server, pool: BatchPool) -> None:
    """A session busy elsewhere (not idling) is not woken: at its next command it hears of both
    deliveries at once, while the idling one heard of each as it came."""
    idler = idle(filled(server, 1))
    busy = selected(server)
    delivered(server, pool, 2)
    assert lines(idler) == ["* 2 EXISTS", "* 2 RECENT"]
    delivered(server, pool, 3)
    assert lines(idler) == ["* 3 EXISTS", "* 3 RECENT"]
    out = busy.ok("NOOP")
    assert "* 3 EXISTS\r\n* 0 RECENT\r\n" in out


def test_an_expunge_in_between_comes_before_exists(server: Server, pool: BatchPool) -> None:
    """Another session expunges, then a message arrives: the idling session hears EXPUNGE
    first, so EXISTS never goes down without one (RFC 3501 §7.3.1); the expunging session's
    own change is not reported back to it."""
    idler = idle(filled(server, 2))
    other = selected(server)
    busy = selected(server)
    other.ok("STORE 1 +FLAGS.SILENT (\\Deleted)")
    assert lines(idler) == ["* 1 FETCH (UID 1 FLAGS (\\Deleted \\Recent))"]
    idler.send(b"DONE\r\n")
    idle(idler)
    pool.held = True
    other.cmd("EXPUNGE")  # its disk job waits
    deliver(server.inbox, message(3))
    server.store.notify_delivered(USER)
    pool.drain()
    assert other.output().decode().endswith(f"{other.tag} OK EXPUNGE completed\r\n")
    assert lines(idler) == ["* 1 EXPUNGE", "* 2 EXISTS", "* 2 RECENT"]
    out = busy.ok("NOOP")
    assert out.index("* 1 EXPUNGE") < out.index("* 2 EXISTS")
    assert "EXPUNGE" not in other.ok("NOOP")


def test_a_change_during_a_refresh_is_reported_after_it(server: Server, pool: BatchPool
                                                          ) -> None:
    """A delivery while the idling session's refresh is under way (its sync already read the
    folder) is not lost: the session refreshes again and reports it without waiting for the
    next change."""
    idler = idle(filled(server, 1))
    deliver(server.inbox, message(2))
    pool.held = True
    server.store.notify_delivered(USER)
    assert pool.step() == "work"  # the sync read the folder: message 2 only
    deliver(server.inbox, message(3))
    server.store.notify_delivered(USER)  # while the \Recent claim is pending
    pool.drain()
    assert lines(idler) == ["* 2 EXISTS", "* 2 RECENT", "* 3 EXISTS", "* 3 RECENT"]


def test_a_flag_change_reaches_idle_sessions_with_modseq_under_condstore(
        server: Server, pool: BatchPool) -> None:
    """A flag change by another session: the CONDSTORE session's FETCH carries UID and MODSEQ
    (RFC 7162 §3.1), the other's UID and FLAGS; the same change serves both."""
    plain = idle(filled(server, 1))
    modern = idle(selected(server, enable=("CONDSTORE",)))
    writer = selected(server)
    writer.ok("STORE 1 +FLAGS.SILENT (\\Seen)")
    modseq = int(writer.ok("FETCH 1 (MODSEQ)").split("MODSEQ (")[1].split(")")[0])
    assert lines(plain) == ["* 1 FETCH (UID 1 FLAGS (\\Seen \\Recent))"]
    assert lines(modern) == [f"* 1 FETCH (UID 1 FLAGS (\\Seen) MODSEQ ({modseq}))"]


def test_a_new_keyword_is_announced_before_the_flag_change(server: Server,
                                                           pool: BatchPool) -> None:
    """A keyword another session defined reaches an idling session as a new FLAGS list, then
    the FETCH that uses it."""
    idler = idle(filled(server, 1))
    writer = selected(server)
    writer.ok("STORE 1 +FLAGS.SILENT (Project)")
    out = lines(idler)
    assert out[0].startswith("* FLAGS (") and "Project" in out[0]
    assert out[1] == "* 1 FETCH (UID 1 FLAGS (Project \\Recent))"


def test_a_session_that_left_meanwhile_is_not_written_to(server: Server, pool: BatchPool
                                                         ) -> None:
    """A session that disconnected between the wake-up and the sync is skipped; the others
    still hear of the message."""
    gone = idle(filled(server, 1))
    stays = idle(selected(server))
    deliver(server.inbox, message(2))
    pool.held = True
    server.store.notify_delivered(USER)
    gone.lose()
    pool.drain()
    assert lines(gone) == []
    assert lines(stays)[0] == "* 2 EXISTS"


def test_a_deleted_folder_ends_the_idle_session(server: Server, pool: BatchPool) -> None:
    """The selected folder deleted by another session: the idling one gets BYE and closes."""
    owner = server.connect()
    owner.login()
    owner.ok("CREATE Work")
    idler = server.connect()
    idler.login()
    idler.ok("SELECT Work")
    idle(idler)
    owner.ok("DELETE Work")
    server.store.notify_changed(USER, "Work")
    out = idler.output().decode()
    assert out.startswith("* BYE") and idler.closed
    assert idler.session.state is not State.SELECTED
