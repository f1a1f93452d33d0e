"""Enqueue: storing tasks, by the route their case decides.

Runs in: producers (Client, AsyncClient, `handoff enqueue`), workers (the tasks a handler
handed off), schedules. Three routes, each named by what decides it:

  direct_one_ready   ONE READY task, sent DIRECTLY: one plain task (ready now, no key,
                     parent, deadline or group) whose agent this process registered, on
                     one server, with no replicas to wait for. A bare EVALSHA of
                     enqueue_ready.lua, no plan (a web request's enqueue: each microsecond
                     is a share of the call). Blocking TaskQueue.enqueue only.
  one_ready_plan     ONE READY task otherwise (agent not registered yet, a cluster, a
                     replica wait, the asyncio client): the same lean script, as a plan,
                     registering the agent in the same round trip.
  batch_plan         A BATCH, or one SPECIAL task: enqueue.lua per agent and chunk of
                     ENQUEUE_CHUNK tasks, all in one round trip. Within a chunk a plain
                     task is (id, score, JSON); a special one (DELAYED: not_before; KEYED:
                     key; CHILD: parent_id; with a DEADLINE: expires_at; GROUPED: group)
                     adds a spec. The script may end cancelled tasks (a key's cancel
                     policy): their ends for other slots are delivered at once after.

Every route checks each task (id of its agent, JSON, size) before anything is sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from handoff.errors import InvalidPayload, TaskRejected
from handoff.protocol import scripts
from handoff.protocol.keys import TASK_ID
from handoff.protocol.plan import Plan, Scripts
from handoff.protocol.records import Outgoing, kept_pairs, now_arg
from handoff.protocol.task import Task, score_for

ENQUEUE_CHUNK = 250  # tasks per script call: bounds how long one call holds the server (~1 ms)


def ready_now(task: Task) -> bool:
    """A plain task: the lean enqueue_ready script stores it exactly as enqueue.lua would."""
    return (
        task.not_before is None
        and task.key is None
        and task.parent_id is None
        and not task.expires_at
        and task.group is None
    )


def is_direct(queue: Any, task: Task) -> bool:
    """The direct route's case: enqueue_ready's one call is all a single task needs (its
    agent known here, no replicas to wait for, one server)."""
    return (
        ready_now(task)
        and task.agent in queue._registered_agents
        and not queue.settings.enqueue_wait_replicas
        and not queue.manager.is_cluster
    )


def enqueue_plan(queue: Any, tasks: Sequence[Task], now_ms: int | None) -> Plan[list[bool]]:
    """The plan routes: one ready task, or a batch (see the module docstring)."""
    if len(tasks) == 1 and ready_now(tasks[0]):
        return [(yield from one_ready_plan(queue, tasks[0]))]
    return (yield from batch_plan(queue, tasks, now_ms))


def direct_one_ready(queue: Any, task: Task) -> bool:
    """Route: one ready task, sent directly (is_direct). The same script, keys and
    arguments as one_ready_plan, without the plan's layers."""
    keys, args = ready_call(queue, task)
    command = ("EVALSHA", scripts.sha("enqueue_ready"), len(keys), *keys, *args)
    manager = queue.manager
    send = manager.send

    def run(client) -> Any:
        return scripts.with_scripts(client, lambda c: send(c, *command))

    return manager.execute(run)[0] == 1


def one_ready_plan(queue: Any, task: Task) -> Plan[bool]:
    """Route: one ready task through the plan, registering its agent on the way."""
    agent = task.agent
    keys, args = ready_call(queue, task)
    new = agent not in queue._registered_agents
    extra = [lambda p: p.sadd(queue.keys.agents, agent)] if new else []
    calls = [("enqueue_ready", keys, args)]
    reply = yield Scripts(calls, extra, queue.settings.enqueue_wait_replicas)
    queue._registered_agents.add(agent)
    return reply[0][0] == 1


def ready_call(queue: Any, task: Task) -> tuple[list[str], list[Any]]:
    """enqueue_ready's KEYS (cached per agent) and ARGV for a plain task, checked."""
    agent = task.agent
    blob = checked_json(0, task, agent + ".", queue.settings.max_payload_bytes)
    keys = queue._ready_keys.get(agent)
    if keys is None:
        k = queue.keys.agent(agent)
        keys = queue._ready_keys[agent] = [k.tasks, k.scores, k.queue, k.stats, k.wake]
    return keys, [queue._max_bytes, task.id, score_for(task.priority, task.enqueued_at), blob]


