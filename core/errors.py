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
    "NotReplicated",
    "PermissionDenied",
    "PoolExhausted",
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
