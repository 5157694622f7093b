"""The lab's server side: the hurried queue clock and the fault policy, on task.Clock; the DKIM,
fallback-MX and SERVFAIL records of the lab zone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from mailsys import cli, replies
from mailsys.address import parse_mailbox
from mailsys.config import ConfigError, load
from mailsys.lab.clock import (
    ClockFollower,
    ClockSetting,
    HurriedClock,
    read_setting,
    write_setting,
)
from mailsys.lab.faults import (
    GREYLIST_DELAY,
    SLOW_DELAY,
    FaultFollower,
    FaultPolicy,
    read_fault,
    write_fault,
)
from mailsys.lab.plan import make_plan
from mailsys.lab.serving import LabServing, QueueTimeSink
from mailsys.lab.zone import build_zone, dkim_key_path, dkim_records
from mailsys.replies import Reply
from mailsys.routing import Destination
from mailsys.smtp.policy import RecipientRejected, SessionInfo
from mailsys.testing import make_config


class _Now:
    """A disk runner that works at once on the calling thread."""

    def run(self, func: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
        return succeed(func(*args, **kwargs))


def test_clock_setting_formula() -> None:
    """Queue time is real time plus the offset, plus (rate - 1) times the time since the rate."""
    setting = ClockSetting(offset=3600, rate=10, since=1000)
    assert setting.at(1000) == 4600
    assert setting.at(1010) == 1010 + 3600 + 90
    moved = setting.with_rate(1, 1010)
    assert moved.at(1010) == setting.at(1010) and moved.at(1020) == setting.at(1010) + 10
    assert setting.advanced(60).at(1000) == 4660


def test_hurried_clock_runs_a_waiting_call_when_advanced() -> None:
    """A call waiting 30 s of queue time runs at once when the clock is moved 1 minute on,
    and the queue's time is then a minute ahead."""
    real = Clock()
    real.advance(1000)
    clock = HurriedClock(real)
    fired: list[float] = []
    clock.callLater(30, lambda: fired.append(clock.seconds()))
    real.advance(10)
    assert fired == []
    clock.set(ClockSetting(offset=60))
    real.advance(0)
    assert fired == [1070.0]
    assert clock.getDelayedCalls() == []


def test_hurried_clock_rate_shortens_real_waits_and_cancel_holds() -> None:
    """At rate 60 a 1-hour wait takes a real minute; a cancelled call never runs."""
    real = Clock()
    clock = HurriedClock(real, ClockSetting(rate=60, since=0))
    fired: list[str] = []
    clock.callLater(3600, fired.append, "hour")
    cancelled = clock.callLater(1800, fired.append, "cancelled")
    cancelled.cancel()
    assert not cancelled.active()
    real.advance(59)
    assert fired == []
    real.advance(1)
    assert fired == ["hour"]


def test_clock_file_round_trip_and_follower(tmp_path: Path) -> None:
    """The clock file is read back as written; a missing or broken file is the real clock; the
    follower sets the clock from it."""
    path = tmp_path / "clock.json"
    assert read_setting(path) == ClockSetting()
    write_setting(path, ClockSetting(7200, 2, 5))
    assert read_setting(path) == ClockSetting(7200, 2, 5)
    clock = HurriedClock(Clock())
    ClockFollower(clock, path, _Now()).refresh()
    assert clock.setting == ClockSetting(7200, 2, 5)
    path.write_text("{not json")
    assert read_setting(path) == ClockSetting()


class _Inner:
    """The listener's own policy: accepts everyone."""

    requires_tls_before_mail = False
    requires_auth = False

    def check_sender(self, session: SessionInfo, sender: Any) -> Deferred[Reply | None]:
        return succeed(None)

    def check_recipient(self, session: SessionInfo, recipient: Any) -> Deferred[list[Destination]]:
        return succeed([])


SESSION = SessionInfo("mail.beta.test", "127.0.2.2")


def _policy(tmp_path: Path, fault: str, inbound: bool = True) -> tuple[FaultPolicy, Clock]:
    path = tmp_path / "fault.json"
    write_fault(path, fault)
    follower = FaultFollower(path, _Now())
    follower.refresh()
    clock = Clock()
    return FaultPolicy(_Inner(), follower, clock, inbound=inbound), clock


