"""A run's or join's ends as Redis keeps them: each end's JSON followed by a comma (one
APPEND per end, read back as one value), decoded here for the run's waiter and a
then-task's branches."""

from __future__ import annotations

import orjson


def decode_ends(ends_raw: bytes) -> list[dict]:
    """Stored ends (each end's JSON followed by a comma) -> the ends, in order."""
    return orjson.loads(b"[" + ends_raw[:-1] + b"]") if ends_raw else []


def group_ends(ends_raw: bytes, count: object) -> list[list[dict]]:
    """Stored ends (each with its branch index) -> one list per branch, in order."""
    branches: list[list[dict]] = [[] for _ in range(count if type(count) is int else 0)]
    for end in decode_ends(ends_raw):
        index = end.pop("branch", 0)
        if type(index) is int and 0 <= index < len(branches):
            branches[index].append(end)
    return branches
