"""`mailsys trace`: journeys found by queue id, Message-ID or address, one step per line."""

from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path

import pytest

from mailsys.cli import main
from mailsys.journey.events import JourneyEvent
from mailsys.journey.steps import KINDS, describe, outcome, reply_rule
from mailsys.journey.store import JourneyStore
from mailsys.journey.trace import find_journeys, offset_text, parse_since, safe

from .journey_support import T0, submission_events


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    path = tmp_path / "journey.sqlite"
    store = JourneyStore(path)
    store.append(submission_events("Q1", session="S1", at=T0))
    # A second message of the same session must not leak into Q1's journey.
    store.append([
        JourneyEvent(T0 + 0.1, "smtp.mail", None, None, "S1",
                     {"txn": 2, "sender": "demo@example.test", "reply": "250 2.1.0 Ok"}),
        JourneyEvent(T0 + 0.11, "smtp.rcpt", None, None, "S1",
                     {"txn": 2, "recipient": "carol@example.test", "reply": "250 2.1.5 Ok"}),
        JourneyEvent(T0 + 0.12, "smtp.data", "Q2", "m2@client.test", "S1",
                     {"txn": 2, "size": 100, "reply": "250 2.0.0 Ok: queued as Q2"}),
    ])
    # A transaction refused at every RCPT: never queued.
    store.append([
        JourneyEvent(T0 + 50, "smtp.connect", None, None, "S9",
                     {"client": "192.0.2.1", "listener": "smtp"}),
        JourneyEvent(T0 + 50.1, "smtp.mail", None, None, "S9",
                     {"txn": 1, "sender": "spam@bad.test", "reply": "250 2.1.0 Ok"}),
        JourneyEvent(T0 + 50.2, "smtp.rcpt", None, None, "S9",
                     {"txn": 1, "recipient": "nobody@example.test",
                      "reply": "550 5.1.1 No such user here"}),
    ])
    # A bounce of Q1, read later over IMAP.
    store.append([
        JourneyEvent(T0 + 90, "dsn.created", "B1", "B1.dsn@mail.example.test", None,
                     {"parent": "Q1", "relation": "bounce", "sender": "demo@example.test"}),
        JourneyEvent(T0 + 400, "imap.fetch", "B1", None, "I1",
                     {"user": "demo@example.test", "folder": "INBOX", "uid": 7,
                      "item": "BODY[]"}),
    ])
    store.close()
    return path


def trace(store_path: Path, *args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(["trace", "--store", str(store_path), *args])
    return status, out.getvalue(), err.getvalue()


def step_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.startswith("    ")
            or line.lstrip().startswith("+")]


def test_trace_by_queue_id_shows_the_steps_in_order(store_path: Path) -> None:
    """A queue id shows its session and transaction, queueing and delivery, with offsets."""
    status, out, err = trace(store_path, "Q1")
    assert status == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == "message Q1 <m1@client.test>, started 2027-01-15 08:00:00 UTC"
    steps = step_lines(out)[:12]
    assert steps[0] == ("+0.000s  client 127.0.0.1 (localhost) connected to submission  — "
                        "message submission, RFC 6409 §3.1")
    assert steps[3].startswith("+0.030s  authenticated as demo@example.test with PLAIN")
    assert steps[5] == ("+0.050s  RCPT TO:<nobody@example.test> refused (550 5.1.1 No such "
                        "user here)  — RFC 5321 §4.1.1.3; 5.1.1: address status, RFC 3463 §3.2")
    assert "queued as Q1" in steps[7]
    assert "RFC 5321 §6.1" in steps[8]
    assert steps[9].endswith("local mailbox alice@example.test  — a local domain's mailbox, "
                             "RFC 5321 §2.3.5")
    assert "written to alice@example.test folder INBOX as Q1.abc" in steps[10]
    assert steps[11].startswith("+0.210s  alice@example.test delivered")
    # The session's second transaction belongs to Q2, and the close came after Q1 was queued.
    assert "carol@" not in out and "session closed" not in out


def test_the_routes_of_a_commit_are_steps_of_their_own(tmp_path: Path) -> None:
    """Routing decisions carried by the spool commit show one line per recipient."""
    path = tmp_path / "j.sqlite"
    store = JourneyStore(path)
    store.append([JourneyEvent(T0, "spool.commit", "Q1", None, None, {
        "sender": "demo@example.test", "size": 10, "recipients": ["a@example.test", "b@far.test"],
        "routes": [{"recipient": "a@example.test", "original": "team@example.test",
                    "target": "local", "mailbox": "a@example.test"},
                   {"recipient": "b@far.test", "original": "b@far.test", "target": "relay"}]})])
    store.close()
    _, out, _ = trace(path, "Q1")
    lines = step_lines(out)
    assert lines[0].startswith("+0.000s  queued, 10 bytes")
    assert lines[1] == ("+0.000s  team@example.test expanded to a@example.test: local mailbox "
                        "a@example.test  — aliases and lists, RFC 5321 §3.9")
    assert lines[2].startswith("+0.000s  b@far.test: relay to far.test  — another domain's")
    _, as_json, _ = trace(path, "Q1", "--json")
    steps = json.loads(as_json)["journeys"][0]["steps"]
    assert [s["kind"] for s in steps] == ["spool.commit", "route", "route"]
    assert steps[2]["fields"] == {"recipient": "b@far.test", "original": "b@far.test",
                                  "target": "relay"}


