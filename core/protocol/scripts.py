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
from functools import cache
from importlib import resources

from handoff.protocol.keys import AGENT_KEY_NAMES
from handoff.protocol.task import EPOCH_MS, PRIORITY_SHIFT

NAMES = (
    "enqueue",
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
ALLOW_OOM = frozenset(NAMES) - {"enqueue", "follow", "await"}


@cache
def source(name: str) -> str:
    folder = resources.files(__package__) / "lua"
    prelude = (folder / "_prelude.lua").read_text()
    flags = "#!lua flags=allow-oom\n" if name in ALLOW_OOM else ""
    return flags + key_header() + prelude + "\n" + (folder / f"{name}.lua").read_text()


@cache
def sha(name: str) -> str:
    return hashlib.sha1(source(name).encode()).hexdigest()


def load_all(client) -> None:
    """SCRIPT LOAD every script (one pipeline)."""
    pipe = client.pipeline(transaction=False)
    for name in NAMES:
        pipe.script_load(source(name))
    pipe.execute()
