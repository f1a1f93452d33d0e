"""handoff: hand tasks between agents through Redis. The public interface:

    from handoff import agent, Handoff, Join, Wait, Client, AsyncClient

plus Task and the errors a user catches; everything else lives in the layer subpackages.
"""

from handoff.async_client import AsyncClient
from handoff.client import Client
from handoff.errors import (
    CircuitOpen,
    ConfigError,
    HandoffError,
    InvalidAgentName,
    InvalidPayload,
    LeaseLost,
    MessageRefused,
    NotReplicated,
    RateLimited,
    RedisUnavailable,
    ResultTimeout,
    TaskCancelled,
    TaskDead,
    TaskExpired,
)
from handoff.protocol.task import Task
from handoff.runtime.agents import Handoff, Join, agent
from handoff.runtime.schedules import schedule
from handoff.runtime.waits import Wait

__all__ = [
    "AsyncClient",
    "CircuitOpen",
    "Client",
    "ConfigError",
    "Handoff",
    "HandoffError",
    "InvalidAgentName",
    "InvalidPayload",
    "Join",
    "LeaseLost",
    "MessageRefused",
    "NotReplicated",
    "RateLimited",
    "RedisUnavailable",
    "ResultTimeout",
    "Task",
    "TaskCancelled",
    "TaskDead",
    "TaskExpired",
    "Wait",
    "agent",
    "schedule",
]