def test_a_bounce_is_linked_both_ways(store_path: Path) -> None:
    """The original names its bounce and is followed by it; the bounce names the original."""
    _, out, _ = trace(store_path, "Q1")
    assert "  bounce B1 was sent about this message" in out
    assert "message B1 <B1.dsn@mail.example.test>" in out
    assert "  bounce of message Q1" in out
    assert "demo@example.test read it over IMAP (BODY[] in INBOX)  — FETCH, RFC 9051 §6.4.5" \
        in out
    _, from_bounce, _ = trace(store_path, "B1")
    assert from_bounce.splitlines()[0].startswith("message B1 ")
    assert "message Q1 <m1@client.test>" in from_bounce


@pytest.mark.parametrize("query", ["m1@client.test", "<m1@client.test>", " <M1@CLIENT.test> "])
def test_trace_by_message_id_with_or_without_brackets(store_path: Path, query: str) -> None:
    """A Message-ID finds its message, with or without angle brackets."""
    status, out, _ = trace(store_path, query)
    assert status == 0 and out.startswith("message Q1 <m1@client.test>")


def test_trace_by_queue_id_in_lower_case(store_path: Path) -> None:
    """Queue ids are upper-case hex; a lower-case copy still finds the message."""
    status, out, _ = trace(store_path, "q2")
    assert status == 0 and out.startswith("message Q2 <m2@client.test>")
    assert "carol@example.test" in out and "nobody@" not in out


def test_trace_by_address_finds_refused_transactions_too(store_path: Path) -> None:
    """An address refused at RCPT shows the transaction that was never queued, newest first."""
    status, out, _ = trace(store_path, "nobody@example.test")
    assert status == 0
    headings = [line for line in out.splitlines() if line and not line.startswith(" ")]
    assert headings[0].startswith("transaction not queued, started")
    assert headings[1].startswith("message Q1 ")
    refused = out.split("\n\n")[0]
    assert "client 192.0.2.1 connected to smtp  — SMTP session opening, RFC 5321 §3.1" in refused
    assert "MAIL FROM:<spam@bad.test> accepted" in refused


def test_trace_by_a_sender_lists_every_message_of_their_sessions(store_path: Path) -> None:
    """The authenticated sender finds each message they sent, and bounces sent to them."""
    _, out, _ = trace(store_path, "demo@example.test")
    headings = [line.split(",")[0] for line in out.splitlines()
                if line and not line.startswith(" ")]
    assert sorted(headings) == ["message B1 <B1.dsn@mail.example.test>",
                                "message Q1 <m1@client.test>", "message Q2 <m2@client.test>"]


def test_limit_says_how_many_journeys_were_left_out(store_path: Path) -> None:
    """With more journeys than --limit, the newest are shown and the rest counted."""
    _, out, _ = trace(store_path, "nobody@example.test", "--limit", "1")
    assert out.count("transaction not queued") == 1 and "message Q1" not in out
    assert out.rstrip().endswith("(1 older journey not shown; narrow with --since or raise "
                                 "--limit)")


def test_since_leaves_out_older_journeys(store_path: Path) -> None:
    """--since shows only journeys active since then; nothing left is exit status 1."""
    when = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(T0 + 40))
    _, out, _ = trace(store_path, "nobody@example.test", "--since", when)
    assert out.startswith("transaction not queued") and "message Q1" not in out
    later = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(T0 + 1000))
    status, out, err = trace(store_path, "Q1", "--since", later)
    assert status == 1 and out == ""
    assert err == "mailsys: no journey of Q1 is recorded in that time\n"


def test_json_has_every_step_with_its_fields(store_path: Path) -> None:
    """--json is one document: journeys, links, and steps with text, rule and fields."""
    status, out, _ = trace(store_path, "Q1", "--json")
    assert status == 0
    document = json.loads(out)
    assert document["query"] == "Q1" and document["left_out"] == 0
    first, bounce = document["journeys"]
    assert first["queue_id"] == "Q1" and first["message_id"] == "m1@client.test"
    assert first["links"] == [{"queue_id": "B1", "parent": "Q1", "relation": "bounce"}]
    kinds = [step["kind"] for step in first["steps"]]
    assert kinds[:3] == ["smtp.connect", "smtp.tls", "smtp.ehlo"]
    rcpt = first["steps"][5]
    assert rcpt["fields"]["recipient"] == "nobody@example.test"
    assert rcpt["rule"].startswith("RFC 5321 §4.1.1.3")
    assert rcpt["offset"] == pytest.approx(0.05)
    assert bounce["queue_id"] == "B1"


