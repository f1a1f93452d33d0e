"""Agent definitions: the @agent decorator, Handoff, and loading the app module.

Runs in: every process that imports the app (supervisor before fork: import only,
no Redis; workers after fork).
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from handoff.config.checks import check_range
from handoff.errors import ConfigError, HandoffError
from handoff.protocol.keys import check_agent
from handoff.protocol.task import check_priority

_REGISTRY: dict[str, AgentSpec] = {}


@dataclass(frozen=True)
class Handoff:
    """Returned by a handler: hand this payload to another agent type (a child task)."""

    agent: str
    payload: Any
    priority: int = 0

    def __post_init__(self) -> None:
        check_agent(self.agent)
        check_priority(self.priority)


@dataclass(frozen=True)
class AgentSpec:
    """One agent type's handler and capabilities."""

    name: str
    handler: Callable[..., Any]
    max_concurrent: int = 1
    global_limit: int | None = None
    timeout_s: float | None = None
    max_attempts: int = 3
    lease_s: float | None = None  # None: the settings' lease_s
    retry_delay_s: float = 1.0

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.handler)


def _check_range(name: str, field: str, value: Any, low: float, high: float) -> None:
    check_range(f"agent {name!r}: {field}", value, low, high)


def agent(
    name: str,
    *,
    max_concurrent: int = 1,
    global_limit: int | None = None,
    timeout_s: float | None = None,
    max_attempts: int = 3,
    lease_s: float | None = None,
    retry_delay_s: float = 1.0,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a handler (plain function or coroutine) for an agent type."""
    check_agent(name)
    _check_range(name, "max_concurrent", max_concurrent, 1, 10_000)
    if global_limit is not None:
        _check_range(name, "global_limit", global_limit, 1, 1_000_000)
    if timeout_s is not None:
        _check_range(name, "timeout_s", timeout_s, 0.001, 86_400 * 7)
    _check_range(name, "max_attempts", max_attempts, 1, 1000)
    if lease_s is not None:
        _check_range(name, "lease_s", lease_s, 0.1, 86_400)
    _check_range(name, "retry_delay_s", retry_delay_s, 0, 3600)

    def register(handler: Callable[..., Any]) -> Callable[..., Any]:
        spec = AgentSpec(
            name,
            handler,
            max_concurrent,
            global_limit,
            timeout_s,
            max_attempts,
            lease_s,
            retry_delay_s,
        )
        existing = _REGISTRY.get(name)
        if existing is not None and _qualname(existing.handler) != _qualname(handler):
            raise ConfigError(
                f"agent {name!r} is defined twice: {_qualname(existing.handler)} "
                f"and {_qualname(handler)}"
            )
        _REGISTRY[name] = spec
        handler.agent_spec = spec  # type: ignore[attr-defined]
        return handler

    return register


def _qualname(fn: Callable[..., Any]) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


class AppLoadError(HandoffError):
    """The app module could not be imported: a boot error, not a crash to retry."""


NO_APP = (
    'no app module: pass --app MODULE (or set HANDOFF_APP, or app = "MODULE" in the '
    "config file) naming the module where your @agent functions are defined"
)


def load_app(module: str) -> dict[str, AgentSpec]:
    """Import the app module and return every agent registered so far.

    The current directory is searched too (as `python -m` would), so `--app myagents`
    finds ./myagents.py when run from a console script."""
    if not module:
        raise AppLoadError(NO_APP)
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        importlib.import_module(module)
    except Exception as e:
        raise AppLoadError(f"cannot import app module {module!r}: {type(e).__name__}: {e}") from e
    return dict(_REGISTRY)


def get_spec(module: str, name: str) -> AgentSpec:
    specs = load_app(module)
    if name not in specs:
        known = ", ".join(sorted(specs)) or "none"
        raise AppLoadError(f"unknown agent {name!r} in app {module!r} (defined: {known})")
    return specs[name]
