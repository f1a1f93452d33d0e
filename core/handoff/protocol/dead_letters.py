"""The dead-letter queue's admin operations: requeue and purge.

Runs in: admin commands (`handoff dead requeue|purge`), the web dashboard. One script
call each (dead_requeue.lua, dead_purge.lua), bounded by limit when no ids are given.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def dead_requeue(queue: Any, agent: str, ids: Sequence[str], limit: int) -> list[str]:
    """Put dead tasks (ids, or the oldest limit) back in the queue with fresh counts."""
    reply = queue.run_scripts([("dead_requeue", queue._fixed(agent), [limit, *ids])])[0]
    return [i.decode() for i in reply]


def dead_purge(queue: Any, agent: str, ids: Sequence[str], limit: int) -> int:
    """Delete dead tasks (ids, or the oldest limit) and their payloads for good."""
    return int(queue.run_scripts([("dead_purge", queue._fixed(agent), [limit, *ids])])[0])
