"""The task model: ids, scores, and the JSON a task is stored as.

Runs in: producers and workers. The per-task path is one orjson call and a few string
operations; nothing here touches Redis.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson

from handoff.config.checks import check_range
from handoff.errors import InvalidPayload, TaskCancelled
from handoff.protocol.ends import group_ends
from handoff.protocol.keys import check_task_id
from handoff.protocol.task_fields import run_fields, with_extras, wrong_types

EPOCH_MS = 1_735_689_600_000  # 2025-01-01T00:00:00Z: scores stay well inside 2**53
PRIORITY_SHIFT = 2**41  # 69 years of milliseconds per priority step
MIN_PRIORITY, MAX_PRIORITY = -1000, 1000
DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024

_process_tag = ""
_counter = itertools.count()


def _new_process_tag() -> None:
    global _process_tag, _counter
    _process_tag = os.urandom(4).hex()
    _counter = itertools.count()


_new_process_tag()
os.register_at_fork(after_in_child=_new_process_tag)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def new_task_id(agent: str, at_ms: int | None = None) -> str:
    """'<agent>.<12 hex ms><8 hex process tag><6 hex counter>': unique, time-sortable."""
    ms = now_ms() if at_ms is None else at_ms
    return f"{agent}.{ms:012x}{_process_tag}{next(_counter) & 0xFFFFFF:06x}"


def derived_task_id(agent: str, *parts: str) -> str:
    """A deterministic id: the same parts always give the same id (handoff children,
    idempotency keys), so a repeated enqueue is recognised as a duplicate."""
    digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=12).hexdigest()
    return f"{agent}.k{digest}"


def agent_of(task_id: str) -> str:
    """The agent a task id belongs to; raises InvalidPayload for a malformed id."""
    return check_task_id(task_id).partition(".")[0]


def has_non_finite(value: Any) -> bool:
    """True when a NaN or an infinity hides anywhere in a JSON-like value."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(has_non_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return any(has_non_finite(v) for v in value)
    return False


def score_for(priority: int, enqueued_ms: int) -> int:
    """Lower runs first: priority, then FIFO by enqueue time."""
    return priority * PRIORITY_SHIFT + (enqueued_ms - EPOCH_MS)


def check_priority(priority: object) -> int:
    return check_range(
        "priority", priority, MIN_PRIORITY, MAX_PRIORITY, integer=True, error=InvalidPayload
    )


class CancelFlag(threading.Event):
    """A threading.Event that is true once set: `if task.cancelled: ...`."""

    def __bool__(self) -> bool:
        return self.is_set()


_FLAG_LOCK = threading.Lock()
MAX_CHARGE = 10**12  # cost units one charge() may count


