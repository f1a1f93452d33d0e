"""A task's status, worked out in one place from what Redis holds about it.

Runs in: any process. Client.status (task_reads.py), the run tree (runs.py) and the
dashboard (through both) read different keys in different round trips, but name the
status with this one function, so the three never disagree on what "running" means.
"""

from __future__ import annotations

# What a finished record can say besides "done"; the scripts write status as its first
# field, so it is read off the record's start without parsing a result that may be large.
_NOT_DONE = (("expired", b'{"status":"expired"'), ("cancelled", b'{"status":"cancelled"'))


def finished_status(record: bytes) -> str:
    """done | expired | cancelled: what a task's finished record says."""
    for status, prefix in _NOT_DONE:
        if record.startswith(prefix):
            return status
    return "done"


def task_status(
    record: bytes | None,
    *,
    dead: bool,
    running: bool,
    delayed: bool,
    queued: bool,
    waiting: bool = False,
) -> str:
    """done | expired | cancelled | dead | running | delayed | waiting | queued | unknown.

    record: the finished record, if any; the flags: whether the task is in the dead,
    leases, delayed, waiting (a Wait's then-task, parked) and ready (its queue, or its
    group's) sets. A finished record wins, then dead, running, delayed, waiting, queued in
    that order (a task caught in two sets while
    it moves between reads gets one answer, the same everywhere)."""
    if record is not None:
        return finished_status(record)
    if dead:
        return "dead"
    if running:
        return "running"
    if delayed:
        return "delayed"
    if waiting:
        return "waiting"
    if queued:
        return "queued"
    return "unknown"
