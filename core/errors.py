"""The exceptions handoff raises. Agent code catches these, never redis-py's."""

from __future__ import annotations

from config.errors import ConfigError

__all__ = [
    "CircuitOpen",
    "ConfigError",
    "HandoffError",
    "InvalidAgentName",
    "InvalidPayload",
    "PoolExhausted",
    "RedisUnavailable",
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
