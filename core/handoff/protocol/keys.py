"""Every Redis key name handoff uses, built in this one module.

All keys of one agent type carry the hash tag {agent}, so every multi-key script touches
one cluster slot. Agent names are validated before any key is built.

    <prefix>:{<agent>}:queue        ZSET  id -> priority/FIFO score (ready)
    <prefix>:{<agent>}:tasks        HASH  id -> task JSON (immutable after enqueue)
    <prefix>:{<agent>}:leases       ZSET  id -> lease deadline (ms, server time)
    <prefix>:{<agent>}:tokens       HASH  id -> current lease token
    <prefix>:{<agent>}:deliveries   HASH  id -> times claimed (poison limit)
    <prefix>:{<agent>}:failures     HASH  id -> failed executions so far
    <prefix>:{<agent>}:scores       HASH  id -> queue score (to requeue in place)
    <prefix>:{<agent>}:delayed      ZSET  id -> due time (ms)
    <prefix>:{<agent>}:dead         ZSET  id -> time dead-lettered (ms)
    <prefix>:{<agent>}:dead_reasons HASH  id -> JSON {reason, traceback, attempt} or {reason, at}
    <prefix>:{<agent>}:finished     ZSET  id -> until (ms): finished tasks with a key or a
                                          parent, refused again until then (dedupe window)
    <prefix>:{<agent>}:stats        HASH  counters (enqueued, done, failed, ...)
    <prefix>:{<agent>}:wake         LIST  wake-up tokens idle workers block on (BLPOP)
    <prefix>:{<agent>}:result:<id>  STRING done record + result, with a TTL
    <prefix>:{<agent>}:claim:<cid>  LIST  ids leased by one claim call (replay on retry)
    <prefix>:{<agent>}:steps:<id>   HASH  step name -> {ms, delivery, result}: a task's memoized
                                          steps (task.step), kept as long as its record
    <prefix>:{<agent>}:autoscalers  HASH  supervisor id -> JSON {min, max, current, until}
    <prefix>:{<agent>}:schema       STRING its payload's JSON Schema, published by its workers
                                          (typed agents only; `handoff enqueue` checks it)
    <prefix>:{<agent>}:outbox       HASH  field -> time + notice for a scope in another slot
    <prefix>:{<agent>}:deadlines    HASH  id -> ms: tasks that expire if not started by then
    <prefix>:{<agent>}:limits       HASH  start-rate limit: rate/burst set live (override the
                                          code's), tat (the limiter's clock), paused_until
    <prefix>:{<agent>}:cancelled    ZSET  id -> until (ms): a cancelled run or task, marked in
                                          every agent's slot (its tasks and children end
                                          cancelled at enqueue, claim, or a join's firing)
    <prefix>:{<agent>}:inbox:<tag>  LIST  ids of running tasks cancelled: the worker whose
                                          claim ids start with <tag> blocks on it
    <prefix>:{<agent>}:inbox_seq:<tag> STRING the sequence number of the last cancel pushed
                                          to that inbox: a claim returns it, so the worker
                                          knows whether it has heard every cancel so far
    <prefix>:{<agent>}:nudge:<tag>  LIST  a stopping worker's own token: its waker, blocked
                                          on wake and this list, returns at once
    <prefix>:{<agent>}:groups       ZSET  group -> rank: the fair rotation of groups with ready
                                          tasks that may start (see groups.py)
    <prefix>:{<agent>}:parked       ZSET  group -> until (ms): waiting for its rate or a pause
    <prefix>:{<agent>}:task_groups  HASH  id -> group, for tasks enqueued with a group
    <prefix>:{<agent>}:group_running HASH group -> leases its tasks hold (group_concurrency)
    <prefix>:{<agent>}:gq:<group>   ZSET  id -> score: a group's ready tasks (not in queue)
    <prefix>:{<agent>}:glimit:<group> HASH a group's limiter: tat, paused_until (expires)
    <prefix>:{<agent>}:scope:<id>   HASH  a run (root id) or join (then id): open tasks...
    <prefix>:{<agent>}:ends:<id>    STRING that scope's ends ("<JSON>,<JSON>,"), in order
    <prefix>:{<agent>}:ended:<run>  LIST  a token pushed when the run ends (waiters block)
    <prefix>:{<agent>}:watched:runs ZSET tasks whose end an ack must report: waited on
                                          (until ms), or ended out of order (+inf)
    <prefix>:{<agent>}:stream:<run> STREAM a run's events (task.progress, task.emit), in the
                                          root's slot; ends with an "end" entry
    <prefix>:{<agent>}:done:<id>    LIST  a token pushed when a waited-on task ends
    <prefix>:{<agent>}:msgs:<id>    STREAM a task's messages (client.send), read from the
                                          first by each delivery (messages.py)
    <prefix>:{<agent>}:successors:keys HASH id -> 'mode|delay|until|score|JSON': a repeated
                                          key's next task, waiting for the task under the
                                          key's id to end (conflict.py, lua/lib/successors.lua)
    <prefix>:{<agent>}:waiting      ZSET  then-task id -> when its wait times out (ms, +inf =
                                          never): tasks parked by a Wait (waits.py)
    <prefix>:{<agent>}:waiting_since ZSET then-task id -> when it was parked (ms): the same
                                          ids as waiting, kept in step by every script
                                          that adds to or takes from it (the monitor's
                                          oldest wait, O(log n); the dashboard's list)
    <prefix>:{<agent>}:wait_outbox  HASH  then-task id -> time + event: a wait not yet
                                          registered with its event (delivered, then gone)
    <prefix>:{events}:sig:<event>   STRING an event's signal data (JSON), for signal_ttl_s
    <prefix>:{events}:waiters:<event> HASH then-task id -> its agent: waits on the event
    <prefix>:{events}:outbox        HASH  field -> time + resume: signals not yet delivered to
                                          their waits' slots (all events share this slot)
    <prefix>:agents                 SET   registry of agent names
    <prefix>:workers                ZSET  worker id -> last heartbeat (ms)
    <prefix>:worker:<id>            HASH  one worker's health and metrics (TTL)
    <prefix>:control:<supervisor>   LIST  control messages (scale) for a supervisor
    <prefix>:supervisors            ZSET  supervisor id -> last heartbeat (ms)
    <prefix>:monitor                HASH  the monitor's last aggregate (JSON fields)
    <prefix>:schedules              ZSET  schedule name -> last fired tick (ms); moved only
                                          forward (ZADD GT) by the supervisors firing it
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from handoff.config.names import AGENT_NAME_RE as AGENT_NAME
from handoff.config.names import KEY_PREFIX_RE
from handoff.errors import InvalidAgentName, InvalidPayload

# '<agent>.<suffix>': generated ids are '<agent>.<26 hex>' or '<agent>.k<24 hex>'.
TASK_ID = re.compile(AGENT_NAME.pattern + r"\.[A-Za-z0-9_-]{1,64}")
# A claim id names a replay key and is the lease token: a plain token, no key syntax.
CLAIM_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


# Names already checked (a producer names the same few agents on every enqueue; the
# regex is the costliest line of a cold single enqueue). Bounded: a caller naming
# endless distinct agents is only checked the slow way once it is full.
_CHECKED_AGENTS: set[str] = set()
_CHECKED_AGENTS_MAX = 4096


def check_agent(name: object) -> str:
    """Return name if it is a valid agent name, else raise InvalidAgentName (one line)."""
    if type(name) is str and name in _CHECKED_AGENTS:
        return name
    if not isinstance(name, str) or AGENT_NAME.fullmatch(name) is None:
        raise InvalidAgentName(
            f"invalid agent name {_shown(name)}: must match ^{AGENT_NAME.pattern}$"
        )
    if type(name) is str and len(_CHECKED_AGENTS) < _CHECKED_AGENTS_MAX:
        _CHECKED_AGENTS.add(name)
    return name


def _shown(value: object) -> str:
    shown = repr(value)
    return shown if len(shown) <= 80 else shown[:77] + "..."


def check_task_id(task_id: object) -> str:
    """Return task_id if it is '<agent>.<id>' with a valid agent name, else raise (one line)."""
    if not isinstance(task_id, str) or TASK_ID.fullmatch(task_id) is None:
        raise InvalidPayload(
            f"invalid task id {_shown(task_id)}: expected '<agent>.<id>' with <id> made of "
            "1 to 64 of A-Z a-z 0-9 _ -"
        )
    return task_id


def check_claim_id(claim_id: object) -> str:
    if not isinstance(claim_id, str) or CLAIM_ID.fullmatch(claim_id) is None:
        raise InvalidPayload(
            f"invalid claim_id {_shown(claim_id)}: must be 1 to 64 of A-Z a-z 0-9 _ -"
        )
    return claim_id


# The per-agent keys every state-changing script receives, in this order.
AGENT_KEY_NAMES = (
    "queue",
    "tasks",
    "leases",
    "tokens",
    "deliveries",
    "failures",
    "scores",
    "delayed",
    "dead",
    "dead_reasons",
    "finished",
    "stats",
    "wake",
    "outbox",
    "limits",
    "deadlines",
    "cancelled",
    "groups",
    "parked",
    "task_groups",
    "group_running",
)


@dataclass(frozen=True)
class AgentKeys:
    """The keys of one agent type."""

    agent: str
    base: str  # "<prefix>:{<agent>}"

    @property
    def queue(self) -> str:
        return f"{self.base}:queue"

    @property
    def tasks(self) -> str:
        return f"{self.base}:tasks"

    @property
    def leases(self) -> str:
        return f"{self.base}:leases"

    @property
    def tokens(self) -> str:
        return f"{self.base}:tokens"

    @property
    def deliveries(self) -> str:
        return f"{self.base}:deliveries"

    @property
    def finished(self) -> str:
        return f"{self.base}:finished"

    @property
    def failures(self) -> str:
        return f"{self.base}:failures"

    @property
    def scores(self) -> str:
        return f"{self.base}:scores"

    @property
    def delayed(self) -> str:
        return f"{self.base}:delayed"

    @property
    def dead(self) -> str:
        return f"{self.base}:dead"

    @property
    def dead_reasons(self) -> str:
        return f"{self.base}:dead_reasons"

    @property
    def wake(self) -> str:
        return f"{self.base}:wake"

    @property
    def stats(self) -> str:
        return f"{self.base}:stats"

    def all(self) -> list[str]:
        """The fixed per-agent keys in AGENT_KEY_NAMES order (a script's KEYS prefix)."""
        return [f"{self.base}:{name}" for name in AGENT_KEY_NAMES]

    @property
    def deadlines(self) -> str:
        return f"{self.base}:deadlines"

    @property
    def cancelled(self) -> str:
        return f"{self.base}:cancelled"

    def group_queue(self, group: str) -> str:
        return f"{self.base}:gq:{group}"

    def group_limit(self, group: str) -> str:
        return f"{self.base}:glimit:{group}"

    @property
    def groups(self) -> str:
        return f"{self.base}:groups"

    @property
    def parked(self) -> str:
        return f"{self.base}:parked"

    @property
    def task_groups(self) -> str:
        return f"{self.base}:task_groups"

    @property
    def group_running(self) -> str:
        return f"{self.base}:group_running"

    def inbox(self, tag: str) -> str:
        return f"{self.base}:inbox:{tag}"

    def inbox_seq(self, tag: str) -> str:
        return f"{self.base}:inbox_seq:{tag}"

    def nudge(self, tag: str) -> str:
        return f"{self.base}:nudge:{tag}"

    @property
    def limits(self) -> str:
        return f"{self.base}:limits"

    @property
    def outbox(self) -> str:
        return f"{self.base}:outbox"

    def scope(self, scope_id: str) -> str:
        return f"{self.base}:scope:{scope_id}"

    def ends(self, scope_id: str) -> str:
        return f"{self.base}:ends:{scope_id}"

    def ended(self, run_id: str) -> str:
        return f"{self.base}:ended:{run_id}"

    def stream(self, run_id: str) -> str:
        return f"{self.base}:stream:{run_id}"

    def done(self, task_id: str) -> str:
        return f"{self.base}:done:{task_id}"

    def messages(self, task_id: str) -> str:
        return f"{self.base}:msgs:{task_id}"

    @property
    def successors(self) -> str:
        return f"{self.base}:successors:keys"

    @property
    def waiting(self) -> str:
        return f"{self.base}:waiting"

    @property
    def waiting_since(self) -> str:
        return f"{self.base}:waiting_since"

    @property
    def wait_outbox(self) -> str:
        return f"{self.base}:wait_outbox"

    @property
    def autoscalers(self) -> str:
        return f"{self.base}:autoscalers"

    @property
    def schema(self) -> str:
        return f"{self.base}:schema"

    def result(self, task_id: str) -> str:
        return f"{self.base}:result:{task_id}"

    def claim(self, claim_id: str) -> str:
        return f"{self.base}:claim:{claim_id}"

    def steps(self, task_id: str) -> str:
        return f"{self.base}:steps:{task_id}"


class Keys:
    """Key names under one prefix."""

    def __init__(self, prefix: str = "handoff") -> None:
        if not isinstance(prefix, str) or KEY_PREFIX_RE.fullmatch(prefix) is None:
            raise InvalidPayload(
                f"invalid key prefix {_shown(prefix)}: must match ^{KEY_PREFIX_RE.pattern}$"
            )
        self.prefix = prefix
        self._agents: dict[str, AgentKeys] = {}

    def agent(self, name: str) -> AgentKeys:
        keys = self._agents.get(name)
        if keys is None:
            check_agent(name)
            keys = AgentKeys(name, f"{self.prefix}:{{{name}}}")
            self._agents[name] = keys
        return keys

    @property
    def agents(self) -> str:
        return f"{self.prefix}:agents"

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    def worker(self, worker_id: str) -> str:
        return f"{self.prefix}:worker:{worker_id}"

    def cancel_answers(self, token: str) -> str:
        """LIST: workers' 'id|started' or 'id|waiting' for the leased tasks of one cancel."""
        return f"{self.prefix}:cancel_answers:{token}"

    def event_signal(self, event: str) -> str:
        return f"{self.prefix}:{{events}}:sig:{event}"

    def event_waiters(self, event: str) -> str:
        return f"{self.prefix}:{{events}}:waiters:{event}"

    @property
    def events_outbox(self) -> str:
        return f"{self.prefix}:{{events}}:outbox"

    @property
    def supervisors(self) -> str:
        return f"{self.prefix}:supervisors"

    def control(self, supervisor_id: str) -> str:
        return f"{self.prefix}:control:{supervisor_id}"

    @property
    def monitor(self) -> str:
        return f"{self.prefix}:monitor"

    @property
    def schedules(self) -> str:
        return f"{self.prefix}:schedules"
