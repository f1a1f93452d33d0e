"""What reaches a supervisor's main loop: a signal, a scale request read from its control
list in Redis, the autoscaler's new count, or a side thread's failure. One small type
each, matched by type.

A control message is data from outside the process (anyone with write access to
`<prefix>:control:<supervisor>`), so it is parsed and checked here, in the Redis thread,
before it becomes an event: a malformed one is refused with a one-line reason and never
reaches the main loop. The sending side is here too (send_scale), for `handoff scale`
and the dashboard's scale action alike.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import orjson

from handoff.connection.manager import RedisManager
from handoff.protocol.keys import Keys
from handoff.protocol.task import now_ms

MAX_MESSAGE_BYTES = 64 * 1024
SUPERVISOR_ALIVE_MS = 30_000  # a supervisor that refreshed its entry this recently is live


@dataclass(slots=True, frozen=True)
class Signalled:
    signum: int


@dataclass(slots=True, frozen=True)
class ScaleRequest:
    """Run this many processes of each agent type (all supervised here); None: let the
    autoscaler decide again (a count pins an autoscaled agent type until then)."""

    counts: dict[str, int | None]


@dataclass(slots=True, frozen=True)
class Autoscaled:
    """The autoscaler's new count for one agent type on this supervisor, and why."""

    agent: str
    count: int
    reason: str


@dataclass(slots=True, frozen=True)
class ThreadFailed:
    """One of the supervisor's side threads met a bug (not Redis, not bad data) and ended."""

    name: str


class BadControlMessage(ValueError):
    """A control message that is not a well-formed request for this supervisor."""


def parse_control(raw: bytes, supervised: Collection[str], max_count: int) -> ScaleRequest:
    """The scale request in `raw`, or BadControlMessage naming what is wrong.

    Agent types this supervisor does not run are left out (`handoff scale` sends every
    request to every supervisor); a request naming none that it runs is refused like any
    other it cannot act on, so it is said in one line rather than dropped unseen."""
    if len(raw) > MAX_MESSAGE_BYTES:
        raise BadControlMessage(f"{len(raw)} bytes, over {MAX_MESSAGE_BYTES}")
    try:
        message = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BadControlMessage("not JSON") from None
    if not isinstance(message, dict):
        raise BadControlMessage(f"a JSON {type(message).__name__}, not an object")
    if message.get("op") != "scale":
        raise BadControlMessage(f"unknown op {_short(message.get('op'))} (known: 'scale')")
    agents = message.get("agents")
    if not isinstance(agents, dict) or not agents:
        raise BadControlMessage("'agents' must be an object of agent type -> process count")
    counts = {}
    for name, count in agents.items():
        if name not in supervised:
            continue  # another supervisor's business
        if count == "auto":
            counts[name] = None
            continue
        if type(count) is not int or not 0 <= count <= max_count:
            raise BadControlMessage(
                f"{_short(name)} = {_short(count)}: the count must be a whole number "
                f"between 0 and {max_count} (max_processes_per_agent)"
            )
        counts[name] = count
    if not counts:
        here = ", ".join(sorted(supervised)) or "none"
        raise BadControlMessage(
            f"names no agent type supervised here ({_short(list(agents)[:5])}; here: "
            f"{_short(here)})"
        )
    return ScaleRequest(counts)


def _short(value: object) -> str:
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def send_scale(manager: RedisManager, keys: Keys, wanted: Mapping[str, int | str]) -> int:
    """Ask every live supervisor to run `wanted` (agent type -> count, or "auto"): one
    control message each, in one round trip. Returns how many were asked (0: none live).

    Runs in: `handoff scale`, the dashboard. Each supervisor checks the message again
    (parse_control) and keeps the agent types it runs."""
    alive_since = now_ms() - SUPERVISOR_ALIVE_MS
    supervisors = manager.execute(lambda c: c.zrangebyscore(keys.supervisors, alive_since, "+inf"))
    if not supervisors:
        return 0
    message = orjson.dumps({"op": "scale", "agents": dict(wanted)})

    def send(client) -> None:
        pipe = client.pipeline(transaction=False)
        for sid in supervisors:
            pipe.rpush(keys.control(sid.decode()), message)
        pipe.execute()

    manager.execute(send)
    return len(supervisors)


def autoscaled_by_live_supervisors(
    manager: RedisManager, keys: Keys, agents: list[str]
) -> set[str]:
    """Which of these agent types some live supervisor autoscales (each such supervisor
    keeps its part in the agent's autoscalers hash): `scale AGENT=auto` on any other is
    a no-op, and `handoff scale` says so instead of "sent"."""
    alive_since = now_ms() - SUPERVISOR_ALIVE_MS

    def read(client) -> tuple[list, list]:
        pipe = client.pipeline(transaction=False)
        pipe.zrangebyscore(keys.supervisors, alive_since, "+inf")
        for name in agents:
            pipe.hkeys(keys.agent(name).autoscalers)
        replies = pipe.execute()
        return replies[0], replies[1:]

    if not agents:
        return set()
    if manager.is_cluster:  # the agents' hashes live on several slots: one call each
        live = set(
            manager.execute(lambda c: c.zrangebyscore(keys.supervisors, alive_since, "+inf"))
        )
        parts = [manager.execute(lambda c, n=n: c.hkeys(keys.agent(n).autoscalers)) for n in agents]
    else:
        supervisors, parts = manager.execute(read)
        live = set(supervisors)
    return {name for name, ids in zip(agents, parts, strict=True) if live & set(ids)}