def _result(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the answer is still waiting"
    return out[0]


@pytest.mark.parametrize("fault, reply", [("tempfail", replies.LAB_TEMPFAIL),
                                          ("reject", replies.LAB_REJECT)])
def test_tempfail_and_reject_answer_mail_from(tmp_path: Path, fault: str, reply: Reply) -> None:
    """tempfail answers MAIL with 451 4.3.2, reject with 550 5.7.1, on port 25's listener only."""
    policy, _ = _policy(tmp_path, fault)
    assert _result(policy.check_sender(SESSION, parse_mailbox("a@alpha.test"))) == reply
    other, _ = _policy(tmp_path, fault, inbound=False)
    assert _result(other.check_sender(SESSION, parse_mailbox("a@alpha.test"))) is None


def test_greylist_refuses_the_first_rcpt_and_takes_a_later_retry(tmp_path: Path) -> None:
    """The first RCPT of a (client, recipient) pair gets 451 4.7.1; one after GREYLIST_DELAY
    passes; another client starts afresh."""
    policy, clock = _policy(tmp_path, "greylist")
    bob = parse_mailbox("bob@beta.test")
    first = _result(policy.check_recipient(SESSION, bob))
    assert isinstance(first, Failure) and first.value.reply == replies.LAB_GREYLISTED
    clock.advance(GREYLIST_DELAY)
    assert _result(policy.check_recipient(SESSION, bob)) == []
    other = SessionInfo("mail.beta.test", "127.0.2.4")
    assert isinstance(_result(policy.check_recipient(other, bob)), Failure)


def test_slow_answers_late(tmp_path: Path) -> None:
    """slow holds MAIL and RCPT answers SLOW_DELAY seconds."""
    policy, clock = _policy(tmp_path, "slow")
    answers: list[Any] = []
    policy.check_sender(SESSION, None).addCallback(answers.append)
    clock.advance(SLOW_DELAY - 0.1)
    assert answers == []
    clock.advance(0.1)
    assert answers == [None]


@pytest.mark.parametrize("local, code", [("fail-451", 451), ("FAIL-550", 550), ("fail-554", 554)])
def test_fail_nnn_recipients_answer_their_code(tmp_path: Path, local: str, code: int) -> None:
    """fail-NNN@ is refused with NNN on port 25's listener, whatever the fault; elsewhere it is
    an ordinary address."""
    policy, _ = _policy(tmp_path, "clear")
    failure = _result(policy.check_recipient(SESSION, parse_mailbox(f"{local}@beta.test")))
    assert isinstance(failure, Failure) and isinstance(failure.value, RecipientRejected)
    assert failure.value.reply.code == code
    assert failure.value.reply.enhanced == f"{code // 100}.0.0"
    other, _ = _policy(tmp_path, "clear", inbound=False)
    assert _result(other.check_recipient(SESSION, parse_mailbox(f"{local}@beta.test"))) == []
    assert _result(policy.check_recipient(SESSION, parse_mailbox("fail-250@beta.test"))) == []


def test_fault_file_unknown_or_broken_is_no_fault(tmp_path: Path) -> None:
    """A fault file that is missing, broken or names no known fault means no fault."""
    path = tmp_path / "fault.json"
    assert read_fault(path).name == "clear"
    path.write_text('{"fault": "meteor"}')
    assert read_fault(path).name == "clear"
    path.write_text("{")
    assert read_fault(path).name == "clear"


def test_outside_a_lab_nothing_is_built() -> None:
    """Without [lab] the queue keeps the reactor's clock and the policy is the listener's own."""
    reactor = Clock()
    serving = LabServing(make_config(), reactor, _Now())
    assert serving.queue_clock is reactor
    inner = _Inner()
    assert serving.policy(inner, inbound=True) is inner  # type: ignore[arg-type]


def test_zone_publishes_dkim_keys_kept_across_runs(tmp_path: Path) -> None:
    """Each domain gets a key (mode 0600) once; its record is at lab._domainkey; a second run
    publishes the same key."""
    plan = make_plan(tmp_path, 2, "127.0.9.0/24")
    first = dkim_records(plan)
    assert set(first) == {"alpha.test", "beta.test"}
    assert (dkim_key_path(plan.hosts[0]).stat().st_mode & 0o777) == 0o600
    assert dkim_records(plan) == first
    zone = build_zone(plan, first)
    (text,) = zone["lab._domainkey.alpha.test"]["TXT"]
    assert text.startswith("v=DKIM1; k=rsa; p=")


def test_zone_fallback_mx_and_servfail(tmp_path: Path) -> None:
    """The last of three domains has two MX, the first at the switched-off address; a domain in
    dns-servfail answers SERVFAIL for its names but keeps its PTR."""
    plan = make_plan(tmp_path, 3, "127.0.9.0/24")
    zone = build_zone(plan, servfail=["beta.test"])
    assert zone["gamma.test"]["MX"] == [[10, "mx1.gamma.test"], [20, "mail.gamma.test"]]
    assert zone["mx1.gamma.test"] == {"A": ["127.0.9.254"]}
    assert zone["beta.test"] == {"error": "servfail"}
    assert zone["mail.beta.test"] == {"error": "servfail"}
    assert zone["3.9.0.127.in-addr.arpa"] == {"PTR": ["mail.beta.test"]}
    assert zone["alpha.test"]["MX"] == [[10, "mail.alpha.test"]]


class _Recording:
    def __init__(self) -> None:
        self.times: list[float] = []

    def new_queue_id(self) -> str:
        return "Q1"

    def submit(self, envelope: Any, message: bytes) -> Deferred[None]:
        self.times.append(envelope.received_at)
        return succeed(None)


def test_arrival_times_go_on_the_queue_clock() -> None:
    """After the clock is advanced a day, mail arriving now is stamped with the queue's now (so
    it is not a day old at once); a notice the queue stamped itself is left as it is."""
    real = Clock()
    real.advance(1000)
    clock = HurriedClock(real, ClockSetting(offset=86400))
    inner = _Recording()
    sink = QueueTimeSink(inner, clock)  # type: ignore[arg-type]
    assert sink.new_queue_id() == "Q1"
    sink.submit(type("E", (), {"received_at": 999.0})(), b"")  # type: ignore[arg-type]
    sink.submit(type("E", (), {"received_at": 87400.0})(), b"")  # type: ignore[arg-type]
    assert inner.times == [999.0 + 86400, 87400.0]


@pytest.mark.parametrize("body, message", [
    ('faults = 5\n', "lab.faults: must be a non-empty path string"),
    ('meteor = 1\n', "lab.meteor: unknown key"),
])
def test_lab_section_errors_are_one_line(tmp_path: Path, body: str, message: str) -> None:
    """A bad [lab] value is one line naming the file and the key."""
    path = tmp_path / "mailsys.toml"
    path.write_text("[lab]\n" + body)
    with pytest.raises(ConfigError, match=message) as caught:
        load(path, check_files=False)
    assert str(caught.value).startswith(f"{path}: ") and "\n" not in str(caught.value)


def test_lab_section_names_both_files(tmp_path: Path) -> None:
    """[lab] faults and clock are read as paths; absent, both are None."""
    path = tmp_path / "mailsys.toml"
    path.write_text('[lab]\nfaults = "/srv/lab/alpha.test/fault.json"\n'
                    'clock = "/srv/lab/clock.json"\n')
    lab = load(path, check_files=False).lab
    assert lab.faults == Path("/srv/lab/alpha.test/fault.json")
    assert lab.clock == Path("/srv/lab/clock.json")
    path.write_text("")
    assert load(path, check_files=False).lab.faults is None


def test_up_refuses_a_time_scale_out_of_range(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """`lab up --time-scale 0` is one line naming the option; nothing is started."""
    assert cli.main(["lab", "up", "--time-scale", "0", "--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--time-scale must be 1-3600" in err
    assert not (tmp_path / "lab.json").exists()