@dataclass(slots=True)
class Task:
    """One unit of work for one agent type, as a handler sees it."""

    id: str
    agent: str
    payload: Any
    priority: int = 0
    attempt: int = 1
    max_attempts: int | None = None
    timeout_s: float | None = None
    created_at: int = 0  # ms, unix
    enqueued_at: int = 0  # ms, unix
    not_before: int | None = None  # ms, unix (delayed tasks)
    parent_id: str | None = None
    trace: list[str] = field(default_factory=list)  # ancestor ids, root first
    key: str | None = None  # idempotency key
    deliveries: int = 0
    token: str = ""  # this delivery's lease token
    # Its place in a run (see handoff.runtime.runs): the root's id (None: this is a root),
    # the scope it reports its end to (the run, or the join whose branch it is on) and
    # that branch's index. A join's then-task has join = {"on_dead", "branches": n}.
    run: str | None = None
    scope: str | None = None
    branch: int = 0
    join: dict | None = None
    # Deadlines (ms, unix): a task not started by expires_at ends "expired" instead of
    # running; run_deadline_at bounds every task of its run (children inherit it).
    expires_at: int | None = None
    run_deadline_at: int | None = None
    # The W3C traceparent of the span that made this task (OpenTelemetry, when on): the
    # producer's current span for a root, the creating task's span for a child.
    traceparent: str | None = None
    # Fair sharing (groups.py): its group's turn in the rotation, its group's limits.
    group: str | None = None
    # A then-task's branches' ends are read (one GET) and decoded when its handler first
    # asks for task.branches: a join of 10,000 branches starts its then-task without
    # moving a megabyte first (as BullMQ's getChildrenValues()). Its join's first dead
    # end comes with the claim (on_dead is applied before the handler runs).
    ends_loader: Callable[[], bytes] | None = None
    first_dead: dict | None = None
    _branches: list[list[dict]] | None = None
    _cancel: CancelFlag | None = None  # made on first use (see cancelled)
    _let_go: bool = False  # its worker no longer holds this delivery: it never starts
    charged: float = 0.0  # cost units this delivery charged (charge())
    # Where progress() and emit() go: the worker's event buffer (None: nowhere, as when a
    # handler is called directly); and this delivery's event count.
    emitter: Callable[[Task, str, int, bytes], None] | None = None
    _events_sent: int = 0
    # task.step (steps.py): the worker's store (None: steps run, unremembered), and this
    # delivery's steps, read from Redis on its first step call.
    step_store: Any = None
    step_log: Any = None

    def step(self, name: str, fn: Callable, /, *args: Any, **kwargs: Any) -> Any:
        """fn(*args, **kwargs)'s result, stored the first time this step completes in this
        task; every later delivery of the task (a retry, a redelivery, a rerun) gets the
        stored result without calling fn. `await task.step(...)` for a coroutine fn.
        A handler called directly (no worker) runs its steps plainly, unremembered."""
        if self.step_store is None:
            return fn(*args, **kwargs)
        return self.step_store.run(self, name, fn, args, kwargs)

    # A Wait's then-task (protocol/waits.py): its wait {"event", "on_timeout", "since",
    # "timeout_at"}, and how it woke {"event": data} or {"event": null, "timed_out": true}.
    wait: dict | None = None
    woke: dict | None = None
    # A repeated key (protocol/conflict.py): the generation its children's ids are derived
    # with (a key's tasks share one id, one after the other), and a debounce burst's first
    # enqueue (ms; written last: conflict.lua keeps it across swaps).
    gen: str | None = None
    burst_at: int | None = None
    # Messages (protocol/messages.py): where this delivery has read them up to, and the
    # process's reader (installed by the worker; None: no messages, as in a direct call).
    _msg_after: str = "0-0"
    message_reader: ClassVar[Callable[[Task, float | None], Any] | None] = None

    def receive(self, timeout_s: float | None = None) -> Any:
        """The next message sent to this task (client.send), in order, or None once
        timeout_s passed (None: wait until one comes, or the task is cancelled). Each
        delivery reads them from the first. Blocks in Redis (in a coroutine, use
        `async for m in task.messages()`)."""
        if Task.message_reader is None:
            raise RuntimeError("task.receive() works in a handoff worker")
        return Task.message_reader(self, timeout_s)

    async def messages(self, timeout_s: float | None = None) -> AsyncIterator[Any]:
        """`async for m in task.messages()`: the messages sent to this task, in order;
        ends once none came for timeout_s (None: never ends; break out of it)."""
        import asyncio

        while True:
            got = await asyncio.to_thread(self.receive, 1.0 if timeout_s is None else timeout_s)
            if got is not None:
                yield got
            elif timeout_s is not None or self.cancelled.is_set():
                return

    @property
    def event(self) -> Any:
        """A Wait's then-task: the data its event was signalled with (None if it timed out)."""
        return self.woke.get("event") if self.woke else None

    @property
    def timed_out(self) -> bool:
        """A Wait's then-task: True when it runs because its wait timed out."""
        return bool(self.woke and self.woke.get("timed_out"))

    def emit(self, data: Any) -> None:
        """Send partial output (any JSON value: one chunk of a model's answer, say) to
        whoever streams this task's run (client.stream, handoff watch), in order."""
        self._send("emit", data)

    def progress(self, fraction: float, note: str | None = None) -> None:
        """Say how far along this task is (0.0 to 1.0), with an optional short note."""
        if (
            isinstance(fraction, bool)
            or not isinstance(fraction, int | float)
            or not 0 <= fraction <= 1
        ):
            raise InvalidPayload(f"progress({fraction!r:.40}): a number from 0 to 1")
        if note is not None and (not isinstance(note, str) or len(note) > 1000):
            raise InvalidPayload("progress note: a string of at most 1,000 characters")
        self._send("progress", {"fraction": fraction, "note": note})

    def _send(self, kind: str, data: Any) -> None:
        try:
            blob = orjson.dumps(data)
        except (TypeError, orjson.JSONEncodeError) as e:
            raise InvalidPayload(f"task.{kind}: data is not JSON: {e}") from None
        if self.emitter is not None:
            self._events_sent += 1
            self.emitter(self, kind, self._events_sent, blob)

    def charge(self, units: float) -> None:
        """Count cost units against the agent's cost_limit (say, the tokens a model call
        used). A negative or non-number raises: the task fails with that one line."""
        if (
            isinstance(units, bool)
            or not isinstance(units, int | float)
            or not 0 <= units <= MAX_CHARGE
        ):
            shown = repr(units)[:40]
            raise InvalidPayload(
                f"charge({shown}): units must be a number from 0 to {MAX_CHARGE:,}"
            )
        self.charged += units

    @property
    def cancelled(self) -> CancelFlag:
        """Set once this task is cancelled while it runs (client.cancel): true as a bool,
        and an event a sync handler can wait on (task.cancelled.wait(timeout))."""
        flag = self._cancel
        if flag is None:
            with _FLAG_LOCK:  # the worker's main thread may set it while a handler looks
                if self._cancel is None:
                    self._cancel = CancelFlag()
                flag = self._cancel
        return flag

    @property
    def is_cancelled(self) -> bool:
        """Whether this delivery was cancelled (as bool(task.cancelled), making no flag)."""
        flag = self._cancel
        return flag is not None and flag.is_set()

    def check_cancelled(self) -> None:
        """Raise TaskCancelled if this task was cancelled: a sync handler's checkpoint."""
        if self._cancel is not None and self._cancel.is_set():
            raise TaskCancelled(f"task {self.id} was cancelled")

    @property
    def branches(self) -> list[list[dict]] | None:
        """A join's then-task: one list per branch of its ends, in the order they ended,
        each {"id", "agent", "status", "result"} ("reason" for a dead one); else None.
        The first use reads them from Redis (a blocking call, also in a coroutine)."""
        if self._branches is None and self.join is not None:
            raw = self.ends_loader() if self.ends_loader is not None else b""
            self._branches = group_ends(raw, self.join.get("branches", 0))
        return self._branches

    @property
    def run_id(self) -> str:
        """The id of the task that started this task's run (its own id for a root)."""
        return self.run or self.id

    @property
    def scope_id(self) -> str:
        """Where this task's end is counted: its join's then-task id, or its run's root."""
        return self.scope or self.run or self.id

    def to_json(self) -> bytes:
        """The stored form: immutable after enqueue (attempts and leases live beside it).

        run, scope, branch and expires_at come right after id and agent, in this order:
        the scripts read them there without decoding the payload."""
        record: dict[str, Any] = {"id": self.id, "agent": self.agent}
        if self.run is not None:
            record["run"] = self.run
            record["scope"] = self.scope or self.run
            record["branch"] = self.branch
        if self.expires_at is not None:  # here too for the scripts (a join's then-task)
            record["expires_at"] = self.expires_at
        if self.group is not None:  # last before the payload: read there by fire_then
            record["group"] = self.group
        record.update({
            "payload": self.payload,
            "priority": self.priority,
            "created_at": self.created_at,
            "enqueued_at": self.enqueued_at,
        })  # fmt: skip
        if self.join is not None:
            record["join"] = self.join
        if self.run_deadline_at is not None:
            record["run_deadline_at"] = self.run_deadline_at
        if self.max_attempts is not None:
            record["max_attempts"] = self.max_attempts
        if self.timeout_s is not None:
            record["timeout_s"] = self.timeout_s
        if self.not_before is not None:
            record["not_before"] = self.not_before
        if self.parent_id is not None:
            record["parent_id"] = self.parent_id
            record["trace"] = self.trace
        if self.key is not None:
            record["key"] = self.key
        if self.traceparent is not None:
            record["tp"] = self.traceparent
        if self.gen is not None:
            record["gen"] = self.gen
        if self.burst_at is not None:  # last: conflict.lua reads it at the end (a root)
            record["burst_at"] = self.burst_at
        if self.wait is not None:  # last: the scripts read it at the end (wait_tail)
            record["wait"] = self.wait
        try:
            return orjson.dumps(record)
        except (TypeError, orjson.JSONEncodeError) as e:
            raise InvalidPayload(f"payload is not JSON-serialisable: {e}") from None

    @classmethod
    def from_json(cls, raw: bytes, *, attempt: int = 1, deliveries: int = 0, token: str = ""):
        """Decode a stored task; raises ValueError (with the reason) when it is corrupt.

        Every field a worker relies on is type-checked here, so a record damaged in Redis
        is dead-lettered at claim instead of crashing a worker later. (Per-task hot path:
        one orjson call and one chain of type checks; the reason is worked out only on
        failure.)
        """
        record = orjson.loads(raw)
        if type(record) is not dict:
            raise ValueError("task JSON is not an object")
        try:
            task_id, agent, payload = record["id"], record["agent"], record["payload"]
        except KeyError:
            missing = [name for name in ("id", "agent", "payload") if name not in record]
            raise ValueError(f"task JSON lacks {', '.join(missing)}") from None
        get = record.get
        priority = get("priority", 0)
        created_at = get("created_at", 0)
        enqueued_at = get("enqueued_at", 0)
        max_attempts = get("max_attempts")
        timeout_s = get("timeout_s")
        not_before = get("not_before")
        parent_id = get("parent_id")
        trace = get("trace")
        key = get("key")
        run, scope, branch, join = run_fields(record)
        expires_at, run_deadline_at = get("expires_at"), get("run_deadline_at")
        traceparent, group = get("tp"), get("group")
        if (
            (group is not None and type(group) is not str)
            or (expires_at is not None and type(expires_at) is not int)
            or (run_deadline_at is not None and type(run_deadline_at) is not int)
            or (traceparent is not None and type(traceparent) is not str)
        ):
            raise ValueError(wrong_types(record))
        if (
            type(task_id) is not str
            or type(agent) is not str
            or type(priority) is not int
            or type(created_at) is not int
            or type(enqueued_at) is not int
            or (max_attempts is not None and type(max_attempts) is not int)
            or (timeout_s is not None and type(timeout_s) not in (int, float))
            or (not_before is not None and type(not_before) is not int)
            or (parent_id is not None and type(parent_id) is not str)
            or (key is not None and type(key) is not str)
            or (trace is not None and type(trace) is not list)
        ):
            raise ValueError(wrong_types(record))
        if not trace:
            trace = []
        elif not all(type(step) is str for step in trace):
            raise ValueError("task JSON trace is not a list of task ids")
        return with_extras(cls(
            task_id, agent, payload, priority, attempt, max_attempts, timeout_s, created_at,
            enqueued_at, not_before, parent_id, trace, key, deliveries, token, run, scope,
            branch, join, expires_at, run_deadline_at, traceparent, group,
        ), record)  # fmt: skip

    @property
    def hops(self) -> int:
        return len(self.trace)

    def child_id(self, agent: str, *parts: str) -> str:
        """A task this one makes (a handoff, a join's then, a wait's then): the same id on
        every delivery; a key's later task (its gen) makes ids of its own."""
        if self.gen is None:
            return derived_task_id(agent, self.id, *parts)
        return derived_task_id(agent, self.id, self.gen, *parts)
