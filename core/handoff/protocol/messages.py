"""Messages: data sent into a task while it runs (client.send -> task.receive).

Runs in: producers (client.send, as a plan) and workers (a handler's task.receive, on
the worker's connections). A task's messages are a STREAM in its agent's slot,
<base>:msgs:<id>, appended only while the task exists (send.lua) and expiring
MESSAGES_TTL_S after the last one. A delivery reads them from the first entry on, keeping
its own place (task._msg_after): a task delivered again after a crash sees every message
again, in order. A handler waiting for one blocks in Redis (XREAD BLOCK, in chunks of
WAIT_CHUNK_S so a cancel is seen between them), never polls.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from handoff.errors import MessageRefused
from handoff.protocol.keys import Keys
from handoff.protocol.plan import Call, Plan, Scripts
from handoff.protocol.queue import QueueBase
from handoff.protocol.task import Task, agent_of
from handoff.protocol.waits import signal_data

MESSAGES_TTL_S = 7 * 86_400  # after the last message (the task's record lives less)
MAX_MESSAGES = 10_000  # per task; the oldest go first
WAIT_CHUNK_S = 1.0


def send_plan(queue: QueueBase, task_id: str, data: Any) -> Plan[str]:
    """Append data (JSON) to the task's messages; its entry id. MessageRefused (one line)
    when the task is finished or unknown; InvalidPayload when data is not JSON."""
    agent_keys = queue.keys.agent(agent_of(task_id))
    blob = signal_data(data, queue.settings.max_payload_bytes, "message data")
    keys = [*agent_keys.all(), agent_keys.messages(task_id)]
    args = [task_id, blob, MESSAGES_TTL_S * 1000, MAX_MESSAGES]
    reply = (yield Scripts([("send", keys, args)]))[0]
    state = reply[0].decode()
    if state == "sent":
        return reply[1].decode()
    if state == "unknown":
        raise MessageRefused(f"task {task_id} is unknown: message not sent")
    raise MessageRefused(f"task {task_id} is already {state}: message not sent")


def receive_plan(keys: Keys, task: Task, timeout_s: float | None) -> Plan[tuple[bool, Any]]:
    """(True, the next message) of this delivery, or (False, None) at the timeout (None:
    none) or once the task is cancelled."""
    key = keys.agent(task.agent).messages(task.id)
    deadline = None if timeout_s is None else time.monotonic() + max(0.0, timeout_s)
    while True:
        left = WAIT_CHUNK_S if deadline is None else min(WAIT_CHUNK_S, deadline - time.monotonic())
        block_ms = max(1, int(left * 1000))
        reply = yield Call(
            lambda c, at=task._msg_after, b=block_ms: c.xread({key: at}, count=1, block=b),
            blocking=True,
        )
        entries = reply[0][1] if reply else []
        if entries:
            entry_id, fields = entries[0]
            task._msg_after = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            raw = fields.get(b"m", fields.get("m"))
            return True, orjson.loads(raw)
        if task.cancelled.is_set():
            return False, None
        if deadline is not None and time.monotonic() >= deadline:
            return False, None


def install(queue: Any) -> None:
    """Let this process's handlers receive messages through `queue` (a TaskQueue: the
    worker's). Runs in: a worker, after fork (init_process)."""

    def receive(task: Task, timeout_s: float | None) -> Any:
        return queue.run(receive_plan(queue.keys, task, timeout_s))[1]

    Task.message_reader = receive
