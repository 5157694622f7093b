"""mailsys.sendmail: Postfix's flags, -t's recipients, the dot rule and where the config is."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from mailsys.sendmail import (
    EX_USAGE,
    MessageReader,
    SendmailError,
    check_sender,
    config_path,
    extract_recipients,
    parse_args,
    read_header,
)


def test_postfix_flags_are_understood() -> None:
    """-t -i -f -F -v and recipients are read as Postfix reads them; -o options are ignored."""
    options = parse_args(["-t", "-oi", "-oem", "-f", "a@b.test", "-FJane Doe", "-v",
                          "-B", "8BITMIME", "x@y.test", "z@y.test"])
    assert options.extract and options.ignore_dots and options.verbose
    assert options.sender == "a@b.test" and options.full_name == "Jane Doe"
    assert options.recipients == ["x@y.test", "z@y.test"]
    assert parse_args(["-rroot", "-ti"]).sender == "root"
    assert parse_args(["-bs"]).mode == "smtp" and parse_args(["-bp"]).mode == "queue"


def test_unknown_option_is_a_usage_error() -> None:
    """An option Postfix does not have is refused with EX_USAGE, naming it."""
    with pytest.raises(SendmailError) as caught:
        parse_args(["-q"])
    assert caught.value.status == EX_USAGE and "-q" in str(caught.value)


def test_option_without_its_value_is_a_usage_error() -> None:
    """-f at the end of the line, without an address, is a usage error."""
    with pytest.raises(SendmailError, match="requires an argument"):
        parse_args(["-f"])


def test_config_is_found_as_mailsys_finds_it() -> None:
    """--config first, then $MAILSYS_CONFIG, then etc/mailsys.toml."""
    assert config_path(parse_args(["--config", "/a.toml"]), {"MAILSYS_CONFIG": "/b"}) == Path(
        "/a.toml")
    assert config_path(parse_args([]), {"MAILSYS_CONFIG": "/b.toml"}) == Path("/b.toml")
    assert config_path(parse_args([]), {}) == Path("etc/mailsys.toml")


def test_bad_sender_is_refused() -> None:
    """-f with something that is not an address is refused; a login name and <> are fine."""
    check_sender("root")
    check_sender("<>")
    with pytest.raises(SendmailError):
        check_sender("bad address<>")


def test_t_takes_to_cc_and_bcc_and_removes_bcc() -> None:
    """-t: the recipients are To, Cc and Bcc; the Bcc field, folded lines too, is removed."""
    header = [b"To: A <a@x.test>, b@x.test\n", b"Bcc: c@x.test,\n", b"  d@x.test\n",
              b"Cc: e@x.test\n", b"Subject: hi\n", b"\n"]
    found, kept = extract_recipients(header)
    assert found == ["a@x.test", "b@x.test", "e@x.test", "c@x.test", "d@x.test"]
    assert b"".join(kept) == b"To: A <a@x.test>, b@x.test\nCc: e@x.test\nSubject: hi\n\n"


def test_a_lone_dot_ends_input_unless_i() -> None:
    """Without -i a line of a single dot ends the message; with -i it is text."""
    data = b"Subject: s\n\nbefore\n.\nafter\n"
    reader = MessageReader(io.BytesIO(data), ignore_dots=False)
    header = read_header(reader)
    body = b"".join(iter(reader.read_line, b""))
    assert header == [b"Subject: s\n", b"\n"] and body == b"before\n"
    reader = MessageReader(io.BytesIO(data), ignore_dots=True)
    read_header(reader)
    assert b"".join(iter(reader.read_line, b"")) == b"before\n.\nafter\n"
