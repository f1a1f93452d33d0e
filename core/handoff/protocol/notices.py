"""Notices: how a task's end reaches its run or its join, across cluster slots.

Runs in: workers (built when a task settles) and whoever delivers them (the worker
right after its ack, the reaper for what a dead worker left). Pure: no Redis here.

The picture. Every task belongs to a run (the task a client enqueued, and everything
handed off from it) and reports to one scope: the run itself, or the join whose branch
it is on. A scope lives in one agent's slot (the run's root agent, or the join's then
agent) and counts its open tasks. A task's settle sends its scope one notice: it ended
(E; R for a root that handed nothing off) or it handed off (S: its children replace
it); a join sends J to its new scope (its branches open there) and S to its own (the
then-task replaces the task that joined). The ack applies notices whose scope is in its
own slot inside the same script; any other notice is written to the agent's outbox in
that script and delivered right after (apply_notice in lib/notices.lua, scope.lua). A crash
between the two leaves it in the outbox, and the reaper delivers it: nothing is lost, and
since a task closes only once and a closed task never reopens, nothing counts twice.
"""

from __future__ import annotations

SEP = b"\x1f"  # between a notice's fields (JSON escapes it, ids cannot hold it)
NOTICE_SEP = b"\x1e"  # between the notices of one task in an ack


def _csv(ids: list[str]) -> bytes:
    return ",".join(ids).encode()


def ended(scope: str, run: str, task_id: str, branch: int, status: str, end_json: bytes) -> bytes:
    """A task ended (status done or dead): end_json is what its join or waiter will see."""
    return b"E\x1f%s\x1f%s\x1f%s\x1f%d\x1f%s\x1f%s" % (
        scope.encode(), run.encode(), task_id.encode(), branch, status.encode(), end_json,
    )  # fmt: skip


def done_end(task_id: str, agent: str, branch: int, result_json: bytes) -> bytes:
    """The end of a task that returned a value (ids hold no characters JSON escapes)."""
    return b'{"id":"%s","agent":"%s","branch":%d,"status":"done","result":%s}' % (
        task_id.encode(), agent.encode(), branch, result_json,
    )  # fmt: skip


# A root ended without handing off: its run is itself. The ack knows the root's id and
# result, so the notice is this one byte (the hot path: see root_ended in lib/notices.lua).
ROOT_DONE = b"R"


def stepped(
    scope: str, run: str, task_id: str, children: list[str], cap: int, keep_ms: int
) -> bytes:
    """A task handed off: its children (or a join's then-task) take its place."""
    return b"S\x1f%s\x1f%s\x1f%s\x1f%d\x1f%d\x1f%s" % (
        scope.encode(), run.encode(), task_id.encode(), cap, keep_ms, _csv(children),
    )  # fmt: skip


def joined(
    join_id: str,
    run: str,
    task_id: str,
    branches: list[str],
    priority: int,
    then_json: bytes,
    cap: int,
    keep_ms: int,
) -> bytes:
    """A join starts: its branches open in its scope; then_json is enqueued at the end."""
    return b"J\x1f%s\x1f%s\x1f%s\x1f%d\x1f%d\x1f%s\x1f%d\x1f%s" % (
        join_id.encode(), run.encode(), task_id.encode(), cap, keep_ms, _csv(branches),
        priority, then_json,
    )  # fmt: skip


def dropped(join_id: str) -> bytes:
    """The then-task finished: its join's state can go."""
    return b"D\x1f" + join_id.encode()


def target_agent(notice: bytes) -> str:
    """The agent whose slot holds the notice's scope (a scope id is a task id); not for
    R and D, which always go to the acking task's own slot."""
    scope = notice.split(SEP, 2)[1]
    return scope.partition(b".")[0].decode()


# op -> (fields, indexes of the fields that must be whole numbers)
_SHAPES = {b"E": (7, (4,)), b"S": (7, (4, 5)), b"J": (9, (4, 5, 7)), b"D": (2, ())}


def malformed(notice: bytes) -> str | None:
    """Why `notice` is not one this module builds (a one-line reason), or None. A notice
    read back from an outbox is data anyone with write access could have put there: one
    that is not well formed is dropped, never delivered (it would fail its whole batch)."""
    shape = _SHAPES.get(notice[:1])
    if shape is None:
        return f"unknown kind {notice[:1]!r}"
    count, numbers = shape
    fields = notice.split(SEP, count - 1)
    if len(fields) != count or fields[0] != notice[:1]:
        return f"{len(fields)} field(s), a {notice[:1].decode()} notice has {count}"
    if b"." not in fields[1] or not all(fields[1 : 4 if count > 2 else 2]):
        return "its scope, run or task id is missing"
    if not all(fields[i].lstrip(b"-").isdigit() for i in numbers):
        return "a count or number field is not a whole number"
    return None
