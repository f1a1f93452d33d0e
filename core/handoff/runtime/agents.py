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

import orjson

from handoff.config.checks import check_range
from handoff.errors import AppLoadError, ConfigError, InvalidPayload
from handoff.protocol.groups import check_group
from handoff.protocol.keys import check_agent
from handoff.protocol.limits import Rate, check_burst, parse_rate
from handoff.protocol.task import check_priority
from handoff.runtime import payload_types as types
from handoff.runtime.payload_types import TypedValue

_REGISTRY: dict[str, AgentSpec] = {}


@dataclass(frozen=True, init=False)
class Handoff:
    """Returned by a handler: hand this payload to another agent type (a child task).

    With key=, the task is shared by key instead, as client.enqueue(agent, payload,
    key=, on_conflict=, debounce_s=, debounce_max_s=) would make it: a root of a run of
    its own, not a child of this run (runtime/keyed.py says why). Its key options are
    checked when the handler returns it (a bad one dead-letters that task, one line)."""

    agent: str
    payload: Any
    priority: int = 0
    expires_in_s: float | None = None  # not started by then: it ends expired
    group: str | None = None  # None: the group of the task that hands off (if any)
    key: str | None = None  # a keyed task: its own run, shared by every handoff of the key
    on_conflict: str = "skip"  # with key: "skip" | "replace" | "debounce" | "cancel_running"
    debounce_s: float | None = None  # on_conflict="debounce": starts this long after the last
    debounce_max_s: float | None = None  # and no later than this after the burst's first

    def __init__(
        self,
        agent: str,
        payload: Any,
        priority: int = 0,
        expires_in_s: float | None = None,
        group: str | None = None,
        key: str | None = None,
        on_conflict: str = "skip",
        debounce_s: float | None = None,
        debounce_max_s: float | None = None,
    ) -> None:
        # Written once, here, into the instance (a frozen dataclass's generated __init__
        # sets each field through object.__setattr__: a third slower per Handoff); the
        # key options only when given (unset, they read as the class defaults).
        fields = self.__dict__
        fields.update(agent=check_agent(agent), payload=payload, priority=priority)
        fields.update(expires_in_s=expires_in_s, group=group)
        if (
            key is not None
            or on_conflict != "skip"
            or debounce_s is not None
            or debounce_max_s is not None
        ):
            fields.update(key=key, on_conflict=on_conflict, debounce_s=debounce_s)
            fields["debounce_max_s"] = debounce_max_s
        check_priority(priority)
        if group is not None:
            check_group(group, "Handoff group")
        if expires_in_s is not None:
            check_range(
                "Handoff expires_in_s", expires_in_s, 0.001, 366 * 86_400.0,
                error=InvalidPayload,
            )  # fmt: skip


ON_DEAD = ("fail", "continue")


@dataclass(frozen=True)
class Join:
    """Returned by a handler: start one branch per Handoff, and once every branch has
    ended, run `then` exactly once with the branches' ends in `task.branches`.

    on_dead="fail": a branch that ended dead dead-letters `then` (it never runs);
    "continue": `then` runs and finds the dead ends listed. Checked when the handler
    returns it (a bad Join fails that task with a one-line reason)."""

    branches: list[Handoff]
    then: Handoff
    on_dead: str = "fail"


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
    payload_type: TypedValue | None = None  # declared with payload= (pydantic)
    result_type: TypedValue | None = None  # declared with result= (pydantic)
    rate: Rate | None = None  # starts per window across every worker (rate="10/s")
    burst: int = 0
    group_rate: Rate | None = None  # each group's starts per window (group_rate="2/s")
    group_concurrency: int = 0  # each group's running tasks at most (0 = no cap)
    cost_limit: Rate | None = None  # cost units (task.charge) per window, all workers

    @property
    def is_async(self) -> bool:
        return inspect.iscoroutinefunction(self.handler)


def describe(spec: AgentSpec) -> dict[str, Any]:
    """What `handoff inspect agents` shows: limits, type names and their JSON Schemas."""
    return {
        "max_concurrent": spec.max_concurrent,
        "global_limit": spec.global_limit,
        "timeout_s": spec.timeout_s,
        "max_attempts": spec.max_attempts,
        "rate": str(spec.rate) if spec.rate else None,
        "burst": spec.burst,
        "group_rate": str(spec.group_rate) if spec.group_rate else None,
        "group_concurrency": spec.group_concurrency,
        "cost_limit": str(spec.cost_limit) if spec.cost_limit else None,
        "async": spec.is_async,
        "payload": spec.payload_type.name if spec.payload_type else None,
        "result": spec.result_type.name if spec.result_type else None,
        "payload_schema": spec.payload_type.schema() if spec.payload_type else None,
        "result_schema": spec.result_type.schema() if spec.result_type else None,
    }


def published_schema(spec: AgentSpec) -> bytes | None:
    """The payload's JSON Schema a worker publishes for its agent type (None: untyped),
    so a producer without the app (`handoff enqueue` with no --app) can check against it."""
    if spec.payload_type is None:
        return None
    return orjson.dumps(spec.payload_type.schema(), option=orjson.OPT_SORT_KEYS)


