"""The journey store: events in SQLite, indexed, bounded in time and size, safe across restarts."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

import pytest
from zope.interface.verify import verifyObject

from mailsys.journey import store as store_module
from mailsys.journey.events import (
    MAX_FIELDS,
    MAX_TEXT,
    JourneyEvent,
    MemoryRecorder,
    NullRecorder,
    SessionJourney,
    addresses_of,
    clean_fields,
    new_session_id,
    normalize_message_id,
)
from mailsys.journey.interfaces import IJourneyRecorder
from mailsys.journey.store import JourneyStore, JourneyStoreError, Link

from .journey_support import T0, submission_events


@pytest.fixture
def store(tmp_path: Path) -> JourneyStore:
    s = JourneyStore(tmp_path / "journey.sqlite")
    yield s  # type: ignore[misc]
    s.close()


def test_events_of_a_queue_id_come_back_in_order(store: JourneyStore) -> None:
    """Every event recorded with a queue id is found by it, oldest first, fields intact."""
    store.append(submission_events("Q1"))
    store.append(submission_events("Q2", session="S2", at=T0 + 10))
    kinds = [e.kind for e in store.events_of_queue_id("Q1")]
    assert kinds == ["smtp.data", "spool.commit", "route", "delivery.maildir",
                     "delivery.attempt"]
    commit = store.events_of_queue_id("Q1")[1]
    assert commit.fields["recipients"] == ["alice@example.test"]
    assert commit.at == pytest.approx(T0 + 0.075)
    assert commit.id is not None


def test_message_id_index_ignores_brackets_and_case(store: JourneyStore) -> None:
    """A Message-ID finds its queue ids however the brackets and case were written."""
    store.append(submission_events("Q1", message_id="Abc.1@Client.test"))
    assert store.queue_ids_of_message_id("abc.1@client.test") == ["Q1"]
    assert normalize_message_id(" <Abc.1@Client.test> ") == "Abc.1@Client.test"
    assert store.queue_ids_of_message_id("other@client.test") == []


def test_address_index_covers_senders_recipients_and_users(store: JourneyStore) -> None:
    """Senders, each recipient (refused ones too) and users are indexed, case-insensitively,
    where they enter the journey: before queueing, and at the spool commit."""
    store.append(submission_events("Q1"))
    refused = store.events_of_address("NOBODY@example.test")
    assert [e.kind for e in refused] == ["smtp.rcpt"]
    assert refused[0].queue_id is None and refused[0].session == "S1"
    alice = {e.kind for e in store.events_of_address("<alice@example.test>")}
    assert alice == {"smtp.rcpt", "spool.commit"}
    demo = {e.kind for e in store.events_of_address("demo@example.test")}
    assert demo == {"smtp.auth", "smtp.mail", "spool.commit"}


def test_later_events_of_a_message_add_no_address_rows(store: JourneyStore) -> None:
    """Deliveries repeat addresses the commit indexed already: they cost no index rows."""
    store.append([JourneyEvent(T0, "delivery.maildir", "Q1", None, None,
                               {"recipient": "alice@example.test"}),
                  JourneyEvent(T0, "dsn.created", "B1", None, None,
                               {"parent": "Q1", "sender": "carol@example.test"})])
    assert store.events_of_address("alice@example.test") == []
    assert [e.kind for e in store.events_of_address("carol@example.test")] == ["dsn.created"]


def test_address_search_is_newest_first_and_honours_since(store: JourneyStore) -> None:
    """An address search lists the newest events first and stops at --since."""
    store.append(submission_events("Q1", at=T0))
    store.append(submission_events("Q2", session="S2", at=T0 + 100))
    found = store.events_of_address("alice@example.test")
    assert found[0].queue_id == "Q2" and found[-1].queue_id is None
    recent = store.events_of_address("alice@example.test", since=T0 + 50)
    assert {e.queue_id for e in recent} == {"Q2", None}
    assert all(e.session in ("S2", None) for e in recent)


def test_session_index(store: JourneyStore) -> None:
    """The events of one session, queued or not, are found by its id."""
    store.append(submission_events("Q1"))
    kinds = [e.kind for e in store.events_of_session("S1")]
    assert kinds[0] == "smtp.connect" and kinds[-1] == "smtp.close"
    assert "spool.commit" not in kinds  # recorded without the session


def test_links_join_a_bounce_to_the_message_it_reports(store: JourneyStore) -> None:
    """A parent field makes a link, found from both ends; a repeated link is stored once."""
    bounce = JourneyEvent(T0 + 5, "dsn.created", "B1", None, None,
                          {"parent": "Q1", "relation": "bounce"})
    store.append([bounce, bounce])
    assert store.links_of("Q1") == [Link("B1", "Q1", "bounce")]
    assert store.links_of("B1") == [Link("B1", "Q1", "bounce")]
    assert store.links_of("Q9") == []


def test_retention_forgets_old_events_and_their_index_rows(store: JourneyStore) -> None:
    """Events older than the retention go, with their address and link rows; newer ones stay."""
    store.retention = 30 * 86400
    store.append(submission_events("OLD", session="S-old", at=T0))
    store.append([JourneyEvent(T0 + 1, "dsn.created", "B-OLD", None, None,
                               {"parent": "OLD", "relation": "bounce"})])
    store.append(submission_events("NEW", session="S-new", at=T0 + 20 * 86400))
    deleted = store.prune(now=T0 + 31 * 86400)
    assert deleted == len(submission_events()) + 1
    assert store.events_of_queue_id("OLD") == []
    assert store.links_of("OLD") == []
    assert {e.queue_id for e in store.events_of_address("alice@example.test")} == {"NEW", None}
    assert all(e.session == "S-new" for e in store.events_of_address("nobody@example.test"))
    assert store.prune(now=T0 + 31 * 86400) == 0


def test_size_bound_keeps_the_newest_events(tmp_path: Path) -> None:
    """Past the size bound the oldest events are deleted until the store fits again."""
    bound = 256 * 1024
    store = JourneyStore(tmp_path / "j.sqlite", max_bytes=bound)
    for batch in range(40):
        store.append([JourneyEvent(T0 + batch * 100 + i, "relay.reply", f"Q{batch}-{i}", None,
                                   None, {"host": "mx.b.test", "reply": "x" * 900,
                                          "recipient": f"r{i}@b.test"})
                      for i in range(50)])
    assert store.used_bytes() > bound
    deleted = store.prune(now=T0 + 5000)
    assert deleted > 0
    assert store.used_bytes() <= bound
    assert store.events_of_queue_id("Q39-49"), "the newest event was deleted"
    assert store.events_of_queue_id("Q0-0") == []
    assert store.count() == 2000 - deleted
    store.close()
    # The pages freed are given back to the file system (incremental vacuum).
    assert (tmp_path / "j.sqlite").stat().st_size <= bound * 1.5


def test_retention_finds_the_cut_by_id_without_a_time_index(store: JourneyStore) -> None:
    """The last event before a time is found by searching ids, with gaps left by deletes."""
    store.append([JourneyEvent(T0 + n, "spool.commit", f"Q{n}") for n in range(100)])
    store._delete_up_to(10)
    for n in (11, 37, 64, 98):  # ids are n + 1
        assert store._last_id_before(T0 + n + 0.5) == n + 1
    assert store._last_id_before(T0) is None
    assert store._last_id_before(T0 + 1000) == 100
    assert store.recent_queue_ids(since=T0 + 97.5, limit=5) == ["Q99", "Q98"]


def test_events_survive_a_restart(tmp_path: Path) -> None:
    """What one store wrote, a new one on the same file reads (the server restarted)."""
    path = tmp_path / "journey.sqlite"
    first = JourneyStore(path)
    first.append(submission_events("Q1"))
    first.close()
    second = JourneyStore(path)
    second.append(submission_events("Q2", session="S2"))
    assert len(second.events_of_queue_id("Q1")) == 5
    assert len(second.events_of_queue_id("Q2")) == 5
    second.close()
    reader = JourneyStore(path, readonly=True)
    assert reader.count() == 2 * len(submission_events())
    reader.close()


def test_a_readonly_store_that_does_not_exist_is_one_clear_error(tmp_path: Path) -> None:
    """Opening a missing store to read says so, and creates nothing."""
    with pytest.raises(JourneyStoreError, match="no journey store here"):
        JourneyStore(tmp_path / "missing.sqlite", readonly=True)
    assert not (tmp_path / "missing.sqlite").exists()


def test_a_readonly_store_refuses_writes(tmp_path: Path) -> None:
    """A reader (mailsys trace) cannot change the store."""
    JourneyStore(tmp_path / "j.sqlite").close()
    reader = JourneyStore(tmp_path / "j.sqlite", readonly=True)
    with pytest.raises(sqlite3.OperationalError):
        reader.append(submission_events())
    reader.close()


def test_a_store_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    """A schema this code does not know is not written to."""
    db = sqlite3.connect(tmp_path / "j.sqlite")
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(JourneyStoreError, match="newer mailsys"):
        JourneyStore(tmp_path / "j.sqlite")


def test_readers_see_whole_batches_while_the_writer_writes(tmp_path: Path) -> None:
    """A reader in another thread never fails nor sees half a batch while batches commit."""
    path = tmp_path / "j.sqlite"
    writer = JourneyStore(path)
    batch_size = len(submission_events())
    errors: list[BaseException] = []
    seen: list[list[int]] = []
    done = threading.Event()

    def read() -> None:
        reader = JourneyStore(path, readonly=True)
        counts: list[int] = []
        seen.append(counts)
        try:
            while not done.is_set():
                counts.append(reader.count())
                reader.events_of_address("alice@example.test")
        except BaseException as exc:  # reported below, on the test's thread
            errors.append(exc)
        finally:
            reader.close()

    threads = [threading.Thread(target=read) for _ in range(3)]
    for thread in threads:
        thread.start()
    for n in range(100):
        writer.append(submission_events(f"Q{n}", session=f"S{n}", at=T0 + n))
    done.set()
    for thread in threads:
        thread.join(10)
    writer.close()
    assert errors == []
    for counts in seen:
        assert counts and all(count % batch_size == 0 for count in counts)
        assert counts == sorted(counts)


def test_clean_fields_drops_secrets_and_content() -> None:
    """Passwords, SASL exchanges and bodies never pass, whatever an emitter hands over."""
    cleaned = clean_fields({"user": "a@b.test", "password": "hunter2", "sasl_response": "AGE=",
                            "auth_secret": "x", "body": b"Subject: hi", "content": "hi",
                            "passwd": "p", "mechanism": "PLAIN",
                            "nested": {"password": "p", "host": "h"}})
    assert cleaned == {"user": "a@b.test", "mechanism": "PLAIN", "nested": {"host": "h"}}


def test_clean_fields_bounds_sizes_and_types() -> None:
    """Long text is cut, long lists and many fields are bounded, odd types become text."""
    cleaned = clean_fields({"reply": "x" * 5000, "hosts": tuple(range(500)),
                            "when": Path("/x"), "raw": b"\xff" * 10})
    assert len(cleaned["reply"]) == MAX_TEXT
    assert len(cleaned["hosts"]) == 50
    assert cleaned["when"] == "/x"
    assert cleaned["raw"] == "\ufffd" * 10
    many = clean_fields({f"f{i}": i for i in range(100)})
    assert len(many) == MAX_FIELDS + 1 and many["truncated"] is True


def test_addresses_of_reads_the_address_fields() -> None:
    """Only address fields are indexed, lower-cased, without brackets; the null sender is not."""
    assert addresses_of({"sender": "", "recipient": "<Bob@B.test>", "host": "x@y",
                         "recipients": ["a@b.test", "C@D.test"]}) == {
        "bob@b.test", "a@b.test", "c@d.test"}


@pytest.mark.parametrize("recorder", [NullRecorder(), MemoryRecorder()])
def test_recorders_provide_the_interface(recorder: object) -> None:
    """The no-op and the in-memory recorder are held to IJourneyRecorder."""
    assert verifyObject(IJourneyRecorder, recorder)


def test_memory_recorder_cleans_like_the_store() -> None:
    """The test recorder keeps what the real one would keep, no more."""
    recorder = MemoryRecorder(now=lambda: 7.0)
    recorder.emit("smtp.auth", session="S1", user="a@b.test", password="secret")
    recorder.emit("spool.commit", queue_id="Q1", message_id="<m@x>")
    assert recorder.kinds() == ["smtp.auth", "spool.commit"]
    assert recorder.events[0].fields == {"user": "a@b.test"}
    assert recorder.events[1].message_id == "m@x" and recorder.events[1].at == 7.0


def test_a_session_journey_numbers_its_transactions() -> None:
    """Events of a session carry its id, and those inside a transaction its number."""
    recorder = MemoryRecorder()
    journey = SessionJourney(recorder)
    journey.emit("smtp.connect", client="127.0.0.1")
    assert journey.begin_transaction() == 1
    journey.emit("smtp.mail", sender="a@b.test", reply="250 2.1.0 Ok")
    journey.emit("smtp.data", queue_id="Q1", message_id="<m@x>", size=3, reply="250")
    journey.end_transaction()
    journey.emit("smtp.rset", reply="250")
    assert journey.begin_transaction() == 2
    journey.emit("smtp.mail", sender="a@b.test")
    sessions = {event.session for event in recorder.events}
    assert sessions == {journey.session}
    assert [event.txn for event in recorder.events] == [None, 1, 1, None, 2]
    assert recorder.events[2].queue_id == "Q1" and recorder.events[2].message_id == "m@x"


def test_session_ids_differ_and_recording_can_be_asked() -> None:
    """Each session has its own id; a session knows whether anything records its events."""
    ids = {new_session_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert not SessionJourney(NullRecorder()).recording
    assert SessionJourney(MemoryRecorder()).recording


def test_clean_fields_returns_a_clean_dict_as_it_is_and_still_cleans_repeats() -> None:
    """A shape seen before with plain values costs no copy; a secret is dropped every time."""
    first = {"user": "a@b.test", "size": 3}
    clean_fields(dict(first))
    again = dict(first)
    assert clean_fields(again) is again
    for _ in range(2):
        assert clean_fields({"user": "a@b.test", "password": "pw"}) == {"user": "a@b.test"}
    long_text = {"user": "x" * (MAX_TEXT + 5), "size": 3}
    assert len(clean_fields(long_text)["user"]) == MAX_TEXT


def test_plain_lists_pass_as_they_are_and_unsafe_ones_are_still_cleaned() -> None:
    """Lists of addresses and of plain route dicts cost no copy; secrets and excess inside do."""
    route = {"recipient": "a@b.test", "original": "a@b.test", "target": "local", "mailbox": "m"}
    plain = {"recipients": ["a@b.test"], "routes": [dict(route)], "size": 3}
    assert clean_fields(plain) is plain
    nested_secret = {"recipients": ["a@b.test"], "routes": [{"recipient": "a", "password": "p"}]}
    assert clean_fields(nested_secret)["routes"] == [{"recipient": "a"}]
    long_item = clean_fields({"recipients": ["x" * (MAX_TEXT + 5)]})
    assert len(long_item["recipients"][0]) == MAX_TEXT
    many = clean_fields({"recipients": [f"r{i}@b.test" for i in range(500)]})
    assert len(many["recipients"]) == 50
    deep = clean_fields({"routes": [{"recipient": ["a@b.test"]}], "hosts": [Path("/x"), b"h"]})
    # Below two levels a value becomes text, as before.
    assert deep == {"routes": [{"recipient": "['a@b.test']"}], "hosts": ["/x", "h"]}
    long_in_dict = clean_fields({"routes": [{"recipient": "y" * (MAX_TEXT + 5)}]})
    assert len(long_in_dict["routes"][0]["recipient"]) == MAX_TEXT


def test_the_store_encodes_fields_as_standard_compact_json() -> None:
    """Stored fields are what json.dumps gives, compact and not ASCII-escaped."""
    fields = {"text": "é\"\n<\u2028", "list": [1, 2.5, None, True, {"k": "v"}], "nan": float("inf")}
    assert store_module._DUMPS(fields) == json.dumps(fields, separators=(",", ":"),
                                                     ensure_ascii=False)
    with pytest.raises(TypeError):
        store_module._DUMPS({"odd": object()})
