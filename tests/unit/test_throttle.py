"""Login-failure throttling: growing delays, blocking per user and per address, forgetting,
per-address keys."""

from __future__ import annotations

from twisted.internet.task import Clock

from mailsys.auth.throttle import LoginThrottle, address_key

ALICE = "alice@example.test"
BOB = "bob@example.test"


def make(**kwargs: float) -> tuple[LoginThrottle, Clock]:
    clock = Clock()
    return LoginThrottle(clock, **kwargs), clock  # type: ignore[arg-type]


def test_no_failures_no_delay() -> None:
    """An address that never failed waits for nothing and is not blocked."""
    throttle, _ = make()
    assert throttle.delay_for("192.0.2.1", ALICE) == 0.0
    assert not throttle.blocked("192.0.2.1")
    assert not throttle.blocked("192.0.2.1", ALICE)


def test_delay_doubles_up_to_the_maximum() -> None:
    """Each failure of a user at an address doubles that pair's delay, up to max_delay."""
    throttle, _ = make(base_delay=1.0, max_delay=5.0)
    delays = []
    for _ in range(5):
        throttle.failed("192.0.2.1", ALICE)
        delays.append(throttle.delay_for("192.0.2.1", ALICE))
    assert delays == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_user_blocked_after_max_failures_until_window_passes() -> None:
    """After max_failures a user is blocked at that address until the window has passed since
    its last failure; then the block lifts and the delay starts again from nothing."""
    throttle, clock = make(max_failures=3, window=100.0)
    for _ in range(3):
        throttle.failed("192.0.2.1", ALICE)
        clock.advance(10)
    assert throttle.blocked("192.0.2.1", ALICE)
    assert not throttle.blocked("192.0.2.1")  # the address as a whole is not
    assert not throttle.blocked("192.0.2.2", ALICE)  # nor is the user elsewhere
    clock.advance(89)  # 99 s after the last failure
    assert throttle.blocked("192.0.2.1", ALICE)
    clock.advance(1)
    assert not throttle.blocked("192.0.2.1", ALICE)
    assert throttle.delay_for("192.0.2.1", ALICE) == 0.0


def test_spellings_of_one_mailbox_count_as_one_user() -> None:
    """Case and a trailing dot in the domain do not give a guesser fresh tries at a user."""
    throttle, _ = make(max_failures=3)
    for spelling in (ALICE, "Alice@EXAMPLE.test", " alice@example.test. "):
        throttle.failed("192.0.2.1", spelling)
    assert throttle.blocked("192.0.2.1", ALICE)
    assert throttle.blocked("192.0.2.1", "ALICE@example.test.")


def test_one_users_failures_do_not_block_another_user_at_the_address() -> None:
    """User A's failures, up to A's own block, neither block nor slow user B at the same
    address (one NAT address for a whole classroom)."""
    throttle, _ = make(max_failures=3)
    for _ in range(10):
        throttle.failed("192.0.2.1", ALICE)
    assert throttle.blocked("192.0.2.1", ALICE)
    assert not throttle.blocked("192.0.2.1", BOB)
    assert not throttle.blocked("192.0.2.1")
    assert throttle.delay_for("192.0.2.1", BOB) == 0.0
    throttle.failed("192.0.2.1", BOB)
    assert throttle.delay_for("192.0.2.1", BOB) == 1.0  # B's own first failure


def test_many_users_failures_block_the_address() -> None:
    """Failures for many users from one address (password spraying) block that address for
    every user, even ones that never failed, until the window has passed since the last."""
    throttle, clock = make(max_failures=3, max_address_failures=20, window=100.0)
    for n in range(20):
        assert not throttle.blocked("192.0.2.1")
        throttle.failed("192.0.2.1", f"user{n}@example.test")  # one guess each
    assert throttle.blocked("192.0.2.1")
    assert throttle.blocked("192.0.2.1", ALICE)
    assert not throttle.blocked("192.0.2.2", ALICE)
    clock.advance(99)
    assert throttle.blocked("192.0.2.1", ALICE)
    clock.advance(1)
    assert not throttle.blocked("192.0.2.1", ALICE)


