"""Retries: which errors are transient, the backoff schedule, and retries against real faults.

The unit tests fake the sleep (no Redis needed); the rest go through the fault proxy or a
private server that is stopped and started again.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator

import pytest
import redis
import redis.exceptions as rex
from hypothesis import given
from hypothesis import strategies as st

from handoff.connection import operations as ops
from handoff.connection.breaker import CircuitBreaker
from handoff.connection.retry import ExponentialBackoff, RetryPolicy, is_retriable
from handoff.errors import (
    AuthenticationFailed,
    CircuitOpen,
    PermissionDenied,
    PoolExhausted,
    RedisCommandError,
    RedisUnavailable,
    ServerOutOfMemory,
)
from harness.faultproxy import FaultProxy
from harness.procs import wait_until

QUIET = {"health_check_interval_s": 60.0, "idle_check_freq_s": 60.0, "min_idle_conns": 0}


class Flaky:
    """A call that fails with the given errors, in order, then returns "ok"."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def policy(
    max_retries: int = 3,
    min_ms: float = 8.0,
    max_ms: float = 512.0,
    breaker: CircuitBreaker | None = None,
    events: list | None = None,
) -> tuple[RetryPolicy, list[float]]:
    sleeps: list[float] = []
    events = events if events is not None else []
    retry = RetryPolicy(
        max_retries,
        min_ms,
        max_ms,
        breaker or CircuitBreaker(failure_threshold=1000, cooldown_s=5.0),
        on_failure=lambda e: events.append(("failure", type(e).__name__)),
        on_success=lambda: events.append(("success",)),
        describe_target=lambda: "redis://:***@db.example:6379/0",
        sleep=sleeps.append,
    )
    return retry, sleeps


# -- what is transient ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        rex.ConnectionError("Error 111 connecting"),
        rex.TimeoutError("Timeout reading from socket"),
        rex.BusyLoadingError("LOADING"),
        TimeoutError("timed out"),
        ConnectionResetError(errno.ECONNRESET, "reset"),
        ConnectionRefusedError(errno.ECONNREFUSED, "refused"),
        BrokenPipeError(errno.EPIPE, "broken pipe"),
        OSError(errno.ETIMEDOUT, "timed out"),
    ],
)
def test_connection_level_errors_are_retriable(error):
    assert is_retriable(error)


@pytest.mark.parametrize(
    "error",
    [
        rex.AuthenticationError("invalid username-password pair"),
        rex.AuthorizationError("NOPERM"),
        rex.ResponseError("WRONGTYPE"),
        rex.NoScriptError("NOSCRIPT"),
        rex.DataError("bad value"),
        PoolExhausted("no free Redis connection"),
        CircuitOpen("open"),
        OSError(errno.ENOENT, "no such file"),
        ValueError("a bug"),
        KeyboardInterrupt(),
    ],
)
def test_everything_else_is_not_retriable(error):
    assert not is_retriable(error)


# -- the schedule -----------------------------------------------------------------------------


def test_transient_failures_are_retried_until_success_with_growing_sleeps():
    events: list = []
    retry, sleeps = policy(max_retries=3, events=events)
    flaky = Flaky(rex.ConnectionError("reset"), rex.ConnectionError("reset"))

    assert retry.call(flaky) == "ok"

    assert flaky.calls == 3
    assert len(sleeps) == 2 and retry.backoff_schedule_s == sleeps
    assert 0.008 <= sleeps[0] <= 0.016 and 0.016 <= sleeps[1] <= 0.024
    assert events == [("failure", "ConnectionError"), ("failure", "ConnectionError"), ("success",)]


def test_the_budget_is_max_retries_then_a_clear_error_keeping_the_cause():
    retry, sleeps = policy(max_retries=3)
    flaky = Flaky(*[rex.ConnectionError("Error 111 connecting") for _ in range(10)])

    with pytest.raises(RedisUnavailable) as info:
        retry.call(flaky)

    assert flaky.calls == 4
    assert len(sleeps) == 3
    assert str(info.value) == (
        "Redis unreachable at redis://:***@db.example:6379/0 after 4 attempt(s): "
        "Error 111 connecting"
    )
    assert isinstance(info.value.__cause__, rex.ConnectionError)


