"""Login-failure throttling: growing delays, blocking, forgetting, per-address keys."""

from __future__ import annotations

from twisted.internet.task import Clock

from mailsys.auth.throttle import LoginThrottle, address_key


def make(**kwargs: float) -> tuple[LoginThrottle, Clock]:
    clock = Clock()
    return LoginThrottle(clock, **kwargs), clock  # type: ignore[arg-type]


def test_no_failures_no_delay() -> None:
    """An address that never failed waits for nothing and is not blocked."""
    throttle, _ = make()
    assert throttle.delay_for("192.0.2.1") == 0.0
    assert not throttle.blocked("192.0.2.1")


def test_delay_doubles_up_to_the_maximum() -> None:
    """Each failure doubles the delay, up to max_delay."""
    throttle, _ = make(base_delay=1.0, max_delay=5.0)
    delays = []
    for _ in range(5):
        throttle.failed("192.0.2.1")
        delays.append(throttle.delay_for("192.0.2.1"))
    assert delays == [1.0, 2.0, 4.0, 5.0, 5.0]


def test_blocked_after_max_failures_until_window_passes() -> None:
    """After max_failures the address is blocked until the window has passed since the last."""
    throttle, clock = make(max_failures=3, window=100.0)
    for _ in range(3):
        throttle.failed("192.0.2.1")
    assert throttle.blocked("192.0.2.1")
    assert not throttle.blocked("192.0.2.2")
    clock.advance(99)
    assert throttle.blocked("192.0.2.1")
    clock.advance(1)
    assert not throttle.blocked("192.0.2.1")
    assert throttle.delay_for("192.0.2.1") == 0.0


def test_success_forgets_that_users_failures() -> None:
    """A successful login clears the failures made for the same login name (any case)."""
    throttle, _ = make()
    throttle.failed("192.0.2.1", "Alice@Example.test")
    throttle.succeeded("192.0.2.1", "alice@example.test")
    assert throttle.delay_for("192.0.2.1") == 0.0
    assert len(throttle) == 0


def test_one_valid_account_does_not_reset_guesses_at_others() -> None:
    """A guesser alternating a good login with guesses at other users is still blocked."""
    throttle, _ = make(max_failures=3)
    for victim in ("bob@example.test", "carol@example.test", "bob@example.test"):
        throttle.failed("192.0.2.1", victim)
        throttle.succeeded("192.0.2.1", "mallory@example.test")
    assert throttle.blocked("192.0.2.1")
    throttle.failed("192.0.2.2", "")  # malformed credentials: no name, never forgiven
    throttle.succeeded("192.0.2.2", "dave@example.test")
    assert throttle.delay_for("192.0.2.2") == 1.0


def test_ipv6_counted_per_64() -> None:
    """IPv6 addresses of one /64 share a count; IPv4-mapped addresses count as IPv4."""
    assert address_key("2001:db8::1") == address_key("2001:db8::ffff:2") == "2001:db8::/64"
    assert address_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert address_key("not an address") == "not an address"
    throttle, _ = make(max_failures=2)
    throttle.failed("2001:db8::1")
    throttle.failed("2001:db8::2")
    assert throttle.blocked("2001:db8::3")


def test_memory_is_bounded() -> None:
    """At most max_tracked addresses are remembered; the oldest failure is forgotten first."""
    throttle, clock = make(max_tracked=2)
    for host in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
        throttle.failed(host)
        clock.advance(1)
    assert len(throttle) == 2
    assert throttle.delay_for("192.0.2.1") == 0.0
    assert throttle.delay_for("192.0.2.3") > 0