def test_address_count_starts_afresh_each_window() -> None:
    """Failures of a busy address below the limit age out with their window, even when some
    keep coming: they do not add up over a whole day."""
    throttle, clock = make(max_address_failures=10, window=100.0)
    for n in range(30):
        throttle.failed("192.0.2.1", f"student{n}@example.test")
        clock.advance(20)  # five failures per window, for ever
        assert not throttle.blocked("192.0.2.1")


def test_unknown_and_known_users_count_alike() -> None:
    """The throttle never asks whether a user exists: any name is counted the same way."""
    throttle, _ = make()
    throttle.failed("192.0.2.1", ALICE)
    throttle.failed("192.0.2.1", "nobody@example.test")
    assert throttle.delay_for("192.0.2.1", ALICE) == throttle.delay_for(
        "192.0.2.1", "nobody@example.test") == 1.0


def test_success_forgets_that_users_failures() -> None:
    """A successful login clears the failures made for the same login name (any case), for
    that pair and in the address's count."""
    throttle, _ = make(max_address_failures=2)
    throttle.failed("192.0.2.1", "Alice@Example.test")
    throttle.succeeded("192.0.2.1", "alice@example.test")
    assert throttle.delay_for("192.0.2.1", ALICE) == 0.0
    assert len(throttle) == 0
    throttle.failed("192.0.2.1", BOB)
    assert not throttle.blocked("192.0.2.1")  # Alice's forgiven failure no longer counts


def test_one_valid_account_does_not_reset_guesses_at_others() -> None:
    """A guesser alternating a good login with guesses at other users is still blocked: each
    victim at that address, and the address once the guesses reach its limit."""
    throttle, _ = make(max_failures=3, max_address_failures=5)
    for victim in (BOB, "carol@example.test", BOB, BOB):
        throttle.failed("192.0.2.1", victim)
        throttle.succeeded("192.0.2.1", "mallory@example.test")
    assert throttle.blocked("192.0.2.1", BOB)
    assert not throttle.blocked("192.0.2.1")
    throttle.failed("192.0.2.1", "dave@example.test")
    throttle.succeeded("192.0.2.1", "mallory@example.test")
    assert throttle.blocked("192.0.2.1")
    throttle.failed("192.0.2.2", "")  # malformed credentials: no name, never forgiven
    throttle.succeeded("192.0.2.2", "dave@example.test")
    assert throttle.delay_for("192.0.2.2", "") == 1.0


def test_ipv6_counted_per_64() -> None:
    """IPv6 addresses of one /64 share a count; IPv4-mapped addresses count as IPv4."""
    assert address_key("2001:db8::1") == address_key("2001:db8::ffff:2") == "2001:db8::/64"
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert address_key("not an address") == "not an address"
    throttle, _ = make(max_failures=2, max_address_failures=4)
    throttle.failed("2001:db8::1", ALICE)
    throttle.failed("2001:db8::2", ALICE)
    assert throttle.blocked("2001:db8::3", ALICE)
    throttle.failed("2001:db8::4", BOB)
    throttle.failed("::ffff:192.0.2.7", BOB)  # another address: not counted with the /64
    throttle.failed("2001:db8::5", "carol@example.test")
    assert throttle.blocked("2001:db8::6")


def test_memory_is_bounded() -> None:
    """At most max_tracked pairs and addresses are remembered; the oldest failure is forgotten
    first."""
    throttle, clock = make(max_tracked=2)
    for host in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
        throttle.failed(host)
        clock.advance(1)
    assert len(throttle) == 2
    assert throttle.delay_for("192.0.2.1") == 0.0
    assert throttle.delay_for("192.0.2.3") > 0