@pytest.mark.parametrize(
    ("error", "surfaces_as"),
    [
        (rex.ResponseError("WRONGTYPE Operation"), RedisCommandError),
        (rex.NoPermissionError("NOPERM no permissions"), PermissionDenied),
        (rex.OutOfMemoryError("OOM command not allowed"), ServerOutOfMemory),
        (rex.AuthenticationError("invalid username-password pair"), AuthenticationFailed),
        (ValueError("bug"), ValueError),
    ],
)
def test_a_non_transient_error_surfaces_at_once_translated_with_its_cause(error, surfaces_as):
    retry, sleeps = policy()
    flaky = Flaky(error)

    with pytest.raises(surfaces_as) as info:
        retry.call(flaky)

    assert info.value is error or info.value.__cause__ is error
    assert (flaky.calls, sleeps) == (1, [])


@pytest.mark.parametrize(("max_retries", "retry_flag"), [(0, True), (3, False)])
def test_without_a_retry_budget_one_attempt_is_made(max_retries, retry_flag):
    retry, sleeps = policy(max_retries=max_retries)
    flaky = Flaky(rex.ConnectionError("down"), rex.ConnectionError("down"))

    with pytest.raises(RedisUnavailable, match=r"after 1 attempt\(s\)"):
        retry.call(flaky, retry=retry_flag)

    assert (flaky.calls, sleeps) == (1, [])


def test_sleeps_are_capped_at_the_maximum():
    retry, sleeps = policy(max_retries=10, min_ms=8, max_ms=64)

    with pytest.raises(RedisUnavailable):
        retry.call(Flaky(*[rex.ConnectionError("down") for _ in range(20)]))

    assert len(sleeps) == 10
    assert sleeps[3:] == [0.064] * 7  # 8 ms * 2**3 = 64 ms: capped from the fourth on


@given(
    min_ms=st.floats(min_value=0, max_value=1000),
    extra_ms=st.floats(min_value=0, max_value=10_000),
    retries=st.integers(min_value=1, max_value=80),
)
def test_every_sleep_lies_between_min_and_max_and_never_shrinks(min_ms, extra_ms, retries):
    backoff = ExponentialBackoff(min_ms / 1000, (min_ms + extra_ms) / 1000)

    sleeps = [backoff.sleep_s(n) for n in range(1, retries + 1)]

    assert all(backoff.min_s <= s <= backoff.max_s for s in sleeps)
    assert sleeps == sorted(sleeps)


def test_a_breaker_that_opens_mid_retry_stops_the_loop():
    breaker = CircuitBreaker(failure_threshold=2, cooldown_s=60.0)
    retry, _ = policy(max_retries=5, breaker=breaker)
    flaky = Flaky(*[rex.ConnectionError("down") for _ in range(10)])

    with pytest.raises(CircuitOpen):
        retry.call(flaky)

    assert flaky.calls == 2  # the third attempt never reached fn
    assert breaker.state == "open"


# -- against real faults ----------------------------------------------------------------------


MANAGER_DEFAULTS = QUIET


@pytest.fixture
def proxy(redis_tcp_addr) -> Iterator[FaultProxy]:
    with FaultProxy(redis_tcp_addr) as p:
        yield p


FAST = {"max_retries": 3, "min_retry_backoff_ms": 1.0, "max_retry_backoff_ms": 10.0}


@pytest.mark.parametrize("drops", [1, 3])
def test_a_read_whose_reply_is_lost_succeeds_within_the_budget(
    drops, proxy, redis_url, raw_redis, make_manager
):
    manager = make_manager(proxy.url, **FAST)
    raw_redis.set("greeting", "hello")
    assert manager.execute(lambda c: c.get("greeting")) == b"hello"  # connected
    accepted = proxy.connections_accepted

    proxy.reset_after_upstream_reply(drops)
    assert manager.execute(lambda c: c.get("greeting")) == b"hello"

    assert len(manager.retry.backoff_schedule_s) == drops
    assert proxy.connections_accepted == accepted + drops
    assert manager.is_healthy() and manager.get_health().consecutive_failures == 0


