"""Joins under SIGKILL: workers of every agent but the then agent killed at random every
200 ms until every run has ended (the joining splitter's included, so a splitter can
return its Join again), on one server and on a 3-primary cluster. What the then handler
saw is recorded outside handoff (tests/apps/flows.py)."""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter

import orjson
import psutil
import pytest

from harness.procs import HandoffProcess, handoff_env, wait_until

BACKENDS = ("server", "cluster")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

RUNS = int(os.environ.get("JOINS_KILLED_RUNS", "10"))  # 20 runs the full scenario
BRANCHES = 50
FAN_AT = list(range(0, BRANCHES, 5))  # these branches split in two at their first hop
ENDS_PER_RUN = BRANCHES + len(FAN_AT)
KILL_EVERY_S = 0.2
STEP_S = 0.03  # each step's work: long enough that kills land while runs are open
PLANNER_S = 0.2  # and the splitters': kills land on splitters too
BOOT_S = 0.3  # a worker killed before it claims tests nothing


def kill_one(supervisor: HandoffProcess, rng: random.Random) -> bool:
    """SIGKILL one of the supervisor's workers that has been up at least BOOT_S (its
    supervisor forks a replacement); False when none has."""
    now = time.time()
    grown = []
    for child in supervisor.live_children():
        try:
            if now - child.create_time() > BOOT_S:
                grown.append(child)
        except psutil.NoSuchProcess:
            pass
    if not grown:
        return False
    try:
        rng.choice(grown).send_signal(signal.SIGKILL)
    except psutil.NoSuchProcess:
        return False
    return True


def run_killing(redis_url, tmp_path, client, raw_redis, kill_then_agent, record_property):
    """RUNS runs, started one per kill tick, while workers are killed every KILL_EVERY_S;
    returns the roots and each run's result(follow=True)."""
    env = handoff_env(
        redis_url, app="apps.flows", lease_s=1, max_deliveries=1000, crash_backoff_max_s=0.2
    )
    killed = "splitter=1,step=3" + (",merge=1" if kill_then_agent else "")
    victims = HandoffProcess(["supervise", "--agents", killed], env, tmp_path / "victims.log")
    spared = None
    if not kill_then_agent:
        spared = HandoffProcess(["supervise", "--agents", "merge=1"], env, tmp_path / "then.log")
    payload = {"n": BRANCHES, "hops": 2, "fan_at": FAN_AT, "step_sleep_s": STEP_S}
    payload["splitter_sleep_s"] = PLANNER_S
    roots: list[str] = []
    rng = random.Random(0)
    kills = 0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if len(roots) < RUNS:  # runs start while the killing goes on
            roots.append(client.enqueue("splitter", payload))
        ended = {orjson.loads(r)["run"] for r in raw_redis.lrange("merged", 0, -1)}
        if len(roots) == RUNS and ended >= set(roots):
            break
        time.sleep(KILL_EVERY_S)  # the fault's cadence, not a synchronisation
        kills += kill_one(victims, rng)
    else:
        open_runs = [r for r in roots if r not in ended]
        raise AssertionError(
            f"{len(open_runs)} run(s) not ended after {kills} kills: {open_runs[:3]}; "
            f"{client.queue_stats()}; victims: {victims.output()[-2000:]}"
        )
    record_property("kills", kills)
    record_property("splitter_runs", raw_redis.llen("planned"))
    results = {root: client.result(root, 60, follow=True) for root in roots}
    victims.stop()
    if spared is not None:
        spared.stop()
    assert kills >= RUNS, kills  # the faults really landed (17-95 seen: about 2 a run)
    return roots, results


def merges_by_run(raw_redis) -> dict[str, list[dict]]:
    by_run: dict[str, list[dict]] = {}
    for raw in raw_redis.lrange("merged", 0, -1):
        record = orjson.loads(raw)
        by_run.setdefault(record["run"], []).append(record)
    return by_run


def check_every_end_seen(record: dict) -> None:
    branches = record["branches"]
    assert len(branches) == BRANCHES
    for index, ends in enumerate(branches):
        assert len(ends) == (2 if index in FAN_AT else 1), (index, ends)
        assert all(e["status"] == "done" and e["result"] == {"i": index} for e in ends)


