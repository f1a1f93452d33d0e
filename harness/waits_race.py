"""The waits race (issue 30): N waits with 1 s timeouts, signalled at random moments
around the timeout by two signalling processes at once. Every then-task must run (or be
dead-lettered) exactly once, as signalled or as timed out, never both. Shared by
tests/test_waits.py and tests/faults/test_waits_killed.py (the same race with
supervisors SIGKILLed). What ran is recorded outside handoff, in the test's server:
`after_runs` by tests/apps/waits.py, `signals` by tests/apps/signaller.py."""

from __future__ import annotations

import random
import subprocess
import sys
import time
from collections import Counter

import orjson

from handoff import TaskDead
from harness.procs import ROOT, handoff_env, wait_until


def after_runs(raw_redis) -> list[dict]:
    """Every execution of the `after` agent (a then-task): {id, i, event, timed_out, run}."""
    return [orjson.loads(x) for x in raw_redis.lrange("after_runs", 0, -1)]


def then_of(client, asker_id: str) -> str:
    """The then-task id of the Wait the asker returned (once it has)."""
    wait_until(lambda: client.status(asker_id) == "done", 20, "the asker to return its Wait")
    return client.result(asker_id)["wait"]["then"]


def warm(client) -> None:
    """Both agents' workers are up: a wait has been parked, resumed and run."""
    root = client.enqueue("asker", {"i": -1, "event": "warm", "timeout_s": 60})
    then = then_of(client, root)
    wait_until(lambda: client.status(then) == "waiting", 20, "the wait to be parked")
    assert client.signal("warm") == 1
    client.result(root, 20, follow=True)


def _signallers(raw_redis, redis_url: str, waits: int, seed: int) -> tuple[list, int]:
    """Two signalling processes, each with every event at a random moment 0.6 to 1.6 s
    after the start; returns them and the start (ns), once both are ready for it."""
    rng = random.Random(seed)
    procs = []
    for name in ("s1", "s2"):
        plan = [[rng.uniform(0.6, 1.6), f"race.{i}"] for i in range(waits)]
        argv = [sys.executable, "-m", "apps.signaller", name, orjson.dumps(plan)]
        procs.append(subprocess.Popen(argv, env=handoff_env(redis_url), cwd=ROOT))
    wait_until(lambda: raw_redis.llen("signallers_ready") == 2, 30, "the signallers")
    start_ns = time.time_ns() + 100_000_000
    for name in ("s1", "s2"):
        raw_redis.rpush(f"go:{name}", start_ns)
    return procs, start_ns


def race(client, raw_redis, redis_url: str, waits: int, seed: int = 7) -> Counter:
    """Run the race (asker and after supervised, warm) and check it; returns how each
    wait ended: signalled, signalled before it waited (a signal kept for it), timed out
    and ran (on_timeout="continue": odd i), timed out and dead ("fail": even i)."""
    payloads = [
        {"i": i, "event": f"race.{i}", "timeout_s": 1.0,
         "on_timeout": "continue" if i % 2 else "fail"}
        for i in range(waits)
    ]  # fmt: skip
    signallers, start_ns = _signallers(raw_redis, redis_url, waits, seed)
    time.sleep(max(0.0, (start_ns - time.time_ns()) / 1e9))
    roots = client.enqueue_many("asker", payloads)
    ends = {}
    for i, root in enumerate(roots):
        try:
            ends[i] = ("ran", client.result(root, 60, follow=True))
        except TaskDead as e:
            ends[i] = ("dead", str(e))
    for proc in signallers:
        assert proc.wait(60) == 0
    time.sleep(0.5)  # anything run twice would show by now
    outcome = _check(raw_redis, ends, waits)
    sent_s = [at / 1000 - start_ns / 1e9 for *_, at in _signals(raw_redis)]
    print(f"{waits} waits: {dict(outcome)}; signals sent {min(sent_s):.2f}..{max(sent_s):.2f} s")
    return outcome


def _signals(raw_redis) -> list[list]:
    return [orjson.loads(x) for x in raw_redis.lrange("signals", 0, -1)]


def _check(raw_redis, ends: dict[int, tuple[str, object]], waits: int) -> Counter:
    """Each then-task ran at most once, and exactly when its run says it did; each event
    resumed at most once across both signallers; signalled xor timed out."""
    runs = [r for r in after_runs(raw_redis) if r["i"] >= 0]
    assert sorted(r["i"] for r in runs) == sorted(i for i, e in ends.items() if e[0] == "ran")
    assert len({r["id"] for r in runs}) == len(runs)  # no then-task ran twice
    signals = _signals(raw_redis)
    assert len(signals) == 2 * waits
    resumed_by = Counter(event for _, event, resumed, _ in signals for _ in range(resumed))
    assert max(resumed_by.values(), default=0) == 1
    by_i = {r["i"]: r for r in runs}
    outcome: Counter = Counter()
    for i in range(waits):
        kind, detail = ends[i]
        run = by_i.get(i)
        if kind == "ran" and not run["timed_out"]:  # by a signaller, or by a signal kept
            assert run["event"]["from"] in ("s1", "s2"), (i, run)  # for it (signal_ttl_s)
            outcome["signalled" if resumed_by[f"race.{i}"] else "signalled before it waited"] += 1
        elif kind == "ran":
            assert i % 2 and run["event"] is None and resumed_by[f"race.{i}"] == 0, (i, run)
            outcome["timed out, ran"] += 1
        else:
            assert i % 2 == 0 and run is None and resumed_by[f"race.{i}"] == 0, (i, detail)
            assert f"wait for event 'race.{i}' timed out" in str(detail)
            outcome["timed out, dead"] += 1
    return outcome
