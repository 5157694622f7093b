"""What the journey web page reads from the store: summaries for the list, search with time
bounds, who may see a journey, and the steps recorded after a given event."""

from __future__ import annotations

from pathlib import Path

import pytest

from mailsys.journey.events import JourneyEvent
from mailsys.journey.reading import (
    JourneyReader,
    decoded_header,
    involves,
    journey,
    search,
    steps,
    steps_after,
    summarize,
)
from mailsys.journey.store import JourneyStore
from tests.unit.journey_support import T0, submission_events


@pytest.fixture
def store(tmp_path: Path) -> JourneyStore:
    made = JourneyStore(tmp_path / "journey.sqlite")
    # Q1: demo@ submits to alice@ (delivered locally); Q2, an hour later, the same to bob@.
    made.append(submission_events("Q1", "S1", T0, "m1@client.test"))
    second = [e for e in submission_events("Q2", "S2", T0 + 3600, "m2@client.test")]
    made.append([_to_bob(e) for e in second])
    return made


def _to_bob(event: JourneyEvent) -> JourneyEvent:
    fields = {k: (v.replace("alice", "bob") if isinstance(v, str) else
                  [x.replace("alice", "bob") for x in v] if isinstance(v, list) else v)
              for k, v in event.fields.items()}
    return JourneyEvent(event.at, event.kind, event.queue_id, event.message_id, event.session,
                        fields)


def test_summary_of_a_delivered_message(store: JourneyStore) -> None:
    """The row: queue id, start, Message-ID, sender, recipients, submitter and status."""
    row = summarize("Q1", store.events_of_queue_id("Q1") + store.events_of_session("S1"))
    assert (row.queue_id, row.message_id, row.sender) == ("Q1", "m1@client.test",
                                                          "demo@example.test")
    assert row.recipients == ["alice@example.test"] and row.status == "delivered"
    assert row.submitted_by == "demo@example.test"


def test_subject_encoded_words_are_decoded() -> None:
    """RFC 2047 encoded words in a Subject are shown decoded; broken ones as they came."""
    assert decoded_header("=?utf-8?q?Gr=C3=BC=C3=9Fe?=") == "Grüße"
    assert decoded_header("plain <b>") == "plain <b>"
    assert decoded_header("=?bogus-charset?q?x?=") == "=?bogus-charset?q?x?="


def test_search_by_nothing_address_queue_id_message_id_and_time(store: JourneyStore) -> None:
    """No query lists the newest first; an address, queue id or Message-ID narrows; since and
    until bound the start time."""
    assert [r.queue_id for r in search(store, "", None, None, None)] == ["Q2", "Q1"]
    assert [r.queue_id for r in search(store, "bob@example.test", None, None, None)] == ["Q2"]
    assert [r.queue_id for r in search(store, "Q1", None, None, None)] == ["Q1"]
    assert [r.queue_id for r in search(store, "<m2@client.test>", None, None, None)] == ["Q2"]
    assert [r.queue_id for r in search(store, "", T0 + 1800, None, None)] == ["Q2"]
    assert [r.queue_id for r in search(store, "", None, T0 + 1800, None)] == ["Q1"]
    assert search(store, "nobody@nowhere.test", None, None, None) == []


def test_a_user_sees_only_what_they_sent_or_received(store: JourneyStore) -> None:
    """The submitter and the mailbox owner see a journey; someone else named only as the
    envelope sender or not at all does not."""
    q1 = store.events_of_queue_id("Q1") + store.events_of_session("S1")
    assert involves(q1, "demo@example.test")  # submitted it (AUTH)
    assert involves(q1, "Alice@Example.test")  # its mailbox
    assert not involves(q1, "bob@example.test")
    assert [r.queue_id for r in search(store, "", None, None, "alice@example.test")] == ["Q1"]
    assert [r.queue_id for r in search(store, "Q2", None, None, "alice@example.test")] == []
    assert journey(store, "Q2", "alice@example.test") is None
    assert journey(store, "Q2", "bob@example.test") is not None
    assert journey(store, "Q2", None) is not None  # an administrator
    assert journey(store, "NOPE", None) is None
    assert steps_after(store, "Q2", 0, "alice@example.test") is None


def test_steps_after_an_event_id(store: JourneyStore) -> None:
    """The steps of events stored after a given id, and the new last id, for live updates."""
    found = journey(store, "Q1", None)
    assert found is not None
    lines = steps(found[0])
    assert lines[0].kind == "smtp.connect" and lines[0].offset == 0.0
    assert any(line.rule for line in lines)
    middle = lines[5].event_id
    later = steps_after(store, "Q1", middle, None)
    assert later is not None
    fresh, last = later
    assert [line.event_id for line in fresh] == [x.event_id for x in lines
                                                 if x.event_id > middle]
    assert last == max(x.event_id for x in lines)
    nothing = steps_after(store, "Q1", last, None)
    assert nothing == ([], last)


def test_reader_without_a_store_answers_empty(tmp_path: Path) -> None:
    """Before the first event is written there is no store: the page shows nothing, no error."""
    reader = JourneyReader(tmp_path / "none.sqlite")
    assert reader.call(search, "", None, None, None, empty=[]) == []
    assert not (tmp_path / "none.sqlite").exists()