def test_control_characters_are_shown_escaped(tmp_path: Path) -> None:
    """A peer's EHLO name or reply cannot send escape sequences to the terminal."""
    path = tmp_path / "j.sqlite"
    store = JourneyStore(path)
    store.append([JourneyEvent(T0, "smtp.ehlo", "Q1", None, None,
                               {"name": "evil\x1b[2J\r\nname\x9b", "reply": "250"})])
    store.close()
    _, out, _ = trace(path, "Q1")
    assert "\x1b" not in out and "\x9b" not in out and "\r" not in out
    assert "evil\\x1b[2J\\x0d\\x0aname\\x9b" in out
    _, as_json, _ = trace(path, "Q1", "--json")
    assert "\x1b" not in as_json
    assert json.loads(as_json)["journeys"][0]["steps"][0]["fields"]["name"].startswith("evil\x1b")


def test_nothing_found_is_one_line_and_status_1(store_path: Path) -> None:
    """An unknown id is reported in one line on stderr with exit status 1."""
    assert trace(store_path, "NOSUCHID") == (1, "", "mailsys: no journey of NOSUCHID is "
                                                    "recorded\n")
    assert trace(store_path, "someone@nowhere.test")[0] == 1


def test_a_missing_store_is_one_line(tmp_path: Path) -> None:
    """Without a store (recording off, or never run), trace says so and creates nothing."""
    status, out, err = trace(tmp_path / "none.sqlite", "Q1")
    assert status == 1 and out == ""
    assert err.startswith("mailsys: ") and "no journey store here" in err
    assert err.count("\n") == 1
    assert not (tmp_path / "none.sqlite").exists()


def test_a_bad_since_is_a_usage_error(store_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--since that is neither a duration nor a date is refused with exit status 2."""
    assert main(["trace", "--store", str(store_path), "Q1", "--since", "yesterday"]) == 2
    assert "expected a duration" in capsys.readouterr().err


def test_find_journeys_orders_linked_messages_after_the_found_one(store_path: Path) -> None:
    """The journey asked for comes first, the messages linked to it after."""
    store = JourneyStore(store_path, readonly=True)
    journeys, left_out = find_journeys(store, "B1")
    store.close()
    assert [j.queue_id for j in journeys] == ["B1", "Q1"] and left_out == 0


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "+0.000s"), (0.0042, "+0.004s"), (12.34, "+12.3s"), (302, "+5m02s"),
    (7380, "+2h03m"), (93600, "+1d02h"), (-1, "+0.000s"),
])
def test_offsets_are_short_and_readable(seconds: float, text: str) -> None:
    """Offsets read +0.004s, +12.3s, +5m02s, +2h03m, +1d02h."""
    assert offset_text(seconds) == text


def test_since_takes_durations_and_dates() -> None:
    """--since 90s/30m/2h/7d counts back from now; a date is local time unless it says."""
    assert parse_since("30m", now=lambda: 10_000.0) == 10_000.0 - 1800
    assert parse_since("7d", now=lambda: 1e6) == 1e6 - 7 * 86400
    assert parse_since("2026-12-07T05:30:00+00:00") == 1796621400.0


def test_every_catalogued_kind_renders_without_its_fields() -> None:
    """An event missing its fields still renders a line; unknown kinds show their fields."""
    for kind in KINDS:
        step = describe(JourneyEvent(T0, kind))
        assert step.text
    unknown = describe(JourneyEvent(T0, "arc.verify", fields={"result": "pass", "txn": 1}))
    assert unknown.text == "arc.verify result=pass" and unknown.rule == ""


def test_an_emitter_rule_wins() -> None:
    """A rule given by the emitter replaces the catalog's."""
    step = describe(JourneyEvent(T0, "relay.connect", fields={
        "host": "mx2.b.test", "preference": 20,
        "rule": "tried mx2.b.test: preference 20 after mx1 refused — RFC 5321 §5.1"}))
    assert step.text == "connected to mx2.b.test (preference 20)"
    assert step.rule.startswith("tried mx2.b.test")


def test_reply_classes_and_enhanced_subjects() -> None:
    """Replies read accepted/refused by their first digit; refusals name their status subject."""
    assert [outcome(r) for r in ("250 Ok", "354 go", "451 later", "550 no", "")] == [
        "accepted", "continue", "refused for now", "refused", "answered"]
    assert reply_rule("X", "554 5.7.1 Relay access denied") == \
        "X; 5.7.1: security or policy status, RFC 3463 §3.8"
    assert reply_rule("X", "250 2.0.0 Ok") == "X"


def test_safe_keeps_tabs_and_text() -> None:
    """Printable text and tabs pass; control characters become escapes."""
    assert safe("a\tb é\x00\x7f") == "a\tb é\\x00\\x7f"
