"""The Lua scripts, loaded once per client from the .lua files beside this module.

Each script is one atomic operation with its KEYS/ARGV contract in its header;
_prelude.lua (shared helpers and the fixed per-agent KEYS) is prepended to each.
Calls are EVALSHA only (pipelined where several go together); a NOSCRIPT reply (a
restarted or flushed server) loads every script and repeats the call. That repeat is
safe because every operation is idempotent: enqueue by task id, claim by claim_id,
ack/nack/extend/release by lease token.
"""

from __future__ import annotations

import hashlib
from functools import cache
from importlib import resources

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
)


@cache
def source(name: str) -> str:
    folder = resources.files(__package__) / "lua"
    prelude = (folder / "_prelude.lua").read_text()
    return prelude + "\n" + (folder / f"{name}.lua").read_text()


@cache
def sha(name: str) -> str:
    return hashlib.sha1(source(name).encode()).hexdigest()


def load_all(client) -> None:
    """SCRIPT LOAD every script (one pipeline)."""
    pipe = client.pipeline(transaction=False)
    for name in NAMES:
        pipe.script_load(source(name))
    pipe.execute()
