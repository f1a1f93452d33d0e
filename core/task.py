"""The task model: ids, scores, and the JSON a task is stored as.

Runs in: producers and workers. The per-task path is one orjson call and a few string
operations; nothing here touches Redis.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from core.errors import InvalidPayload

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
    """The agent a task id belongs to (ids start with '<agent>.')."""
    agent, sep, _ = task_id.partition(".")
    if not sep:
        raise InvalidPayload(f"malformed task id {task_id[:80]!r}: expected '<agent>.<id>'")
    return agent


def score_for(priority: int, enqueued_ms: int) -> int:
    """Lower runs first: priority, then FIFO by enqueue time."""
    return priority * PRIORITY_SHIFT + (enqueued_ms - EPOCH_MS)


def check_priority(priority: object) -> int:
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise InvalidPayload(f"priority = {priority!r}: must be an integer")
    if not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        raise InvalidPayload(
            f"priority = {priority}: must be between {MIN_PRIORITY} and {MAX_PRIORITY}"
        )
    return priority


def dumps_payload(payload: Any) -> bytes:
    try:
        return orjson.dumps(payload)
    except (TypeError, orjson.JSONEncodeError) as e:
        raise InvalidPayload(f"payload is not JSON-serialisable: {e}") from None


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

    def to_json(self) -> bytes:
        """The stored form: immutable after enqueue (attempts and leases live beside it)."""
        record: dict[str, Any] = {
            "id": self.id,
            "agent": self.agent,
            "payload": self.payload,
            "priority": self.priority,
            "created_at": self.created_at,
            "enqueued_at": self.enqueued_at,
        }
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
        try:
            return orjson.dumps(record)
        except (TypeError, orjson.JSONEncodeError) as e:
            raise InvalidPayload(f"payload is not JSON-serialisable: {e}") from None

    @classmethod
    def from_json(cls, raw: bytes, *, attempt: int = 1, deliveries: int = 0, token: str = ""):
        """Decode a stored task; raises ValueError (with the reason) when it is corrupt."""
        record = orjson.loads(raw)
        if not isinstance(record, dict):
            raise ValueError("task JSON is not an object")
        missing = [name for name in ("id", "agent", "payload") if name not in record]
        if missing:
            raise ValueError(f"task JSON lacks {', '.join(missing)}")
        return cls(
            id=record["id"],
            agent=record["agent"],
            payload=record["payload"],
            priority=record.get("priority", 0),
            attempt=attempt,
            max_attempts=record.get("max_attempts"),
            timeout_s=record.get("timeout_s"),
            created_at=record.get("created_at", 0),
            enqueued_at=record.get("enqueued_at", 0),
            not_before=record.get("not_before"),
            parent_id=record.get("parent_id"),
            trace=record.get("trace") or [],
            key=record.get("key"),
            deliveries=deliveries,
            token=token,
        )

    @property
    def hops(self) -> int:
        return len(self.trace)
