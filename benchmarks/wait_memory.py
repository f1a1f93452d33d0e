"""Fill a server with waiting runs, as workers would, and say what each one keeps.

Runs in: `python -m benchmarks waits` (benchmarks/waits.py). The waits are parked by the
workers' own code run in this process (handoff.testing.InProcessApp): each run's first
task ("asker", benchmarks/wait_agents.py) is claimed, its handler returns a Wait, the
worker's settle builds the then-task, protocol/waits.py parks it (wait.lua, then
wait_register.lua on the event's slot) and the ack records the asker done: the keys
written are exactly a worker's. Only the runner's in-memory list of what ran, kept for
tests' asserts, is not kept here (a million of them would be the benchmark's memory).
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

import psutil
import redis

from handoff.testing import InProcessApp
from harness.topologies import wait_until

APP = "benchmarks.wait_agents"
CHUNK = 1000
LEASE_S = 5.0  # a claim's replay key lives one lease: gone before the memory is read
TIMEOUT_S = 86_400  # the parked waits' timeout: a day, none due while measured
BYTES_PER_RUN_NEEDED = 4096  # the server's share, with room for its hash tables' growth
SAMPLED_KEYS = 500


class _Parker(InProcessApp):
    """InProcessApp without its record of every task run (tests read it; not needed here),
    printing its progress instead."""

    progress_every = 100_000
    parked = 0

    def _record(self, completions, failures, children) -> None:
        before, self.parked = self.parked, self.parked + len(children)
        if failures:
            raise RuntimeError(f"an asker failed: {failures[0].error}")
        if self.parked // self.progress_every > before // self.progress_every:
            print(f"parked {self.parked:,} waits", file=sys.stderr)


def check_room(n: int) -> None:
    """Refuse, one line, a size the machine's free memory cannot hold."""
    available = psutil.virtual_memory().available
    if n * BYTES_PER_RUN_NEEDED > available:
        raise SystemExit(
            f"--waits {n:,} needs about {n * BYTES_PER_RUN_NEEDED / 2**30:.1f} GB free; "
            f"{available / 2**30:.1f} GB is: pass a smaller --waits"
        )


def payloads(start: int, stop: int, tag: str) -> list[dict]:
    return [{"event": f"approve:{tag}:{i}", "timeout_s": TIMEOUT_S} for i in range(start, stop)]


def fill(url: str, n: int) -> dict[str, Any]:
    """Park n waiting runs (n distinct events) on the server at url; bytes per run, queued
    (the reference: its first task enqueued, not started) and waiting, with a breakdown."""
    raw = redis.Redis.from_url(url)
    app = _Parker(APP, url, agents=["asker"], lease_s=LEASE_S)
    try:
        app.client.enqueue_many("asker", payloads(0, 1, "warm"))  # every shared key exists
        app.run_until_idle()
        app.parked = 0
        _no_claim_keys(raw, app)
        before = _used(raw)
        for start in range(0, n, CHUNK):
            app.client.enqueue_many("asker", payloads(start, min(n, start + CHUNK), "fill"))
        queued = _used(raw)
        started = time.monotonic()
        app.run_until_idle(timeout_s=max(600.0, n / 200), batch=CHUNK)
        park_s = time.monotonic() - started
        _no_claim_keys(raw, app)
        waiting = _used(raw)
        out = {
            "runs": n,
            "queued_bytes": (queued - before) / n,
            "waiting_bytes": (waiting - before) / n,
            "parked_per_s": n / park_s,
            "used_memory_mb": waiting / 2**20,
        }
        out["parts"] = breakdown(raw, app, n, waiting - before)
        return out
    finally:
        app.close()
        raw.close()


def park_waits(url: str, n: int) -> None:
    """Park n waits (as fill does, nothing measured): the drains' "waits in use"."""
    app = _Parker(APP, url, agents=["asker"], lease_s=LEASE_S)
    try:
        for start in range(0, n, CHUNK):
            app.client.enqueue_many("asker", payloads(start, min(n, start + CHUNK), "drain"))
        app.run_until_idle(timeout_s=max(120.0, n / 200), batch=CHUNK)
    finally:
        app.close()


