"""The Lua scripts, loaded once per client from the .lua files beside this module.

Each script is one atomic operation with its KEYS/ARGV contract in its header;
_prelude.lua (shared helpers), after the fixed per-agent KEYS generated from keys.py,
is prepended to each.
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
        f"local PRIORITY_SHIFT, EPOCH_MS = {PRIORITY_SHIFT}, {EPOCH_MS}\n"
    )


# Scripts that run at the memory limit (maxmemory with noeviction): they finish, fail,
# release, reap and dead-letter tasks, which frees memory; refusing them would leave a full
# server unable to drain. enqueue is not among them: at the limit it is refused, unwritten.
ALLOW_OOM = frozenset(NAMES) - {
    "enqueue", "enqueue_ready", "follow", "await", "wait", "wait_register", "signal", "send",
}  # fmt: skip
# Scripts that bind their own few KEYS and need no prelude (a hot path's lean twin).
STANDALONE = frozenset({"enqueue_ready", "wait_register", "signal"})  # (and the events')
FAST_PATH_ENDS = "--@prelude\n"


@cache
def source(name: str) -> str:
    folder = resources.files(__package__) / "lua"
    body = (folder / f"{name}.lua").read_text()
    if name in STANDALONE:
        return body
    # A body may open with a fast path that returns before the prelude's functions are
    # defined (up to a line FAST_PATH_ENDS): it goes ahead of the prelude.
    fast, _, rest = body.rpartition(FAST_PATH_ENDS)
    prelude = prelude_for(rest, (folder / "_prelude.lua").read_text())
    flags = "#!lua flags=allow-oom\n" if name in ALLOW_OOM else ""
    return flags + key_header() + fast + prelude + "\n" + rest


# A top-level statement of the prelude starts at column 0 (comments go with the next one).
_STATEMENT = re.compile(r"^(?!--|end\b)\S", re.MULTILINE)
_FUNCTION = re.compile(r"(?:local function|function) (\w+)\(|(\w+) = function\(")
_NAME = re.compile(r"[A-Za-z_]\w*")
_COMMENT = re.compile(r"(?:^|\s)--.*$", re.MULTILINE)


def _names(code: str) -> set[str]:
    return set(_NAME.findall(_COMMENT.sub("", code)))


def prelude_for(body: str, prelude: str) -> str:
    """The prelude with only the functions the body needs (at any depth), in their order.

    A script runs its whole text on every call, and each function definition there makes
    a closure: the full prelude costs about as much server time as an enqueue's own work.
    Every other statement (constants, forward declarations) is kept."""
    starts = [m.start() for m in _STATEMENT.finditer(prelude)]
    chunks = [prelude[a:b] for a, b in zip(starts, [*starts[1:], len(prelude)], strict=True)]
    head = prelude[: starts[0]] if starts else prelude
    defined: dict[int, str] = {}
    wanted = _names(body)
    for index, chunk in enumerate(chunks):
        code = chunk[_STATEMENT.search(chunk).start() :]
        match = _FUNCTION.match(code)
        if match:
            defined[index] = match.group(1) or match.group(2)
        else:  # what a constant's value uses (a forward declaration uses nothing)
            wanted.update(_names(code.partition("=")[2]))
    kept: set[int] = set()
    grew = True
    while grew:
        grew = False
        for index, fn_name in defined.items():
            if index not in kept and fn_name in wanted:
                kept.add(index)
                wanted.update(_names(chunks[index]))
                grew = True
    return head + "".join(c for i, c in enumerate(chunks) if i not in defined or i in kept)


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
