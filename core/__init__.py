"""handoff's engine. The public interface (see DESIGN.md):

from core import agent, Handoff, Client
"""

from core.agents import Handoff, agent
from core.client import Client, ResultTimeout, TaskDead
from core.errors import (
    CircuitOpen,
    ConfigError,
    HandoffError,
    InvalidAgentName,
    InvalidPayload,
    NotReplicated,
    RedisUnavailable,
)
from core.task import Task

__all__ = [
    "CircuitOpen",
    "Client",
    "ConfigError",
    "Handoff",
    "HandoffError",
    "InvalidAgentName",
    "InvalidPayload",
    "NotReplicated",
    "RedisUnavailable",
    "ResultTimeout",
    "Task",
    "TaskDead",
    "agent",
]
