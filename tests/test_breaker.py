"""The circuit breaker: its states on a fake clock, then against a real server that goes away.

Unit tests drive the clock by hand (no Redis, no waiting); the server tests put the fault
proxy in front of a private server to prove an open breaker sends nothing to the network.
"""

from __future__ import annotations

import time

import pytest
import redis.exceptions as rex

from handoff.connection import operations as ops
from handoff.connection.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from handoff.connection.retry import RetryPolicy
from handoff.errors import CircuitOpen, RedisCommandError, RedisUnavailable
from harness.faultproxy import FaultProxy
from harness.procs import wait_until


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def fail_times(breaker: CircuitBreaker, n: int) -> None:
    for _ in range(n):
        breaker.before_call()
        breaker.on_failure()


# -- states on a fake clock -------------------------------------------------------------------


def test_it_opens_after_threshold_consecutive_failures(clock):
    breaker = CircuitBreaker(failure_threshold=3, cooldown_s=5.0, clock=clock)

    fail_times(breaker, 2)
    assert breaker.state == CLOSED
    fail_times(breaker, 1)

    assert breaker.state == OPEN
    assert breaker.times_opened == 1
    with pytest.raises(CircuitOpen, match=r"next probe in 5\.0s"):
        breaker.before_call()


def test_a_success_resets_the_count_of_consecutive_failures(clock):
    breaker = CircuitBreaker(failure_threshold=3, cooldown_s=5.0, clock=clock)

    fail_times(breaker, 2)
    breaker.before_call()
    breaker.on_success()
    fail_times(breaker, 2)

    assert breaker.state == CLOSED


def test_after_the_cooldown_exactly_one_probe_is_let_through(clock):
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=5.0, clock=clock)
    fail_times(breaker, 1)

    clock.advance(4.9)
    with pytest.raises(CircuitOpen, match=r"next probe in 0\.1s"):
        breaker.before_call()
    clock.advance(0.1)
    assert breaker.state == HALF_OPEN
    breaker.before_call()  # the probe

    with pytest.raises(CircuitOpen, match="a probe is in flight"):
        breaker.before_call()


def test_a_successful_probe_closes_it(clock):
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=5.0, clock=clock)
    fail_times(breaker, 1)
    clock.advance(5.0)

    breaker.before_call()
    breaker.on_success()

    assert breaker.state == CLOSED
    breaker.before_call()
    breaker.before_call()  # no probe limit once closed


def test_a_failed_probe_opens_it_for_another_full_cooldown(clock):
    breaker = CircuitBreaker(failure_threshold=3, cooldown_s=5.0, clock=clock)
    fail_times(breaker, 3)
    clock.advance(5.0)

    fail_times(breaker, 1)  # one failure is enough when half-open

    assert breaker.state == OPEN
    assert breaker.times_opened == 2
    clock.advance(4.9)
    with pytest.raises(CircuitOpen):
        breaker.before_call()


def test_a_probe_that_ends_without_a_verdict_lets_the_next_call_probe(clock):
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=5.0, clock=clock)
    fail_times(breaker, 1)
    clock.advance(5.0)
    breaker.before_call()

    breaker.release_probe()

    breaker.before_call()  # not "a probe is in flight" forever
    breaker.on_success()
    assert breaker.state == CLOSED


# -- through the retry policy -----------------------------------------------------------------


def policy(breaker: CircuitBreaker) -> RetryPolicy:
    no_op = lambda *_: None  # noqa: E731
    return RetryPolicy(0, 1.0, 1.0, breaker, no_op, no_op, lambda: "redis://x", sleep=no_op)


def open_then_cool(clock: FakeClock) -> CircuitBreaker:
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=5.0, clock=clock)
    with pytest.raises(RedisUnavailable):
        policy(breaker).call(lambda: (_ for _ in ()).throw(rex.ConnectionError("down")))
    clock.advance(5.0)
    return breaker


def test_a_probe_that_raises_a_bug_does_not_wedge_the_breaker(clock):
    breaker = open_then_cool(clock)
    retry = policy(breaker)

    with pytest.raises(ValueError):
        retry.call(lambda: (_ for _ in ()).throw(ValueError("a bug in the caller")))

    assert retry.call(lambda: "ok") == "ok"
    assert breaker.state == CLOSED


def test_a_probe_answered_with_an_error_reply_closes_the_breaker(clock):
    breaker = open_then_cool(clock)

    with pytest.raises(RedisCommandError):
        policy(breaker).call(lambda: (_ for _ in ()).throw(rex.ResponseError("WRONGTYPE")))

    assert breaker.state == CLOSED  # the server answered: it is up


# -- against a server that goes away ----------------------------------------------------------


MANAGER_DEFAULTS = {"health_check_interval_s": 60.0, "idle_check_freq_s": 60.0}


def test_an_open_breaker_fails_fast_without_touching_the_network_and_recovers(
    private_server, make_manager
):
    with FaultProxy(("127.0.0.1", private_server.port)) as proxy:
        manager = make_manager(
            proxy.url,
            min_idle_conns=0,
            max_retries=1,
            min_retry_backoff_ms=1,
            max_retry_backoff_ms=2,
            breaker_failure_threshold=3,
            breaker_cooldown_s=0.3,
        )
        ops.set_with_expiry(manager, "k", "v", 60)
        private_server.stop()

        with pytest.raises(RedisUnavailable) as first:
            manager.execute(lambda c: c.get("k"))  # failures 1 and 2
        assert not isinstance(first.value, CircuitOpen)
        with pytest.raises(CircuitOpen):
            manager.execute(lambda c: c.get("k"))  # failure 3 opens it; no 4th attempt
        assert manager.breaker.state == OPEN
        assert manager.get_pool_stats()["breaker"] == OPEN
        assert manager.get_health().consecutive_failures == 3

        accepted, sent = proxy.connections_accepted, proxy.bytes_up
        started = time.perf_counter()
        for _ in range(50):
            with pytest.raises(CircuitOpen):
                manager.execute(lambda c: c.get("k"))
        assert time.perf_counter() - started < 1.0  # no dial, no backoff: well under this
        assert (proxy.connections_accepted, proxy.bytes_up) == (accepted, sent)

        private_server.start()
        wait_until(lambda: manager.breaker.state == HALF_OPEN, 5.0, "the cooldown to end")
        assert manager.execute(lambda c: c.set("k", "again")) is True  # the probe

        assert manager.breaker.state == CLOSED
        assert manager.is_healthy() and manager.get_health().consecutive_failures == 0


def test_the_health_checker_alone_notices_the_outage_and_the_recovery(private_server, make_manager):
    manager = make_manager(
        private_server.url,
        min_idle_conns=1,
        health_check_interval_s=0.05,
        breaker_failure_threshold=2,
        breaker_cooldown_s=0.2,
    )
    assert manager.is_healthy()

    private_server.stop()
    wait_until(
        lambda: manager.breaker.state == OPEN and manager.get_health().consecutive_failures >= 3,
        5.0,
        "health pings to fail and open the breaker",
    )
    assert not manager.is_healthy()

    private_server.start()
    wait_until(
        lambda: manager.is_healthy() and manager.breaker.state == CLOSED,
        5.0,
        "a health probe to close the breaker",
    )
    health = manager.get_health()
    assert health.consecutive_failures == 0 and health.last_successful_ping > 0
