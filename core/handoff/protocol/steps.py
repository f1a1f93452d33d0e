"""Steps: named, memoized calls inside a handler (task.step).

The first time a step of a given name completes in a task, its JSON result is stored in
the task's steps hash (keys.steps, in the agent's slot); every later delivery of the
same task (a retry, a crash's redelivery, a lost lease, a rerun) gets the stored result
without calling the step's function again. A step that raises stores nothing.

A result is stored only while the storing delivery still holds its lease (step.lua
checks the token): a stale delivery's store raises LeaseLost, which stops its handler,
as a stale ack writes nothing.

Cost: nothing for a task that never calls task.step. The first call of a delivery reads
the task's stored steps (one HGETALL); each step that runs stores its result (one
EVALSHA); a reused step is a dict lookup and a JSON decode.

Runs in: a worker's handler threads (and its asyncio loop, which moves the Redis calls to
a thread); the worker's main thread after an ack (the steps hash takes the record's TTL).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from handoff.config import Settings
from handoff.errors import HandoffError, InvalidPayload, LeaseLost
from handoff.protocol.task import Task, has_non_finite

if TYPE_CHECKING:
    from handoff.protocol.queue import Completion, TaskQueue

log = logging.getLogger(__name__)
MAX_STEP_NAME = 200
STORED, ALREADY, STALE = 1, 2, 0


@dataclass(slots=True)
class StepLog:
    """One delivery's steps: those stored before it (read on its first step call), the
    names it used, and what each did for the run tree: (name, "ran" | "reused", ms)."""

    stored: dict[str, bytes]
    names: set[str] = field(default_factory=set)
    used: list[tuple[str, str, float]] = field(default_factory=list)


class StepStore:
    """Reads and writes the steps of a worker's tasks (one per worker process)."""

    def __init__(self, queue: TaskQueue, settings: Settings) -> None:
        self.queue = queue
        self.max_result_bytes = settings.max_result_bytes
        # As long as a finished task's record (queue.py): its result, or its run's tree.
        keep_s = max(settings.result_ttl_s, settings.run_ttl_s if settings.run_ttl_s > 0 else 0)
        self.record_ttl_ms = int(max(keep_s, 60.0) * 1000)

    def _key(self, task: Task) -> str:
        return self.queue.keys.agent(task.agent).steps(task.id)

    def load(self, task: Task) -> dict[str, bytes]:
        key = self._key(task)
        raw = self.queue.manager.execute(lambda c: c.hgetall(key)) or {}
        return {name.decode(errors="replace"): value for name, value in raw.items()}

    def store(self, task: Task, name: str, record: bytes) -> bytes | None:
        """Store a step's record; returns the record kept (this one, or one stored first).
        Raises LeaseLost when this delivery no longer holds the task's lease."""
        keys = [*self.queue.keys.agent(task.agent).all(), self._key(task)]
        args = [task.id, task.token, name, record, self.record_ttl_ms]
        reply = self.queue.run_scripts([("step", keys, args)])[0]
        if int(reply[0]) == STALE:
            raise LeaseLost(
                f"task {task.id}: step {name!r} not stored, this delivery lost its lease"
            )
        return reply[1] if int(reply[0]) == ALREADY else record

    def run(self, task: Task, name: str, fn: Callable, args: tuple, kwargs: dict) -> Any:
        return run_step(task, name, fn, args, kwargs)

    def acked(self, completions: Sequence[Completion]) -> None:
        """Finished tasks that used steps: their steps hash lives as long as their record
        (one pipeline, only when a task of the batch used a step)."""
        keys = [self._key(c.task) for c in completions if c.task.step_log is not None]
        if not keys:
            return
        ttl_ms = self.record_ttl_ms

        def expire(client) -> None:
            pipe = client.pipeline(transaction=False)
            for key in keys:
                pipe.pexpire(key, ttl_ms)
            pipe.execute()

        try:
            self.queue.manager.execute(expire)
        except HandoffError as e:  # each store set the same TTL already: a little early
            log.debug("steps of %d task(s) keep the TTL of their last store: %s", len(keys), e)


def run_step(task: Task, name: str, fn: Callable, args: tuple, kwargs: dict) -> Any:
    """task.step: fn(*args, **kwargs)'s result, stored the first time, reused after.
    A coroutine function gives an awaitable (`await task.step(...)`)."""
    if inspect.iscoroutinefunction(fn):
        return _run_step_async(task, name, fn, args, kwargs)
    log = task.step_log if task.step_log is not None else _open(task)
    found = _begin(log, name)
    if found is not _MISSING:
        return found
    started = time.perf_counter()
    value = fn(*args, **kwargs)
    record = _record(task, log, name, value, started)
    return _finish(task, log, name, value, record, _store(task, name, record))


