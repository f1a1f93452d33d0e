"""Waits and signals: a branch stopped until an event is signalled (or its timeout passes).

Runs in: workers (parking the then-task a Wait returned), producers and operators
(client.signal, `handoff signal`), and supervisors' ticks (timeouts, and what a crashed
process left undelivered). As plans (plan.py), so both clients drive the same code.

The picture. A Wait's then-task is parked in its own agent's slot (wait.lua): its JSON in
the tasks hash, its id in <base>:waiting scored by when it times out, in no queue. The
event lives in a slot of its own (every event's keys carry the hash tag {events}): the
signal's data for signal_ttl_s, and the waits registered on it. No script touches both
slots; each crossing is an idempotent write kept in an outbox until delivered:

  park      wait.lua parks the task and owes a registration (<base>:wait_outbox), in one
            script; wait_register.lua adds the wait to the event's waiters, or, the
            event being signalled already, owes a resume (<prefix>:{events}:outbox).
  signal    signal.lua keeps the data and turns every waiter into an owed resume, in one
            script.
  resume    wait_resume.lua on the wait's slot: a wait still parked is queued with the
            data, once (ZREM decides between a signal, the timeout and a cancel); a
            resume delivered twice changes nothing.
  timeout   wait_tick.lua, from every supervisor's tick: due waits fire once (ZREM again).

An owed write is forgotten only after it was applied; what a crashed process left owed,
the next supervisor tick (any supervisor of that agent, or any at all for the events'
outbox) delivers once it is OUTBOX_GRACE_MS old.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any

import orjson

from handoff.errors import InvalidPayload
from handoff.protocol.conflict import handed_plan
from handoff.protocol.keys import Keys
from handoff.protocol.plan import Call, Plan, Scripts
from handoff.protocol.queue import OUTBOX_GRACE_MS, QueueBase, outboxed_in
from handoff.protocol.task import Task, has_non_finite, now_ms, score_for

EVENT_NAME = re.compile(r"[A-Za-z0-9_.:/@+=#-]{1,200}")
ON_TIMEOUT = ("fail", "continue")
MAX_TIMEOUT_S = 366 * 86_400
TICK_LIMIT = 1000  # waits fired, and owed registrations handed back, per agent per tick
SEP = b"\x1f"

Resume = tuple[str, str, str, bytes]  # (events outbox field, agent, then-task id, data)
Owed = tuple[str, str, str, str]  # a registration: (agent, then-task id, event, due ms | inf)
KEEP_MARGIN_MS = 60_000  # an event's waiters outlive their last wait's due time by this


def check_event(event: object) -> str:
    """The event name if it is 1 to 200 of A-Z a-z 0-9 _ . : / @ + = # -, else raise."""
    if not isinstance(event, str) or EVENT_NAME.fullmatch(event) is None:
        shown = repr(event) if len(repr(event)) <= 60 else repr(event)[:57] + "..."
        raise InvalidPayload(
            f"invalid event name {shown}: 1 to 200 of A-Z a-z 0-9 _ . : / @ + = # -"
        )
    return event


def check_timeout(timeout_s: object) -> float | None:
    """None (wait until signalled) or a positive number of seconds, else raise."""
    if timeout_s is None:
        return None
    if (
        isinstance(timeout_s, bool)
        or not isinstance(timeout_s, int | float)
        or not 0 < timeout_s <= MAX_TIMEOUT_S
    ):
        raise InvalidPayload(
            f"wait timeout_s {timeout_s!r:.40}: a number of seconds above 0, at most "
            f"{MAX_TIMEOUT_S}, or None"
        )
    return float(timeout_s)


def signal_data(data: Any, limit: int, what: str = "signal data") -> bytes:
    """A signal's (or a message's) data as JSON, or InvalidPayload naming why not."""
    try:
        blob = orjson.dumps(data)
    except (TypeError, orjson.JSONEncodeError) as e:
        raise InvalidPayload(f"{what} is not JSON: {e}") from None
    if b"null" in blob and has_non_finite(data):
        raise InvalidPayload(f"{what} holds a NaN or infinite number")
    if len(blob) > limit:
        raise InvalidPayload(f"{what} is {len(blob)} bytes, over max_payload_bytes")
    return blob


def wait_record(event: str, on_timeout: str, timeout_s: float | None, since_ms: int) -> dict:
    """A then-task's "wait" (written last in its JSON, read there by the scripts)."""
    timeout_at = 0 if timeout_s is None else since_ms + int(timeout_s * 1000)
    return {"event": event, "on_timeout": on_timeout, "since": since_ms, "timeout_at": timeout_at}