def test_one_drop_more_than_the_budget_fails_with_redis_unavailable(proxy, redis_url, make_manager):
    manager = make_manager(proxy.url, **FAST)
    manager.execute(lambda c: c.ping())

    proxy.reset_after_upstream_reply(4)
    with pytest.raises(RedisUnavailable, match=r"after 4 attempt\(s\)"):
        manager.execute(lambda c: c.get("greeting"))

    assert len(manager.retry.backoff_schedule_s) == 3
    assert manager.get_health().consecutive_failures == 4
    assert manager.execute(lambda c: c.get("greeting")) is None  # and then it works again
    assert manager.is_healthy()


def _blpop_client_ids(raw: redis.Redis) -> set[int]:
    name = f"handoff-{os.getpid()}"
    return {int(c["id"]) for c in raw.client_list() if c["name"] == name and c["cmd"] == "blpop"}


def test_a_blocked_read_cut_mid_call_is_retried_and_still_gets_its_item(
    proxy, redis_url, raw_redis, make_manager
):
    manager = make_manager(proxy.url, **FAST)
    result: dict = {}

    def consume() -> None:
        result["item"] = manager.execute(lambda c: c.blpop(["jobs"], timeout=10))

    consumer = threading.Thread(target=consume)
    consumer.start()
    wait_until(lambda: len(_blpop_client_ids(raw_redis)) == 1, 5.0, "the consumer to block")
    (first,) = _blpop_client_ids(raw_redis)

    proxy.reset_all()
    wait_until(
        lambda: (ids := _blpop_client_ids(raw_redis)) and first not in ids,
        5.0,
        "the retry to block on a new connection",
    )
    raw_redis.rpush("jobs", "task-1")
    consumer.join(timeout=5)

    assert result["item"] == (b"jobs", b"task-1")
    assert len(manager.retry.backoff_schedule_s) == 1


def test_with_the_server_stopped_a_call_fails_after_max_retries_on_a_growing_backoff(
    private_server, make_manager
):
    manager = make_manager(
        private_server.url,
        max_retries=3,
        min_retry_backoff_ms=10,
        max_retry_backoff_ms=200,
        breaker_failure_threshold=100,
    )
    ops.set_with_expiry(manager, "k", "v", 60)
    private_server.stop()

    with pytest.raises(RedisUnavailable, match=r"after 4 attempt\(s\).*Connection refused"):
        manager.execute(lambda c: c.get("k"))

    sleeps = manager.retry.backoff_schedule_s
    assert len(sleeps) == 3
    assert all(0.010 <= s <= 0.200 for s in sleeps)
    assert sleeps == sorted(sleeps) and sleeps[-1] > sleeps[0]
    health = manager.get_health()
    assert not health.is_healthy and not manager.is_healthy()
    assert health.consecutive_failures == 4
    assert "ConnectionError" in health.last_error

    private_server.start()
    assert manager.execute(lambda c: c.get("k")) is None  # not persisted: a new, empty server
    health = manager.get_health()
    assert health.is_healthy and health.consecutive_failures == 0


def test_the_half_open_probe_looks_for_the_server_afresh_first():
    """After a failover the known address is stale: the one probe a half-open breaker
    lets through first re-reads the topology (slot map, sentinel primary), once."""
    now = [0.0]
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=5.0, clock=lambda: now[0])
    looked: list[float] = []
    retry = RetryPolicy(
        0, 8.0, 512.0, breaker,
        on_failure=lambda e: None,
        on_success=lambda: None,
        describe_target=lambda: "redis+cluster://n1:6379",
        before_probe=lambda: looked.append(now[0]),
    )  # fmt: skip

    def down():
        raise redis.ConnectionError("Connection refused")

    with pytest.raises(RedisUnavailable):
        retry.call(down)
    with pytest.raises(CircuitOpen):
        retry.call(lambda: "never runs")  # open: fails fast, nothing looked up
    assert looked == []
    now[0] = 5.0
    assert retry.call(lambda: "up") == "up"  # the probe: looked first, then succeeded
    assert retry.call(lambda: "up") == "up"  # closed again: no more looking
    assert looked == [5.0]