def batch_plan(queue: Any, tasks: Sequence[Task], now_ms: int | None) -> Plan[list[bool]]:
    """Route: a batch (any agents, any cases) in one round trip; True = added, False =
    duplicate. A bad task fails the batch with nothing written (TaskRejected names its
    position). A delayed task waits (not_before - enqueued_at) ms of server time, then
    takes its FIFO place at its due time."""
    calls, order, new_agents = _batch_calls(queue, tasks, now_ms)
    if not calls:
        return []
    extra = [lambda p, a=new_agents: p.sadd(queue.keys.agents, *a)] if new_agents else []
    replies = yield Scripts(calls, extra, queue.settings.enqueue_wait_replicas)
    queue._registered_agents.update(new_agents)
    added, outgoing = _read_added(tasks, order, replies)
    if outgoing:
        yield from queue.deliver_plan(outgoing, now_ms=now_ms)
    return added


def _batch_calls(queue: Any, tasks: Sequence[Task], now_ms: int | None) -> tuple[list, list, list]:
    """(script calls, the task indexes of each, agents not registered yet): every task
    checked and serialised, nothing sent."""
    positions: dict[str, list[int]] = {}
    for index, task in enumerate(tasks):
        group = positions.get(task.agent)
        if group is None:
            positions[task.agent] = group = []
        group.append(index)
    now = now_arg(now_ms)
    calls, order = [], []
    for agent, group in positions.items():
        fixed = queue.keys.agent(agent).all()
        for start in range(0, len(group), ENQUEUE_CHUNK):
            chunk = group[start : start + ENQUEUE_CHUNK]
            calls.append(("enqueue", fixed, _chunk_args(queue, tasks, chunk, agent, now)))
            order.append(chunk)
    new_agents = [a for a in positions if a not in queue._registered_agents]
    return calls, order, new_agents


def _chunk_args(queue: Any, tasks: Sequence[Task], chunk: list[int], agent: str, now) -> list:
    """enqueue.lua's ARGV for one chunk: (id, score, JSON) per task, then a spec
    (position, delay, deterministic, expires_at, parent, group) per special task."""
    limit = queue.settings.max_payload_bytes
    id_prefix = agent + "."
    special: list[Any] = []
    args: list[Any] = [queue._max_bytes, now, len(chunk), 0]
    for position, index in enumerate(chunk, 1):
        task = tasks[index]
        task_id = task.id
        blob = checked_json(index, task, id_prefix, limit)
        not_before = task.not_before
        if not_before is None:
            args += (task_id, score_for(task.priority, task.enqueued_at), blob)
            if ready_now(task):
                continue  # plain: nothing special to say about it
            delay = 0
        else:  # delayed: scored by its due time
            delay = max(0, not_before - task.enqueued_at)
            args += (task_id, score_for(task.priority, not_before), blob)
        deterministic = task.key is not None or task.parent_id is not None  # keyed or child
        special += (
            position, delay, 1 if deterministic else 0, task.expires_at or 0,
            task.parent_id or "", task.group or "",
        )  # fmt: skip
    args[3] = len(special) // 6
    args += special
    return args


def _read_added(
    tasks: Sequence[Task], order: list[list[int]], replies: list
) -> tuple[list[bool], list[Outgoing]]:
    """Per task whether it was added; and the ends of tasks the batch cancelled, kept in
    the outbox for scopes in other slots (they follow the flags after a '|')."""
    added = [False] * len(tasks)
    outgoing: list[Outgoing] = []
    for chunk, reply in zip(order, replies, strict=False):
        if len(reply) > len(chunk):
            outgoing += kept_pairs(tasks[chunk[0]].agent, reply[len(chunk) + 1 :])
            reply = reply[: len(chunk)]
        for index, flag in zip(chunk, reply, strict=True):
            added[index] = flag == 1
    return added, outgoing


def checked_json(index: int, task: Task, id_prefix: str, limit: int) -> bytes:
    """The task's JSON, once its id is its agent's and it fits max_payload_bytes."""
    task_id = task.id
    if not task_id.startswith(id_prefix) or TASK_ID.fullmatch(task_id) is None:
        raise TaskRejected(index, _foreign_id(task_id, task.agent))
    try:
        blob = task.to_json()
    except InvalidPayload as e:
        raise TaskRejected(index, str(e)) from None
    if len(blob) > limit:
        raise TaskRejected(
            index,
            f"task for agent {task.agent!r} is {len(blob)} bytes, over the "
            f"max_payload_bytes limit of {limit}",
        )
    return blob


def _foreign_id(task_id: str, agent: str) -> str:
    return f"task id {task_id[:80]!r} does not belong to agent {agent!r} (expected '{agent}.<id>')"