def _due(task: Task) -> str:
    """When a parked task must leave the set unsignalled: its timeout or its deadline."""
    wait = task.wait or {}
    times = [t for t in (wait.get("timeout_at") or None, task.expires_at) if t]
    return str(min(times)) if times else "inf"


def _keep_ms(last_due: float, now: int) -> int:
    """How long an event's waiters must live: past its last wait's due time (0: one of
    them has none, so until a signal)."""
    if last_due == float("inf"):
        return 0
    return max(KEEP_MARGIN_MS, int(last_due) - now + KEEP_MARGIN_MS)


def _wait_keys(keys: Keys, agent: str) -> list[str]:
    agent_keys = keys.agent(agent)
    return [*agent_keys.all(), agent_keys.waiting, agent_keys.wait_outbox, agent_keys.waiting_since]


def _event_keys(keys: Keys, event: str) -> list[str]:
    return [keys.event_signal(event), keys.event_waiters(event), keys.events_outbox]


def park_plan(queue: QueueBase, tasks: Sequence[Task]) -> Plan[list[bool]]:
    """Park then-tasks of Waits (any agents); True = parked (or ended cancelled), False =
    a duplicate. Their registrations are delivered at once."""
    by_agent: dict[str, list[Task]] = {}
    for task in tasks:
        by_agent.setdefault(task.agent, []).append(task)
    max_bytes = queue.settings.max_payload_bytes
    calls = []
    for agent, group in by_agent.items():
        args: list[Any] = ["", max_bytes]
        for task in group:
            args += (task.id, score_for(task.priority, task.enqueued_at), task.to_json())
            wait = task.wait or {}
            args += (_due(task), wait.get("event", ""), wait.get("since") or "")
        calls.append(("wait", _wait_keys(queue.keys, agent), args))
    # The then agents join the registry as an enqueue's would: the monitor (which starts
    # from it) shows their waits before any task was enqueued to them or a worker ran.
    new_agents = sorted(set(by_agent) - queue._registered_agents)
    extra = [lambda p: p.sadd(queue.keys.agents, *new_agents)] if new_agents else []
    replies = yield Scripts(calls, extra, queue.settings.enqueue_wait_replicas)
    replies = replies[: len(calls)]
    queue._registered_agents.update(new_agents)
    added: dict[str, bool] = {}
    owed: list[Owed] = []
    for (agent, group), reply in zip(by_agent.items(), replies, strict=True):
        for task, flag in zip(group, reply, strict=False):
            added[task.id] = flag in (1, 2)
            if flag == 1:
                owed.append((agent, task.id, task.wait["event"], _due(task)))
    outgoing = outboxed_in(list(by_agent), replies)
    if outgoing:
        yield from queue.deliver_plan(outgoing)
    if owed:
        yield from register_plan(queue, owed)
    return [added[task.id] for task in tasks]


def register_plan(queue: QueueBase, owed: Sequence[Owed]) -> Plan[int]:
    """Register parked waits ((agent, then id, event, due)) with their events, resume
    those whose event is signalled, then forget the registrations owed. Returns resumes."""
    by_event: dict[str, list[str]] = {}
    last_due: dict[str, float] = {}
    for agent, task_id, event, due in owed:
        by_event.setdefault(event, []).extend((task_id, agent))
        last_due[event] = max(last_due.get(event, 0), float(due))
    now = now_ms()
    calls = [
        (
            "wait_register",
            _event_keys(queue.keys, event),
            ["", _keep_ms(last_due[event], now), *pairs],
        )
        for event, pairs in by_event.items()
    ]
    replies = yield Scripts(calls, wait_replicas=queue.settings.enqueue_wait_replicas)
    resumes: list[Resume] = []
    for reply in replies:
        for k in range(0, len(reply), 4):
            item = reply[k : k + 4]
            resumes.append((item[0].decode(), item[1].decode(), item[2].decode(), item[3]))
    resumed = (yield from resume_plan(queue, resumes)) if resumes else 0
    by_agent: dict[str, list[str]] = {}
    for agent, task_id, _, _ in owed:
        by_agent.setdefault(agent, []).append(task_id)
    keys = queue.keys
    yield Call(lambda c: _hdel_each(c, {keys.agent(a).wait_outbox: f for a, f in by_agent.items()}))
    return resumed


