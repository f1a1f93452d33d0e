"""A run's event stream: what its tasks said while they ran (task.progress, task.emit).

Runs in: workers (append, batched: one pipeline per flush) and readers (client.stream,
`handoff watch`). The stream lives in the run root's slot, <base>:stream:<run>, capped at
stream_max_len entries and expiring with the run. Each entry: task, agent, kind
(progress | emit), seq (per delivery), attempt, data (JSON); the run's end appends one
entry of kind "end" (run_ended_notice in lib/scopes.lua), which a reader waits for in
Redis (XREAD BLOCK): no polling, and a run that streams nothing pays nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from handoff.errors import InvalidPayload, RedisCommandError, ResultTimeout
from handoff.protocol import runs
from handoff.protocol.keys import Keys
from handoff.protocol.plan import Call, Plan
from handoff.protocol.task import agent_of

READ_BATCH = 500  # entries one XREAD returns at most
STREAM_CHUNK_S = 5.0  # a reader's blocking read: the run's end ends it sooner


@dataclass(frozen=True, slots=True)
class Event:
    """One entry of a run's stream, as a reader sees it."""

    id: str  # the stream entry id: resume after it with stream(..., after=id)
    task: str
    agent: str
    kind: str  # progress | emit
    seq: int  # its place among its task delivery's events
    attempt: int  # the task's attempt (failures + 1)
    delivery: int  # which delivery of the task (a worker that died makes another)
    data: Any


def append(client, keys: Keys, events: list[tuple], max_len: int, keep_ms: int) -> None:
    """XADD a batch of events (run, task id, agent, attempt, delivery, kind, seq, JSON), one
    pipeline, each run's stream capped and kept as long as the run."""
    pipe = client.pipeline(transaction=False)
    streams = set()
    for run, task_id, agent, attempt, delivery, kind, seq, blob in events:
        key = keys.agent(agent_of(run)).stream(run)
        streams.add(key)
        fields = {"task": task_id, "agent": agent, "kind": kind, "seq": seq}
        fields.update(attempt=attempt, delivery=delivery, data=blob)
        pipe.xadd(key, fields, maxlen=max_len, approximate=True)
    for key in streams:
        pipe.pexpire(key, keep_ms)
    pipe.execute()


def _event(entry_id: bytes, fields: dict[bytes, bytes]) -> Event | None:
    """An entry as an Event; None for the run's end."""
    kind = fields.get(b"kind", b"").decode()
    if kind == "end":
        return None
    return Event(
        entry_id.decode(),
        fields.get(b"task", b"").decode(),
        fields.get(b"agent", b"").decode(),
        kind,
        int(fields.get(b"seq", 0)),
        int(fields.get(b"attempt", 1)),
        int(fields.get(b"delivery", 1)),
        orjson.loads(fields.get(b"data", b"null")),
    )


def read(
    keys: Keys,
    run: str,
    *,
    follow: bool,
    after: str,
    block_s: float,
    ended: Callable[[], Plan[bool]],
) -> Plan[None]:
    """The run's events after `after`, in order (a plan that yields Events among its
    requests); with follow, blocking in Redis for more until the run's end entry.
    ended() is a plan saying whether the run has ended (it also makes the run's end
    write the end entry: see client.stream)."""
    key = keys.agent(agent_of(run)).stream(run)
    last = after
    finished = False
    if follow:
        yield from _create(key)
        finished = yield from ended()  # after the stream exists: an end is written to it
    while True:
        block_ms = int(block_s * 1000) if follow and not finished else None
        reply = yield Call(
            lambda c, at=last, b=block_ms: c.xread({key: at}, count=READ_BATCH, block=b),
            blocking=True,
        )
        entries = reply[0][1] if reply else []
        for entry_id, fields in entries:
            last = entry_id.decode()
            event = _event(entry_id, fields)
            if event is None:
                return
            yield event
        if entries:
            continue
        if not follow or finished:
            return
        finished = yield from ended()  # a chunk passed quietly: look again (renews the watch)


def stream_plan(
    keys: Keys, run_or_task_id: str, follow: bool, after: str, wait_s: float | None
) -> Plan[None]:
    """Client.stream: the events of the run a task belongs to (yielded among the plan's
    requests), until the run ends (follow) or wait_s is up (ResultTimeout)."""
    agent_of(run_or_task_id)
    check_after(after)
    root = yield from runs.run_of(keys, run_or_task_id)
    if (yield from runs.run_state(keys, root, 1000)).kind == "unknown":
        raise InvalidPayload(f"stream of {run_or_task_id}: no such task or run (never "
                             "enqueued, or long gone)")  # fmt: skip
    deadline = None if wait_s is None else time.monotonic() + wait_s

    def ended() -> Plan[bool]:
        if deadline is not None and time.monotonic() > deadline:
            raise ResultTimeout(f"run {root} has not ended after {wait_s}s")
        flag_ms = int((STREAM_CHUNK_S + 5) * 1000)
        return (yield from runs.run_state(keys, root, flag_ms)).kind != "wait"

    block_s = STREAM_CHUNK_S if wait_s is None else min(STREAM_CHUNK_S, wait_s)
    yield from read(keys, root, follow=follow, after=after, block_s=block_s, ended=ended)


def _create(key: str) -> Plan[None]:
    """Make sure the stream exists (an empty one, with a readers group that holds nothing),
    so that the run's end writes its end entry there."""
    try:
        yield Call(lambda c: c.xgroup_create(key, "readers", id="$", mkstream=True))
    except RedisCommandError as e:
        if "BUSYGROUP" not in str(e):
            raise


def check_after(after: object) -> str:
    if not isinstance(after, str) or not _is_entry_id(after):
        raise InvalidPayload(f"after {after!r:.60}: a stream entry id like '1700000000000-0'")
    return after


def _is_entry_id(text: str) -> bool:
    ms, _, seq = text.partition("-")
    return ms.isdigit() and seq.isdigit() and len(text) <= 41
