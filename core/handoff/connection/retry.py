"""Retry policy for transient Redis errors (tenacity), fed into the breaker and health.

Runs in: every process. This is the only retry layer: redis-py's own Retry is disabled
on the connections we build, so the two never multiply.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Awaitable, Callable
from typing import NoReturn, TypeVar

import redis.exceptions as rex
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
)

from handoff.backoff import exponential_s
from handoff.connection.breaker import CircuitBreaker
from handoff.errors import (
    AuthenticationFailed,
    PermissionDenied,
    ReadOnlyServer,
    RedisCommandError,
    RedisUnavailable,
    ServerOutOfMemory,
    TLSVerificationFailed,
)

T = TypeVar("T")

_NOT_RETRIABLE = (rex.AuthenticationError, rex.AuthorizationError, rex.ResponseError)
# A cluster in motion (failover, resharding): the slot map is refreshed and the call
# repeated, which every handoff operation allows (they are idempotent).
_CLUSTER_IN_MOTION = (
    rex.ClusterDownError,
    rex.TryAgainError,
    rex.MovedError,
    rex.AskError,
    rex.SlotNotCoveredError,
    rex.MasterDownError,
)
_RETRIABLE_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT}


_TLS_VERIFY_FAILURES = ("certificate verify failed", "hostname mismatch", "doesn't match")


def is_tls_verification_failure(error: BaseException) -> bool:
    """A certificate the client does not trust: permanent, never a blip to retry."""
    text = str(error)
    return isinstance(error, rex.ConnectionError) and any(m in text for m in _TLS_VERIFY_FAILURES)


def is_retriable(error: BaseException) -> bool:
    """Connection refused/reset, timeouts, broken pipes, closed connections, a cluster
    changing shape; nothing else."""
    if isinstance(error, _CLUSTER_IN_MOTION):
        return True
    if isinstance(error, _NOT_RETRIABLE) or is_tls_verification_failure(error):
        return False
    if isinstance(error, rex.ConnectionError | rex.TimeoutError | socket.timeout):
        return True
    if isinstance(error, BrokenPipeError | ConnectionResetError | ConnectionRefusedError):
        return True
    return isinstance(error, OSError) and error.errno in _RETRIABLE_ERRNOS


def translate(error: BaseException) -> BaseException:
    """A redis-py error as the handoff error agent code catches (the cause is kept by the
    caller's `raise ... from`). Anything else is returned unchanged."""
    text = str(error)
    if is_tls_verification_failure(error):
        return TLSVerificationFailed(f"TLS verification failed (fail closed): {text}")
    if isinstance(error, rex.AuthenticationError | rex.AuthorizationError) or text.startswith(
        ("WRONGPASS", "NOAUTH")
    ):
        # The server's reply never echoes the password: it is safe to show.
        return AuthenticationFailed(f"authentication failed: {text}")
    if isinstance(error, rex.NoPermissionError) or text.startswith("NOPERM"):
        return PermissionDenied(f"permission denied by the server's ACL: {text}")
    if isinstance(error, rex.OutOfMemoryError) or text.startswith("OOM"):
        return ServerOutOfMemory(f"server out of memory, nothing written: {text}")
    if isinstance(error, rex.ReadOnlyError) or text.startswith("READONLY"):
        return ReadOnlyServer(f"server is a read-only replica: {text}")
    if isinstance(error, rex.ResponseError):
        return RedisCommandError(f"server error: {text}")
    return error


def is_connection_failure(error: BaseException | None) -> bool:
    """Errors that say the server (not the request) is the problem: these trip the breaker."""
    return error is not None and is_retriable(error)


def already_recorded(error: BaseException) -> bool:
    """True when RetryPolicy has already fed this failure (or its cause) to on_failure."""
    return is_connection_failure(error) or is_connection_failure(error.__cause__)


class ExponentialBackoff:
    """min_s * 2**(n-1) plus up to min_s of jitter before retry n, capped at max_s.

    Never below min_s nor above max_s, and never shorter than the sleep before (each
    doubling outgrows the jitter). Our own rather than tenacity's wait_exponential_jitter,
    whose arguments changed between the tenacity versions we support.
    """

    def __init__(self, min_s: float, max_s: float) -> None:
        self.min_s = min_s
        self.max_s = max_s

    def __call__(self, state: RetryCallState) -> float:
        return self.sleep_s(state.attempt_number)

    def sleep_s(self, retry_number: int) -> float:
        return exponential_s(retry_number, self.min_s, self.max_s, jitter="add")


class RetryPolicy:
    """Exponential backoff with jitter between min and max, at most max_retries retries."""

    def __init__(
        self,
        max_retries: int,
        min_backoff_ms: float,
        max_backoff_ms: float,
        breaker: CircuitBreaker,
        on_failure: Callable[[BaseException], None],
        on_success: Callable[[], None],
        describe_target: Callable[[], str],
        sleep: Callable[[float], None] | None = None,
        before_probe: Callable[[], None] | None = None,
    ) -> None:
        self.max_retries = max_retries
        # Called before a half-open probe: after a failover the old address (a cluster's
        # slot map, a sentinel pool's primary) is stale, and a probe sent there would fail
        # and hold the breaker open for another cool-down although the server is back.
        self._before_probe = before_probe
        self.breaker = breaker
        self._on_failure = on_failure
        self._on_success = on_success
        self._describe_target = describe_target
        kwargs = {"sleep": sleep} if sleep is not None else {}
        min_s, max_s = min_backoff_ms / 1000.0, max_backoff_ms / 1000.0
        schedule = dict(
            retry=retry_if_exception(is_retriable),
            stop=stop_after_attempt(max_retries + 1),
            wait=ExponentialBackoff(min_s, max_s),
            reraise=True,
            before_sleep=self._record_attempt,
        )
        self._retrying = Retrying(**schedule, **kwargs)
        self._async_retrying = AsyncRetrying(**schedule)  # AsyncClient: asyncio.sleep
        self.backoff_schedule_s: list[float] = []  # the last call's sleeps, for tests/metrics

    def _record_attempt(self, state: RetryCallState) -> None:
        if state.next_action is not None:
            self.backoff_schedule_s.append(state.next_action.sleep)

    def call(self, fn: Callable[[], T], *, retry: bool = True) -> T:
        """Run fn with the breaker and (optionally) the retry budget; translate the final error.

        The first attempt runs outside tenacity so the hot path pays nothing for it;
        only a retriable failure enters the retry loop (which re-raises that first
        failure as its attempt 1, so the backoff schedule is tenacity's, unchanged).
        """
        try:
            return self._attempt(fn)
        except BaseException as e:
            self._raise_unless_retrying(e, retry)
            first_failure: list[BaseException] = [e]

        def attempt() -> T:
            if first_failure:
                raise first_failure.pop()
            return self._attempt(fn)

        self.backoff_schedule_s = []
        try:
            return self._retrying(attempt)
        except BaseException as e:
            self._raise_final(e)

    async def acall(self, fn: Callable[[], Awaitable[T]], *, retry: bool = True) -> T:
        """call() for a coroutine function (AsyncClient): the same breaker, budget and
        errors; the backoff sleeps in the event loop."""
        try:
            return await self._aattempt(fn)
        except BaseException as e:
            self._raise_unless_retrying(e, retry)
            first_failure: list[BaseException] = [e]

        async def attempt() -> T:
            if first_failure:
                raise first_failure.pop()
            return await self._aattempt(fn)

        self.backoff_schedule_s = []
        try:
            return await self._async_retrying(attempt)
        except BaseException as e:
            self._raise_final(e)

    def _raise_unless_retrying(self, error: BaseException, retry: bool) -> None:
        """After a first attempt's failure: raise what the caller gets, unless it is worth
        another attempt (retriable, and retries allowed)."""
        if not is_retriable(error):
            translated = translate(error)
            if translated is error:
                raise error
            raise translated from error
        if not retry or self.max_retries == 0:
            raise self._unavailable(error, attempts=1) from error

    def _raise_final(self, error: BaseException) -> NoReturn:
        if is_retriable(error):
            raise self._unavailable(error, attempts=self.max_retries + 1) from error
        translated = translate(error)
        if translated is error:
            raise error
        raise translated from error

    def _unavailable(self, error: BaseException, attempts: int) -> RedisUnavailable:
        return RedisUnavailable(
            f"Redis unreachable at {self._describe_target()} after {attempts} attempt(s): {error}"
        )

    def _attempt(self, fn: Callable[[], T]) -> T:
        if self.breaker.before_call() and self._before_probe is not None:
            self._before_probe()
        try:
            result = fn()
        except BaseException as e:
            self._failed(e)
            raise
        self.breaker.on_success()
        self._on_success()
        return result

    async def _aattempt(self, fn: Callable[[], Awaitable[T]]) -> T:
        self.breaker.before_call()  # (no probe hook: the asyncio client finds servers itself)
        try:
            result = await fn()
        except BaseException as e:
            self._failed(e)
            raise
        self.breaker.on_success()
        self._on_success()
        return result

    def _failed(self, error: BaseException) -> None:
        if is_connection_failure(error):
            self.breaker.on_failure()
            self._on_failure(error)
        elif isinstance(error, rex.ResponseError):
            self.breaker.on_success()  # the server answered: it is up
        else:
            # Says nothing about the server (a bug in fn, an interrupt): without this a
            # half-open breaker would wait forever for a probe that is no longer running.
            self.breaker.release_probe()