def resume_plan(queue: QueueBase, resumes: Sequence[Resume]) -> Plan[int]:
    """Deliver owed resumes to their waits' slots, then forget them; how many resumed."""
    by_agent: dict[str, list[Any]] = {}
    for _, agent, task_id, data in resumes:
        by_agent.setdefault(agent, []).extend((task_id, data))
    agents = list(by_agent)
    calls = [("wait_resume", _wait_keys(queue.keys, a), ["", *by_agent[a]]) for a in agents]
    replies = yield Scripts(calls, wait_replicas=queue.settings.enqueue_wait_replicas)
    resumed = 0
    for reply in replies:
        cut = reply.index(b"|") if b"|" in reply else len(reply)
        resumed += sum(1 for flag in reply[:cut] if flag == 1)
    outgoing = outboxed_in(agents, replies)
    if outgoing:  # a then-task of a run cancelled meanwhile ended: its run is told
        yield from queue.deliver_plan(outgoing)
    fields = [field for field, _, _, _ in resumes]
    outbox = queue.keys.events_outbox
    yield Call(lambda c: _hdel_each(c, {outbox: fields}))
    return resumed


def signal_args(event: object, data: Any, settings: Any) -> tuple[str, bytes, int]:
    """signal_plan's checked (event, data JSON, ttl ms): bad input raises, one line."""
    event = check_event(event)
    return event, signal_data(data, settings.max_payload_bytes), int(settings.signal_ttl_s * 1000)


def signal_plan(queue: QueueBase, event: str, data: bytes, ttl_ms: int) -> Plan[int]:
    """Signal an event: every wait registered on it resumes once (also those registered
    within ttl_ms after). Returns how many this call resumed."""
    token = os.urandom(6).hex()
    call = ("signal", _event_keys(queue.keys, event), ["", ttl_ms, data, token])
    reply = (yield Scripts([call], wait_replicas=queue.settings.enqueue_wait_replicas))[0]
    resumes = [
        (reply[k].decode(), reply[k + 1].decode(), reply[k + 2].decode(), data)
        for k in range(0, len(reply), 3)
    ]
    if not resumes:
        return 0
    return (yield from resume_plan(queue, resumes))


def tick_plan(queue: QueueBase, agents: Sequence[str], record_ttl_ms: int) -> Plan[int]:
    """A supervisor's tick: fire due waits of its agents, deliver what crashed processes
    left owed (registrations, and resumes of any agent's waits). Returns waits fired."""
    agents = list(agents)
    args = ["", TICK_LIMIT, OUTBOX_GRACE_MS, record_ttl_ms]
    calls = [("wait_tick", _wait_keys(queue.keys, a), args) for a in agents]
    outbox = queue.keys.events_outbox
    scan = [lambda p: p.hscan(outbox, 0, count=TICK_LIMIT)]  # the events' outbox: any tick's
    replies = yield Scripts(calls, scan)
    scanned = replies.pop()
    fired, owed = 0, []
    for agent, reply in zip(agents, replies, strict=True):
        fired += int(reply[0])
        pairs = reply[2 : 2 + 2 * int(reply[1])]
        for k in range(0, len(pairs), 2):
            event, _, due = pairs[k + 1].decode().partition("\x1f")
            owed.append((agent, pairs[k].decode(), event, due or "inf"))
    outgoing = outboxed_in(agents, replies)
    if outgoing:
        yield from queue.deliver_plan(outgoing)
    if owed:
        yield from register_plan(queue, owed)
    resumes = _left_resumes(scanned[1], queue.settings)
    if resumes:
        yield from resume_plan(queue, resumes)
    return fired


def _left_resumes(flat: dict, settings: Any) -> list[Resume]:
    """The events' outbox entries older than the grace: their signallers did not finish."""
    old = now_ms() - OUTBOX_GRACE_MS
    out = []
    for field, value in flat.items():
        parts = value.split(SEP, 3)
        if len(parts) == 4 and parts[0].isdigit() and int(parts[0]) < old:
            out.append((field.decode(), parts[1].decode(), parts[2].decode(), parts[3]))
    return out


def _hdel_each(client, fields_by_key: dict[str, list[str]]) -> Any:
    pipe = client.pipeline(transaction=False)
    for key, fields in fields_by_key.items():
        if fields:
            pipe.hdel(key, *fields)
    return pipe.execute()


def enqueue_children(queue: Any, children: Sequence[Task], **options: Any) -> None:
    """queue.enqueue(children); the then-tasks of Waits parked instead; keyed tasks (a
    keyed Handoff's: a root, run None) enqueued first, as Client.enqueue would enqueue
    them (conflict.handed_plan). A blocking queue: the worker's and the in-process
    runner's children, all before their parents' ack."""
    special = [c for c in children if c.wait is not None or c.run is None]
    if not special:
        queue.enqueue(children, **options)
        return
    keyed = [c for c in special if c.run is None]
    if keyed:
        queue.run(handed_plan(queue, keyed, now_ms=options.get("now_ms")))  # type: ignore[arg-type]
    parked = [c for c in special if c.run is not None]
    if parked:
        queue.run(park_plan(queue, parked))
    rest = [c for c in children if c.wait is None and c.run is not None]
    if rest:
        queue.enqueue(rest, **options)