def breakdown(raw: redis.Redis, app: InProcessApp, n: int, total: int) -> dict[str, float]:
    """Bytes per waiting run by where they live (MEMORY USAGE): the big shared keys read
    whole, one key per run averaged over a sample; the rest is Redis' own bookkeeping
    (the keyspace's and the expiries' tables)."""
    keys = app.queue.keys
    then, asker = keys.agent("resumed"), keys.agent("asker")
    parts: dict[str, float] = {}
    for name, key in (("then_task", then.tasks), ("waiting", then.waiting),
                      ("waiting_since", then.waiting_since),
                      ("scores", then.scores)):  # fmt: skip
        parts[name] = (raw.memory_usage(key, samples=0) or 0) / n
    per_run = (
        ("waiters", keys.event_waiters("approve:fill:*")),
        ("scope", asker.scope("*")),
        ("result", asker.result("*")),
    )
    for name, pattern in per_run:
        sample = []
        for key in raw.scan_iter(match=pattern, count=10_000):
            sample.append(raw.memory_usage(key) or 0)
            if len(sample) >= SAMPLED_KEYS:
                break
        parts[name] = statistics.mean(sample) if sample else 0.0
    parts["rest"] = total / n - sum(parts.values())
    return parts


def _used(raw: redis.Redis) -> int:
    return int(raw.info("memory")["used_memory"])


def _no_claim_keys(raw: redis.Redis, app: InProcessApp) -> None:
    pattern = app.queue.keys.agent("asker").claim("*")

    def none_left() -> bool:
        return next(iter(raw.scan_iter(match=pattern, count=10_000)), None) is None

    wait_until(none_left, LEASE_S + 60, "the claims' replay keys to expire")


OWN = ("then_task", "waiting", "waiting_since", "scores", "waiters")
PART_ROWS = (
    ("then_task", "the then-task's JSON (its agent's tasks hash)", "until it runs"),
    ("waiting", "its entry in the agent's waiting set (timeout order)", "until it runs"),
    (
        "waiting_since",
        "its entry in waiting_since (parking order: the oldest wait's age)",
        "until it runs",
    ),
    ("scores", "its queue score (its place in the queue once resumed)", "until it runs"),
    (
        "waiters",
        "the event's waiters (a hash; an event per run here)",
        "last wait's timeout + 60 s",
    ),
    ("scope", "the run's scope (the run tree: its open tasks)", "while the run is open"),
    ("result", "the finished first task's record and result", "result_ttl_s (1 h)"),
    ("rest", "the rest, by difference: Redis' own tables (keyspace, expiries)", ""),
)


def render(memory: dict[str, Any]) -> list[str]:
    n = memory["runs"]
    lines = [
        f"| Redis memory per run, server holding {n:,} of them | bytes per run |",
        "|---|---|",
        f"| a queued run (its first task enqueued, not started): the reference | "
        f"{memory['queued_bytes']:,.0f} |",
        f"| a waiting run (its first task returned a Wait; the then-task parked, registered "
        f"with its event) | **{memory['waiting_bytes']:,.0f}** |",
        "",
        "| where a waiting run's bytes are | bytes | kept |",
        "|---|---|---|",
    ]
    parts = memory["parts"]
    lines += [f"| {label} | {parts[key]:,.0f} | {kept} |" for key, label, kept in PART_ROWS]
    own = sum(parts[key] for key in OWN)
    goal = "met" if memory["waiting_bytes"] <= 1024 else "not met"
    lines += [
        "",
        f"Goal at most 1 KB per waiting run: {goal} ({memory['waiting_bytes']:,.0f} B). "
        f"The wait's own keys (the then-task, its two set entries and its score, the "
        f"event's waiters) are {own:,.0f} B of it; the run's scope and its first task's "
        f"record are what any run holds once its first task has ended. A run that waits "
        f"longer than result_ttl_s holds {memory['waiting_bytes'] - parts['result']:,.0f} B "
        f"once that record has expired. What would bring it under 1 KB: a then-task record "
        f"that names its root once (it names it four times: run, scope, parent_id, trace) "
        f"and a score worked out at resume rather than kept. The server's used_memory with "
        f"them all: {memory['used_memory_mb']:,.0f} MB.",
    ]
    return lines