def registered(name: str) -> AgentSpec | None:
    """The agent's definition when its app is loaded in this process, else None."""
    return _REGISTRY.get(name)


def payload_for(agent: str, payload: Any) -> Any:
    """What a producer stores for `agent` (see payload_types.payload_for)."""
    spec = _REGISTRY.get(agent)
    return types.payload_for(spec.payload_type if spec else None, agent, payload)


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
    payload: Any = None,
    result: Any = None,
    rate: str | None = None,
    burst: int = 0,
    group_rate: str | None = None,
    group_concurrency: int = 0,
    cost_limit: str | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a handler (plain function or coroutine) for an agent type.

    payload= and result= declare types (pydantic models, or anything pydantic's
    TypeAdapter takes): payloads are checked at enqueue and at claim, and the handler
    gets the model in task.payload; a result is checked before the ack.

    rate="10/s" (or "/min", "/h") bounds how many tasks start per window across every
    worker and host, burst= lets that many more start at once; `handoff limits` changes
    it live. A handler raising RateLimited(retry_after_s) pauses the agent type (or, for
    a task enqueued with a group, its group).

    group_rate="2/s" and group_concurrency=3 bound each group's starts and running tasks
    (enqueue(..., group="customer-42")); groups take turns at every claim.

    cost_limit="200000/min" bounds the cost units handlers count with task.charge(units)
    (the tokens a model call used, say): a spent window starts nothing until it refills."""
    check_agent(name)
    parsed_rate, parsed_group_rate, parsed_cost = _parse_limits(
        name, rate, burst, group_rate, cost_limit
    )
    _check_range(name, "group_concurrency", group_concurrency, 0, 1_000_000)
    _check_range(name, "max_concurrent", max_concurrent, 1, 10_000)
    if global_limit is not None:
        _check_range(name, "global_limit", global_limit, 1, 1_000_000)
    if timeout_s is not None:
        _check_range(name, "timeout_s", timeout_s, 0.001, 86_400 * 7)
    _check_range(name, "max_attempts", max_attempts, 1, 1000)
    if lease_s is not None:
        _check_range(name, "lease_s", lease_s, 0.1, 86_400)
    _check_range(name, "retry_delay_s", retry_delay_s, 0, 3600)
    payload_type, result_type = _declared_types(name, payload, result)

    def register(handler: Callable[..., Any]) -> Callable[..., Any]:
        spec = AgentSpec(
            name, handler, max_concurrent, global_limit, timeout_s, max_attempts, lease_s,
            retry_delay_s, payload_type, result_type, parsed_rate, burst, parsed_group_rate,
            group_concurrency, parsed_cost,
        )  # fmt: skip
        _register(spec)
        handler.agent_spec = spec  # type: ignore[attr-defined]
        return handler

    return register


def _parse_limits(
    name: str, rate: str | None, burst: int, group_rate: str | None, cost_limit: str | None
) -> tuple[Rate | None, Rate | None, Rate | None]:
    """The declared rates, parsed; ConfigError (one line, naming the agent) otherwise."""
    try:
        check_burst(burst)
        return tuple(  # type: ignore[return-value]
            parse_rate(text, f"agent {name!r}: {what}") if text is not None else None
            for what, text in (
                ("rate", rate),
                ("group_rate", group_rate),
                ("cost_limit", cost_limit),
            )
        )
    except InvalidPayload as e:
        raise ConfigError(str(e)) from None


def _declared_types(
    name: str, payload: Any, result: Any
) -> tuple[types.TypedValue | None, types.TypedValue | None]:
    if result is not None and types.mentions(result, (Handoff,)):
        raise ConfigError(
            f"agent {name!r}: result= declares the data an agent returns; an agent that "
            "hands off returns Handoff, which is not a result"
        )
    payload_type = types.TypedValue(name, "payload", payload) if payload is not None else None
    result_type = types.TypedValue(name, "result", result) if result is not None else None
    return payload_type, result_type


def _register(spec: AgentSpec) -> None:
    """One definition per agent name (a module imported twice registers the same one)."""
    existing = _REGISTRY.get(spec.name)
    if existing is not None and _qualname(existing.handler) != _qualname(spec.handler):
        raise ConfigError(
            f"agent {spec.name!r} is defined twice: {_qualname(existing.handler)} "
            f"and {_qualname(spec.handler)}"
        )
    _REGISTRY[spec.name] = spec


def _qualname(fn: Callable[..., Any]) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


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


def app_agents(module: str) -> dict[str, AgentSpec]:
    """The agents an app module defines (its handlers live in it or below it), even when
    this process has loaded other apps too; all loaded agents if none live there."""
    specs = load_app(module)
    mine = {n: s for n, s in specs.items() if f"{s.handler.__module__}.".startswith(f"{module}.")}
    return mine or specs


def get_spec(module: str, name: str) -> AgentSpec:
    specs = load_app(module)
    if name not in specs:
        known = ", ".join(sorted(specs)) or "none"
        raise AppLoadError(f"unknown agent {name!r} in app {module!r} (defined: {known})")
    return specs[name]
