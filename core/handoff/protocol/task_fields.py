"""The stored task's fields checked on decode (Task.from_json's slow paths): which field
has the wrong type, a task's place in its run, a Wait's fields, a repeated key's gen.

Runs in: workers (claim decodes every task) and readers. Apart from task.py so the model
stays short; nothing here touches Redis.
"""

from __future__ import annotations

from typing import Any, TypeVar

T = TypeVar("T", bound=Any)  # a Task (task.py imports this module, not the other way)

# Stored fields, the JSON types they may have, and whether null is allowed (an absent
# field takes its default).
FIELD_TYPES = (
    ("id", (str,), False),
    ("agent", (str,), False),
    ("priority", (int,), False),
    ("created_at", (int,), False),
    ("enqueued_at", (int,), False),
    ("max_attempts", (int,), True),
    ("timeout_s", (int, float), True),
    ("not_before", (int,), True),
    ("parent_id", (str,), True),
    ("key", (str,), True),
    ("trace", (list,), True),
    ("run", (str,), True),
    ("scope", (str,), True),
    ("branch", (int,), True),
    ("join", (dict,), True),
    ("expires_at", (int,), True),
    ("run_deadline_at", (int,), True),
    ("tp", (str,), True),
    ("group", (str,), True),
)


def wrong_types(record: dict) -> str:
    """The reason a decoded task failed its type checks (the slow path of from_json)."""
    for name, kinds, nullable in FIELD_TYPES:
        if name not in record or (nullable and record[name] is None):
            continue
        if type(record[name]) not in kinds:
            shown = repr(record[name])
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            return f"task JSON {name} {shown} has the wrong type"
    return "task JSON has a field of the wrong type"


def run_fields(record: dict) -> tuple[str | None, str | None, int, dict | None]:
    """A stored task's place in its run: (run, scope, branch, join), type-checked."""
    get = record.get
    run = get("run")
    if run is not None:
        scope, branch, join = get("scope"), get("branch", 0), get("join")
        if type(run) is not str or type(scope) is not str or type(branch) is not int:
            raise ValueError(wrong_types(record))
    else:
        scope, branch, join = None, 0, get("join")
    if join is not None and type(join) is not dict:
        raise ValueError(wrong_types(record))
    return run, scope, branch, join


def with_extras(task: T, record: dict) -> T:
    """A Wait's then-task: its wait and how it woke (protocol/waits.py); a repeated key's
    task: its gen (protocol/conflict.py). Type-checked."""
    if "wait" in record:
        task.wait, task.woke = record.get("wait"), record.get("woke")
        if type(task.wait) is not dict or (task.woke is not None and type(task.woke) is not dict):
            raise ValueError("task JSON wait or woke is not an object")
    if "gen" in record:
        if type(record["gen"]) is not str:
            raise ValueError("task JSON gen is not a string")
        task.gen = record["gen"]
    return task