async def _run_step_async(task: Task, name: str, fn: Callable, args: tuple, kwargs: dict):
    log = task.step_log
    if log is None:
        log = await asyncio.to_thread(_open, task)
    found = _begin(log, name)
    if found is not _MISSING:
        return found
    started = time.perf_counter()
    value = await fn(*args, **kwargs)
    record = _record(task, log, name, value, started)
    kept = await asyncio.to_thread(_store, task, name, record)
    return _finish(task, log, name, value, record, kept)


_MISSING = object()


def _open(task: Task) -> StepLog:
    """This delivery's first step: read what earlier deliveries stored (one round trip)."""
    store = task.step_store
    log = StepLog(store.load(task) if store is not None else {})
    task.step_log = log
    return log


def _begin(log: StepLog, name: str) -> Any:
    """The stored result of this step, or _MISSING (run it). Checks the name."""
    if not isinstance(name, str) or not 0 < len(name) <= MAX_STEP_NAME:
        raise InvalidPayload(
            f"task.step({name!r:.60}): a name is a string of 1 to {MAX_STEP_NAME} characters"
        )
    if name in log.names:
        raise InvalidPayload(f"task.step({name!r:.60}): this name was already used in this task")
    log.names.add(name)
    raw = log.stored.get(name)
    if raw is None:
        return _MISSING
    try:
        stored = orjson.loads(raw)
        value, ran_ms = stored["result"], stored.get("ms", 0.0)
    except (orjson.JSONDecodeError, TypeError, KeyError):
        return _MISSING  # unreadable (written by hand): run it again; the store keeps it
    log.used.append((name, "reused", ran_ms))
    return value


def _record(task: Task, log: StepLog, name: str, value: Any, started: float) -> bytes:
    """The stored form of a step's result; a result that cannot be stored fails the task."""
    ran_ms = (time.perf_counter() - started) * 1000
    try:
        blob = orjson.dumps(value)
    except (TypeError, orjson.JSONEncodeError) as e:
        raise InvalidPayload(f"task.step({name!r:.60}): result is not JSON: {e}") from None
    if has_non_finite(value):
        raise InvalidPayload(f"task.step({name!r:.60}): result holds NaN or an infinity")
    limit = task.step_store.max_result_bytes if task.step_store is not None else None
    if limit is not None and len(blob) > limit:
        raise InvalidPayload(
            f"task.step({name!r:.60}): result is {len(blob)} bytes, over max_result_bytes ({limit})"
        )
    log.used.append((name, "ran", round(ran_ms, 1)))
    head = b'{"ms":%.1f,"delivery":%d,"result":' % (ran_ms, task.deliveries)
    return head + blob + b"}"


def _store(task: Task, name: str, record: bytes) -> bytes:
    store = task.step_store
    return record if store is None else store.store(task, name, record)


def _finish(task: Task, log: StepLog, name: str, value: Any, record: bytes, kept: bytes) -> Any:
    """The step's value: its own, unless a record was stored first (the same step of a
    repeated call), whose value then wins, so every delivery sees one answer."""
    if kept is record:
        return value
    try:
        return orjson.loads(kept)["result"]
    except (orjson.JSONDecodeError, TypeError, KeyError):
        return value


def tree_fields(task: Task) -> bytes:
    """The record's steps for the run tree: ',"steps":[[name, "ran"|"reused", ms], ...]'."""
    log = task.step_log
    if log is None or not log.used:
        return b""
    return b',"steps":' + orjson.dumps(log.used)


def read_steps(queue_or_manager_execute: Callable, key: str) -> list[dict]:
    """A task's stored steps, for `handoff inspect task`: [{name, ms, delivery, bytes}]."""
    raw = queue_or_manager_execute(lambda c: c.hgetall(key)) or {}
    shown = []
    for name, value in raw.items():
        entry: dict[str, Any] = {"name": name.decode(errors="replace"), "bytes": len(value)}
        try:
            stored = orjson.loads(value)
            entry.update(ms=stored.get("ms"), delivery=stored.get("delivery"))
        except (orjson.JSONDecodeError, AttributeError):
            entry["corrupt"] = True
        shown.append(entry)
    return shown
