"""The Lua scripts, loaded once per client from the .lua files beside this module.

Each script is one atomic operation with its KEYS/ARGV contract in its header and an
`-- include:` line naming the shared helper files (lua/lib/*.lua, by topic) it uses;
they are put, after the fixed per-agent KEYS generated from keys.py, ahead of its body.
A test checks every include line against what the script calls.
Calls are EVALSHA only (pipelined where several go together); a NOSCRIPT reply (a
restarted or flushed server) loads every script and repeats the call. That repeat is
safe because every operation is idempotent: enqueue by task id, claim by claim_id,
ack/nack/extend/release by lease token.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from functools import cache
from importlib import resources
from typing import Any, TypeVar

import redis.exceptions as rex

from handoff.protocol.keys import AGENT_KEY_NAMES
from handoff.protocol.task import EPOCH_MS, PRIORITY_SHIFT

NAMES = (
    "enqueue",
    "enqueue_ready",
    "claim",
    "ack",
    "nack",
    "release",
    "extend",
    "reap",
    "dead_requeue",
    "dead_purge",
    "scope",
    "follow",
    "await",
    "cancel",
    "step",
    "rerun",
    "restore",
    "conflict",
    "wait",
    "wait_resume",
    "wait_tick",
    "wait_register",
    "signal",
    "send",
)


def key_header() -> str:
    """`local K_QUEUE, K_TASKS, ... = KEYS[1], KEYS[2], ...` and FIXED_KEYS, from
    AGENT_KEY_NAMES: the one list of per-agent keys, so Lua and Python cannot disagree
    (and task.py's score constants, for the then-task a join enqueues)."""
    names = ", ".join(f"K_{name.upper()}" for name in AGENT_KEY_NAMES)
    keys = ", ".join(f"KEYS[{i}]" for i in range(1, len(AGENT_KEY_NAMES) + 1))
    return (
        f"local {names} = {keys}\nlocal FIXED_KEYS = {len(AGENT_KEY_NAMES)}\n"
        f"local PRIORITY_SHIFT, EPOCH_MS = {PRIORITY_SHIFT}, {EPOCH_MS}\n" + RUN_KEYS
    )


# The agent's own keys named at run time (a group's, a run's, a worker's inbox): the same
# hash tag as its declared keys, so the same slot. In the header, so a fast path has it.
RUN_KEYS = (
    "local AGENT_BASE = string.sub(K_QUEUE, 1, -7)  -- '<prefix>:{<agent>}'\n"
    "local function run_key(kind, id) return AGENT_BASE .. ':' .. kind .. ':' .. id end\n"
)


# Scripts that run at the memory limit (maxmemory with noeviction): they finish, fail,
# release, reap and dead-letter tasks, which frees memory; refusing them would leave a full
# server unable to drain. enqueue is not among them: at the limit it is refused, unwritten.
ALLOW_OOM = frozenset(NAMES) - {
    "enqueue", "enqueue_ready", "follow", "await", "wait", "wait_register", "signal", "send",
}  # fmt: skip
# Scripts that bind their own few KEYS and need no shared helpers (a hot path's lean twin,
# and the events' scripts, which live in a slot of their own).
STANDALONE = frozenset({"enqueue_ready", "wait_register", "signal"})
FAST_PATH_ENDS = "--@prelude\n"
INCLUDE = re.compile(r"^-- include: *([a-z_, ]*)$", re.MULTILINE)


def lib_order() -> list[str]:
    """The shared helper files (lua/lib/), in the one order they may be put together: a
    file uses only what the files before it define (or declare ahead, as tasks.lua does
    for what notices.lua defines)."""
    folder = resources.files(__package__) / "lua" / "lib"
    return (folder / "ORDER").read_text().split()


def includes(body: str) -> list[str]:
    """The helper files a script names on its `-- include:` line, checked against
    lib/ORDER and put in that order."""
    match = INCLUDE.search(body)
    named = [n.strip() for n in match.group(1).split(",") if n.strip()] if match else []
    order = lib_order()
    unknown = sorted(set(named) - set(order))
    if unknown:
        raise ValueError(f"unknown Lua include(s) {unknown}: lua/lib/ has {order}")
    return [name for name in order if name in named]


@cache
def source(name: str) -> str:
    """A script as the server runs it: flags, the key header, its fast path (if any), the
    helper files it includes, its body."""
    folder = resources.files(__package__) / "lua"
    body = (folder / f"{name}.lua").read_text()
    if name in STANDALONE:
        return body
    # A body may open with a fast path that returns before the helpers are defined (up to
    # a line FAST_PATH_ENDS): it goes ahead of them, so a plain call pays for none.
    fast, _, rest = body.rpartition(FAST_PATH_ENDS)
    libs = "".join((folder / "lib" / f"{lib}.lua").read_text() for lib in includes(body))
    flags = "#!lua flags=allow-oom\n" if name in ALLOW_OOM else ""
    return flags + key_header() + fast + libs + "\n" + rest


@cache
def sha(name: str) -> str:
    return hashlib.sha1(source(name).encode()).hexdigest()


T = TypeVar("T")


def with_scripts(client, attempt: Callable[[Any], T]) -> T:
    """attempt(client); on NOSCRIPT (a restarted or flushed server) load every script and
    attempt once more: safe, every operation being idempotent (see above)."""
    try:
        return attempt(client)
    except rex.NoScriptError:
        load_all(client)
        return attempt(client)


def load_all(client) -> Any:
    """SCRIPT LOAD every script (one pipeline; on an asyncio client, await the result)."""
    pipe = client.pipeline(transaction=False)
    for name in NAMES:
        pipe.script_load(source(name))
    return pipe.execute()