def test_the_then_task_runs_exactly_once_after_every_branch_with_workers_killed(
    redis_url, tmp_path, client, raw_redis, record_property
):
    roots, results = run_killing(redis_url, tmp_path, client, raw_redis, False, record_property)
    by_run = merges_by_run(raw_redis)
    last_end: Counter = Counter()
    for raw in raw_redis.lrange("step_ends", 0, -1):
        end = orjson.loads(raw)
        last_end[end["run"]] = max(last_end[end["run"]], end["at_ms"])
    for root in roots:
        [record] = by_run[root]  # exactly once
        assert record["at_ms"] >= last_end[root]  # never before the last branch ended
        check_every_end_seen(record)
        assert results[root] == {
            "merged": [[e["result"] for e in ends] for ends in record["branches"]]
        }


def test_a_killed_then_agent_still_runs_its_one_then_task_to_completion(
    redis_url, tmp_path, client, raw_redis, record_property
):
    roots, results = run_killing(redis_url, tmp_path, client, raw_redis, True, record_property)
    by_run = merges_by_run(raw_redis)
    for root in roots:
        records = by_run[root]
        assert len({r["id"] for r in records}) == 1  # one then-task id, maybe run again
        check_every_end_seen(records[-1])
        assert client.status(records[0]["id"]) == "done"
        assert len(results[root]["merged"]) == BRANCHES


@pytest.fixture
def replicated_cluster(tmp_path):
    """A cluster of its own, 3 primaries each with a replica: this test kills one."""
    from harness.topologies import start_cluster

    cluster = start_cluster(tmp_path / "replicated", replicas_per_primary=1)
    yield cluster
    cluster.stop()


@pytest.mark.backends("cluster")
def test_joins_ride_out_the_failover_of_their_branches_primary(
    backend, replicated_cluster, tmp_path, record_property
):
    """splitter and merge (the join's slot) on one primary, step (the branches) on
    another, which is killed mid-run; every write a process was told succeeded was
    confirmed by a replica (enqueue_wait_replicas=1, notices included)."""
    from redis.cluster import key_slot

    from handoff.client import Client
    from handoff.config import RedisPoolConfig, Settings
    from handoff.protocol.keys import Keys

    cluster = replicated_cluster
    keys = Keys()

    def slot(agent: str) -> int:
        return key_slot(keys.agent(agent).queue.encode())

    home = cluster.owner_port(slot("splitter"))
    for agent in ("merge",):
        if cluster.owner_port(slot(agent)) != home:
            cluster.migrate_slot(slot(agent), home)
    if cluster.owner_port(slot("step")) == home:
        other = next(p.port for p in cluster.primaries if p.port != home)
        cluster.migrate_slot(slot("step"), other)
    victim = cluster.owner_port(slot("step"))
    raw = cluster.client()
    env = handoff_env(cluster.url, app="apps.flows", lease_s=1, enqueue_wait_replicas=1)
    sup = HandoffProcess(
        ["supervise", "--agents", "splitter=1,step=2,merge=1"], env, tmp_path / "sup.log"
    )
    settings = Settings(redis=RedisPoolConfig(url=cluster.url), enqueue_wait_replicas=1)
    payload = {"n": BRANCHES, "hops": 2, "fan_at": FAN_AT, "step_sleep_s": 0.05}
    runs = 5
    try:
        with Client(settings=settings) as client:
            roots = client.enqueue_many("splitter", [payload] * runs)
            wait_until(lambda: raw.llen("step_ends") >= 50, 60, "the branches to get going")
            next(n for n in cluster.nodes if n.port == victim).stop(sig_kill=True)
            killed_at = time.monotonic()
            wait_until(lambda: cluster.owner_port(slot("step")) != victim, 30, "a promotion")
            record_property("promoted_after_s", round(time.monotonic() - killed_at, 2))
            results = {root: client.result(root, 120, follow=True) for root in roots}
            record_property("runs_ended_after_s", round(time.monotonic() - killed_at, 2))
        by_run = merges_by_run(raw)
        for root in roots:
            [record] = by_run[root]  # exactly once
            check_every_end_seen(record)
            assert results[root]["merged"] == [
                [e["result"] for e in ends] for ends in record["branches"]
            ]
        assert sup.proc.poll() is None, sup.output()[-2000:]
    finally:
        sup.stop()
        raw.close()
