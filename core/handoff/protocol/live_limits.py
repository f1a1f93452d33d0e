"""Limits changed live (`handoff limits`): the agent's limits hash, which every worker reads
at its next claim (claim.lua), written and described here and nowhere else.

Runs in: `handoff limits` (and any tool that changes limits). The fields: rate and
cost_limit ("N/window_ms" or "none"), burst, paused_until (ms; a handler's RateLimited),
group_rate, group_concurrency. A field that is absent means "the code's own".
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from handoff.connection.manager import RedisManager
from handoff.errors import InvalidPayload
from handoff.protocol.keys import Keys
from handoff.protocol.limits import check_burst, parse_rate

USAGE = (
    "expected rate=N/s|N/min|N/h|none|default, burst=N, resume, group_rate=N/s|none|default, "
    "group_concurrency=N|default or cost_limit=N/min|none|default"
)
MAX_GROUP_CONCURRENCY = 1_000_000
_UNITS = {"1000": "s", "60000": "min", "3600000": "h"}


@dataclass
class LimitChanges:
    """Fields to set and fields to drop (back to the code's own)."""

    sets: dict[str, str] = field(default_factory=dict)
    drops: list[str] = field(default_factory=list)


def parse_limit_changes(changes: Iterable[str]) -> LimitChanges:
    """`rate=5/s`, `burst=10`, `resume`, ... as field changes; InvalidPayload (one line,
    naming the change) for anything else."""
    out = LimitChanges()
    for change in changes:
        _parse_one(change, out)
    return out


def _parse_one(change: str, out: LimitChanges) -> None:
    name, _, value = change.partition("=")
    if change == "resume":
        out.drops.append("paused_until")
    elif change == "rate=default":
        out.drops += ["rate", "burst"]
    elif name in ("rate", "cost_limit", "group_rate") and value == "none":
        out.sets[name] = "none"
    elif name in ("cost_limit", "group_rate", "group_concurrency") and value == "default":
        out.drops.append(name)
    elif name in ("rate", "cost_limit", "group_rate"):
        rate = parse_rate(value, name)
        out.sets[name] = f"{rate.count:g}/{rate.window_ms}"
    elif name == "burst":
        out.sets["burst"] = str(check_burst(int(value) if value.isdigit() else value))
    elif name == "group_concurrency" and value.isdigit() and int(value) <= MAX_GROUP_CONCURRENCY:
        out.sets["group_concurrency"] = str(int(value))
    else:
        raise InvalidPayload(f"{change!r}: {USAGE}")


def apply_limit_changes(
    manager: RedisManager, keys: Keys, agent: str, changes: LimitChanges
) -> tuple[dict[str, str], int]:
    """Write the changes; the limits now in force and the server's time (ms), in one
    round trip (TIME on its own: a cluster pipeline cannot carry it)."""
    key = keys.agent(agent).limits

    def apply(client) -> tuple[dict, list]:
        pipe = client.pipeline(transaction=False)
        if changes.sets:
            pipe.hset(key, mapping=changes.sets)
        if changes.drops:
            pipe.hdel(key, *changes.drops)
        pipe.hgetall(key)
        return pipe.execute()[-1], client.time()

    fields, (seconds, micros) = manager.execute(apply)
    current = {k.decode(): v.decode() for k, v in fields.items()}
    return current, seconds * 1000 + micros // 1000


def _shown_rate(stored: str) -> str:
    count, _, window = stored.partition("/")
    return f"{count}/{_UNITS.get(window, f'{window}ms')}"


def describe_live_limits(agent: str, current: dict[str, str], now_ms: int) -> str:
    """One line: what the agent's workers will apply at their next claim."""
    live = current.get("rate")
    if live is None:
        rate_text = "the code's (@agent(rate=...))"
    elif live == "none":
        rate_text = "none (lifted live)"
    else:
        rate_text = f"{_shown_rate(live)} (set live)"
    line = f"{agent}: rate {rate_text}"
    if "burst" in current:
        line += f", burst {current['burst']}"
    paused = float(current.get("paused_until", 0)) - now_ms
    if paused > 0:
        line += f", paused {paused / 1000:.1f}s more"
    if "group_rate" in current:
        group_rate = current["group_rate"]
        shown = group_rate if group_rate == "none" else _shown_rate(group_rate)
        line += f", group_rate {shown} (set live)"
    if "group_concurrency" in current:
        line += f", group_concurrency {current['group_concurrency']} (set live)"
    if current.get("cost_limit"):
        cost = current["cost_limit"]
        line += f", cost_limit {cost if cost == 'none' else _shown_rate(cost)} (set live)"
    return line
