"""The exceptions handoff raises. Agent code catches these, never redis-py's."""

from __future__ import annotations

from handoff.config.errors import ConfigError

__all__ = [
    "AuthenticationFailed",
    "CircuitOpen",
    "ConfigError",
    "HandoffError",
    "InvalidAgentName",
    "InvalidPayload",
    "LeaseLost",
    "NotReplicated",
    "PermissionDenied",
    "PoolExhausted",
    "RateLimited",
    "ReadOnlyServer",
    "RedisCommandError",
    "RedisUnavailable",
    "ServerOutOfMemory",
    "TLSVerificationFailed",
    "WrongProcess",
]


class HandoffError(Exception):
    """Base of every handoff error; its message is one line that names what was wrong."""


class RedisUnavailable(HandoffError):
    """Redis could not be reached after the retry budget was spent."""


class CircuitOpen(RedisUnavailable):
    """The circuit breaker is open: calls fail fast until the cool-down ends."""


class PoolExhausted(RedisUnavailable):
    """No free connection within the pool timeout."""


class RateLimited(HandoffError):
    """Raised by a handler when the API it calls says to slow down (a 429): its task goes
    back to its place, not counted as a failure or a delivery, and its agent type starts
    nothing anywhere for retry_after_s."""

    def __init__(self, retry_after_s: float = 1.0) -> None:
        if (
            isinstance(retry_after_s, bool)
            or not isinstance(retry_after_s, int | float)
            or not 0 < retry_after_s <= 86_400
        ):
            raise InvalidPayload(
                f"RateLimited retry_after_s {retry_after_s!r}: a number of seconds, 0 < s <= 86400"
            )
        super().__init__(f"rate limited: retry after {retry_after_s:g}s")
        self.retry_after_s = float(retry_after_s)


class TaskCancelled(HandoffError):
    """The task was cancelled (client.cancel): from client.result, and from
    task.check_cancelled() inside a handler whose task was cancelled while it ran."""


class LeaseLost(HandoffError):
    """This delivery no longer holds its task's lease (it ran past it and another took the
    task): task.step refuses to store its result, and the handler stops."""


class InvalidAgentName(HandoffError, ValueError):
    """An agent name does not match the allowed pattern."""


class InvalidPayload(HandoffError, ValueError):
    """A task payload is not JSON-serialisable, or is too large."""


class WrongProcess(HandoffError):
    """A pool or client built in one process was used in another (after fork)."""


class RedisCommandError(HandoffError):
    """The server refused or failed a command (its reply says why)."""


class PermissionDenied(RedisCommandError):
    """The server's ACL forbids this user the command or the key (NOPERM)."""


class ServerOutOfMemory(RedisCommandError):
    """The server is at maxmemory and refuses writes (OOM): nothing was written."""


class ReadOnlyServer(RedisCommandError):
    """The server is a read-only replica (READONLY), e.g. right after a failover."""


class AuthenticationFailed(HandoffError):
    """The server rejected the username/password (the password is never shown)."""


class TLSVerificationFailed(RedisUnavailable):
    """The server's certificate is not trusted (CA or hostname): the connection is refused."""


class NotReplicated(HandoffError):
    """An enqueue was written but fewer replicas than enqueue_wait_replicas confirmed it."""


class TaskDead(HandoffError):
    """The task was dead-lettered; the message carries the reason."""


class MessageRefused(HandoffError):
    """client.send to a task that is finished or unknown (the message names which)."""


class TaskExpired(HandoffError):
    """The task was not started by its deadline (expires_in_s, or its run's); it never ran."""


class ResultTimeout(HandoffError, TimeoutError):
    """The task did not finish within wait_s."""


class TaskRejected(InvalidPayload):
    """One task of a batch is invalid; nothing of the batch was written."""

    def __init__(self, index: int, detail: str, where: str = "") -> None:
        super().__init__(f"{where}: {detail}" if where else detail)
        self.index = index  # its position in the batch
        self.detail = detail  # what is wrong with it


class AppLoadError(HandoffError):
    """The app module could not be imported: a boot error, not a crash to retry."""


class UnsafeServer(HandoffError):
    """The server is configured in a way that can silently lose tasks."""
