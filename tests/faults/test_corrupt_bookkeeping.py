"""Bookkeeping someone overwrote in Redis: every script, every field it reads.

For each script and each bookkeeping field it reads, six tasks are put in the state the
script works on, one task's field is overwritten with text, and the script runs: it must
not fail, the damaged task must be dead-lettered with a reason naming the field, and its
five neighbours must end where the script puts them. Redis does not roll a failed script
back, so a script that fails half way leaves tasks in no state at all; these tests show
no script does. The table of what each script reads is checked against the scripts.

Time is virtual (every script takes now_ms), except for release and dead_requeue, which
read the server clock only to date a dead letter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import orjson
import pytest

from handoff.client import Client
from handoff.config import RedisPoolConfig, Settings
from handoff.connection.manager import RedisManager
from handoff.errors import TaskDead
from handoff.protocol import scripts
from handoff.protocol.keys import Keys
from handoff.protocol.queue import ClaimRequest, Completion, Failure, TaskQueue
from handoff.protocol.task import Task, new_task_id, now_ms
from handoff.protocol.waits import park_plan, resume_plan, tick_plan, wait_record

BACKENDS = ("server", "cluster")

AGENT = "a"
KEYS = Keys().agent(AGENT)
T0 = 1_800_000_000_000
LEASE_MS = 10_000
GARBAGE = "garbage\u2603"

# The bookkeeping numbers each script reads before writing, by hash. A script missing
# here, or a field read by a script without a scenario below, fails the coverage test.
READS: dict[str, set[str]] = {
    "enqueue": set(),
    "enqueue_ready": set(),  # a plain task: checks the id is new, reads no counter
    "claim": {"deliveries", "failures", "scores"},  # scores: promoting and reaping
    "ack": set(),
    "nack": {"failures"},
    "release": {"deliveries", "scores"},
    "extend": set(),
    "reap": {"scores"},
    "dead_requeue": {"scores"},
    "dead_purge": set(),
    "scope": set(),  # reads no task counter; a run's or join's own fields: SCOPE_DAMAGE
    "follow": set(),
    "await": set(),
    "cancel": set(),  # reads no counters: it ends tasks and forgets them
    "step": set(),  # a step's store: checks the lease token, reads no counter
    "rerun": set(),  # reopens scopes: SCOPE_DAMAGE covers a run's and a join's fields
    "restore": set(),  # writes a cancelled task back from its record, reads no counter
    "conflict": set(),  # a repeated key: reads the task by its key, no counter
    "wait": set(),  # parks then-tasks: writes their scores, reads none
    "wait_resume": {"scores"},  # a resumed task goes back to its place
    "wait_tick": {"scores"},  # a timed-out task goes back to its place
    "wait_register": set(),  # the events' slot: no task counters
    "signal": set(),
    "send": set(),  # a message: checks the task exists, reads no counter
}


@pytest.fixture
def queue(redis_url) -> Iterator[TaskQueue]:
    settings = Settings(redis=RedisPoolConfig(url=redis_url))
    q = TaskQueue(RedisManager(settings.redis, background=False), settings)
    yield q
    q.manager.close()


def six_tasks(q: TaskQueue) -> list[Task]:
    tasks = [
        Task(id=new_task_id(AGENT, T0), agent=AGENT, payload={"n": i}, created_at=T0,
             enqueued_at=T0)
        for i in range(6)
    ]  # fmt: skip
    q.enqueue(tasks, now_ms=T0)
    return tasks


def claim_all(q: TaskQueue, now: int = T0) -> list[Task]:
    return q.claim([ClaimRequest(AGENT, 10, LEASE_MS)], now_ms=now)[AGENT]


# -- getting six tasks into the state a script works on ----------------------------------


def queued(q: TaskQueue) -> list[Task]:
    return six_tasks(q)


def leased(q: TaskQueue) -> list[Task]:
    six_tasks(q)
    return claim_all(q)


def expired(q: TaskQueue) -> list[Task]:
    return leased(q)  # the operation runs after the lease deadline


def delayed_due(q: TaskQueue) -> list[Task]:
    tasks = leased(q)
    q.nack([Failure(t, "flaky", retry_delay_s=0.001) for t in tasks], now_ms=T0)
    return tasks  # due one to two ms later


def dead(q: TaskQueue) -> list[Task]:
    tasks = leased(q)
    q.nack([Failure(t, "broken", dead_now=True) for t in tasks], now_ms=T0)
    return tasks


LATER = T0 + LEASE_MS + 1_000  # past every lease and every retry delay


def parked(q: TaskQueue) -> list[Task]:
    """Six then-tasks of Waits, parked on one event; their timeouts passed a second ago."""
    since = now_ms() - 10_000
    tasks = [
        Task(id=new_task_id(AGENT, T0), agent=AGENT, payload={"n": i}, created_at=T0,
             enqueued_at=T0, wait=wait_record("ev", "continue", 9.0, since))
        for i in range(6)
    ]  # fmt: skip
    assert all(q.run(park_plan(q, tasks)))
    r = q.manager.client  # both sets hold every parked wait, waiting_since by when parked
    assert r.zcard(KEYS.waiting) == 6
    assert r.zrange(KEYS.waiting_since, 0, -1, withscores=True) == sorted(
        (t.id.encode(), float(since)) for t in tasks
    )
    return tasks


def resume_all(q: TaskQueue, tasks: list[Task]) -> object:
    return q.run(resume_plan(q, [(f"f{i}", AGENT, t.id, b"1") for i, t in enumerate(tasks)]))


@dataclass(frozen=True)
class Scenario:
    script: str
    field: str
    setup: Callable[[TaskQueue], list[Task]]
    run: Callable[[TaskQueue, list[Task]], object]
    neighbours_end: str  # the state the five undamaged tasks end in


SCENARIOS = [
    Scenario("claim", "deliveries", queued, lambda q, _: claim_all(q), "leased"),
    Scenario("claim", "failures", queued, lambda q, _: claim_all(q), "leased"),
    Scenario("claim", "scores", delayed_due, lambda q, _: claim_all(q, LATER), "leased"),
    Scenario("claim", "scores", expired, lambda q, _: claim_all(q, LATER), "leased"),
    Scenario(
        "nack",
        "failures",
        leased,
        lambda q, ts: q.nack([Failure(t, "flaky", retry_delay_s=60) for t in ts], now_ms=T0),
        "delayed",
    ),
    Scenario("release", "deliveries", leased, lambda q, ts: q.release(ts), "queued"),
    Scenario("release", "scores", leased, lambda q, ts: q.release(ts), "queued"),
    Scenario("reap", "scores", expired, lambda q, _: q.reap([AGENT], now_ms=LATER), "queued"),
    Scenario("reap", "scores", delayed_due, lambda q, _: q.reap([AGENT], now_ms=LATER), "queued"),
    Scenario("wait_resume", "scores", parked, resume_all, "queued"),
    Scenario(
        "wait_tick", "scores", parked, lambda q, _: q.run(tick_plan(q, [AGENT], 60_000)), "queued"
    ),
    Scenario(
        "dead_requeue",
        "scores",
        dead,
        lambda q, _: Client(settings=q.settings).dead_requeue(AGENT),
        "queued",
    ),
]


def states(r) -> dict[str, str]:
    """Every task id the agent's sorted sets hold -> its state; fails on one in two."""
    seen: dict[str, str] = {}
    for state, key in (("queued", KEYS.queue), ("delayed", KEYS.delayed),
                       ("leased", KEYS.leases), ("dead", KEYS.dead)):  # fmt: skip
        for member in r.zrange(key, 0, -1):
            task_id = member.decode()
            assert task_id not in seen, f"{task_id} is {seen[task_id]} and {state}"
            seen[task_id] = state
    return seen


def test_every_script_and_every_field_it_reads_has_a_scenario():
    assert set(READS) == set(scripts.NAMES)
    covered = {(s.script, s.field) for s in SCENARIOS}
    assert covered == {(script, field) for script, fields in READS.items() for field in fields}
    for script, fields in READS.items():  # the table is not stale: each field is read there
        source = scripts.source(script)
        for field in fields:
            assert f"'{field}'" in source or f"K_{field.upper()}" in source, (script, field)


@pytest.mark.parametrize(
    "scenario", SCENARIOS, ids=lambda s: f"{s.script}-{s.field}-{s.setup.__name__}"
)
def test_a_corrupt_field_dead_letters_its_task_and_spares_the_neighbours(
    queue, raw_redis, scenario
):
    tasks = scenario.setup(queue)
    victim, neighbours = tasks[0], tasks[1:]
    raw_redis.hset(getattr(KEYS, scenario.field), victim.id, GARBAGE)
    scenario.run(queue, tasks)
    now = states(raw_redis)
    assert now.get(victim.id) == "dead", now
    reason = orjson.loads(raw_redis.hget(KEYS.dead_reasons, victim.id))["reason"]
    assert reason.startswith(f"corrupt bookkeeping: {scenario.field}[{victim.id}] = garbage")
    assert {now.get(t.id) for t in neighbours} == {scenario.neighbours_end}, now
    assert int(raw_redis.hget(KEYS.stats, "corrupt")) == 1
    if scenario.setup is parked:  # every wait, the damaged one too, left both sets in step
        assert raw_redis.zcard(KEYS.waiting) == raw_redis.zcard(KEYS.waiting_since) == 0
    # Requeued from the dead letters, the victim runs like any other task.
    assert Client(settings=queue.settings).dead_requeue(AGENT, [victim.id]) == [victim.id]
    assert states(raw_redis)[victim.id] == "queued"


def test_corrupt_counters_in_the_stats_hash_stop_no_script(queue, raw_redis):
    """Every counter overwritten with text: a whole life cycle still runs, and each
    counter starts again from what happened after."""
    for name in ("enqueued", "done", "failed", "retried", "dead", "reaped", "stale_acks",
                 "handed_off", "orphans", "corrupt"):  # fmt: skip
        raw_redis.hset(KEYS.stats, name, GARBAGE)
    client = Client(settings=queue.settings)
    assert client.queue_stats([AGENT])[AGENT]["done"] == 0  # views read garbage as 0
    six_tasks(queue)
    first = claim_all(queue)
    queue.ack([Completion(t) for t in first[:2]], now_ms=T0)
    queue.ack([Completion(first[0])], now_ms=T0)  # stale
    queue.nack([Failure(first[2], "flaky", retry_delay_s=0.001)], now_ms=T0)
    queue.nack([Failure(first[3], "broken", dead_now=True)], now_ms=T0)
    queue.reap([AGENT], now_ms=LATER)
    assert states(raw_redis) == {
        first[2].id: "queued", first[3].id: "dead", first[4].id: "queued", first[5].id: "queued"
    }  # fmt: skip
    stats = {k.decode(): v.decode() for k, v in raw_redis.hgetall(KEYS.stats).items()}
    assert stats["enqueued"] == "6" and stats["done"] == "2" and stats["stale_acks"] == "1"
    assert stats["failed"] == "2" and stats["dead"] == "1" and stats["reaped"] == "2"


# -- runs and joins: their scopes, in real worker processes -------------------------------

# How a run's or a join's state is overwritten (the scope hash, or its ends string), and
# the start of the reason the damaged run's end gives. The reviewer's cases: n as text
# fired the then-task after 1 of 5 ends; n = -1 before any; a scope replaced by a string
# stopped every ack of the run ("lost the lease") and the run never ended; the run's own
# n as text left result(follow=True) waiting forever.
SCOPE_DAMAGE = {
    "join-n-text": ("join", lambda r, k: r.hset(k, "n", "abc"), "{scope} n = abc is not a count"),
    "join-n-negative": ("join", lambda r, k: r.hset(k, "n", -1), "{scope} n = -"),
    "join-n-short": ("join", lambda r, k: r.hset(k, "n", 2), "{scope} n = 0 but 3 of its"),
    "join-scope-string": (
        "join", lambda r, k: (r.delete(k), r.set(k, "x")), "{scope} is a string, not a hash"
    ),
    "join-ends-list": (
        "join", lambda r, k: r.rpush(k.replace(":scope:", ":ends:"), "x"), "ends:"
    ),
    "join-branch-count-text": (
        "join", lambda r, k: r.hset(k, "c:0", "abc"), "{scope} c:0 = abc is not a count"
    ),
    "join-task-state-text": (  # (then: "= x is not 0 or 1")
        "join", lambda r, k: r.hset(k, _open_task(r, k), "x"), "{scope} t:step."
    ),
    "run-n-text": ("run", lambda r, k: r.hset(k, "n", "abc"), "{scope} n = abc is not a count"),
}  # fmt: skip
# What scope_fault (lua/lib/*.lua) checks, each damaged by a case above.
SCOPE_CHECKS = {"n = ": "n", "c:": "c:0", "t:": "t:step.", "not a hash": "not a hash",
                "not a string": "ends:"}  # fmt: skip


def _open_task(r, key: str) -> str:
    return next(f.decode() for f, v in r.hgetall(key).items() if f.startswith(b"t:") and v == b"1")


def test_every_check_of_a_scope_has_a_case():
    fault = scripts.source("scope").split("local function scope_fault", 1)[1].split("\nend\n")[0]
    for check, case_text in SCOPE_CHECKS.items():
        assert check.strip() in fault, check
        assert any(case_text in reason for _, _, reason in SCOPE_DAMAGE.values()), check


@pytest.mark.backends("server", "cluster")
@pytest.mark.parametrize("damage", SCOPE_DAMAGE)
def test_an_overwritten_run_or_join_ends_dead_naming_it_and_nothing_else_stops(
    start, redis_url, raw_redis, monkeypatch, damage
):
    """A 5-branch join whose state someone overwrote once it opened: its then-task never
    runs early or late but is dead-lettered naming the field (or the run, when its own
    scope was hit, ends dead naming it); result(follow=True) says so at once; a healthy run
    beside it ends as usual, and no worker's ack fails."""
    from harness.procs import wait_until

    monkeypatch.setenv("TEST_REDIS_URL", redis_url)
    which, overwrite, reason = SCOPE_DAMAGE[damage]
    client = Client(redis_url)
    keys = Keys()
    hit = client.enqueue("splitter", {"n": 5})
    healthy = client.enqueue("splitter", {"n": 2})
    procs = [start(["worker", "splitter"], app="apps.flows")]
    then = {}
    for root in (hit, healthy):
        wait_until(lambda: client.status(root) == "done", 20, "the splitter's join")  # noqa: B023
        then[root] = client.result(root)["join"]["then"]
    scope_id = then[hit] if which == "join" else hit
    scope_key = keys.agent(scope_id.split(".")[0]).scope(scope_id)
    assert raw_redis.hget(scope_key, "n") in (b"1", b"5")  # open, nothing ended yet
    overwrite(raw_redis, scope_key)
    procs += [start(["worker", name], app="apps.flows") for name in ("step", "merge")]
    assert client.result(healthy, 20, follow=True) == {"merged": [[{"i": 0}], [{"i": 1}]]}
    with pytest.raises(TaskDead) as e:
        client.result(hit, 20, follow=True)
    assert f"corrupt bookkeeping: {reason.format(scope=f'scope:{scope_id}')}" in str(e.value)
    merged = [orjson.loads(m)["run"] for m in raw_redis.lrange("merged", 0, -1)]
    if which == "join":  # the then-task was dead-lettered, never run
        assert client.status(then[hit]) == "dead" and merged == [healthy]
        assert client.dead_reason(then[hit]).startswith("corrupt bookkeeping: ")
    assert int(raw_redis.hget(keys.agent(scope_id.split(".")[0]).stats, "corrupt")) == 1
    for proc in procs:
        assert "ack failed" not in proc.output() and "lost the lease" not in proc.output()


# -- an agent's standing keys: outbox, limiter and group counts ---------------------------

# Keys no task owns, overwritten (another type, or a field that is not what the scripts
# keep there): the scripts set them right (counted as corrupt) and go on. key kind ->
# its name in the scripts; each kind has a case below.
STANDING = {"outbox": "K_OUTBOX", "limits": "K_LIMITS", "group_running": "K_GROUP_RUNNING",
            "glimit": "'glimit'"}  # fmt: skip
STANDING_DAMAGE = {
    "outbox-string": ("step", "outbox", lambda r, k: r.set(k, "x")),
    "outbox-values": (
        "step", "outbox", lambda r, k: r.hset(k, mapping={"a": "junk", "b": "1\x1fE\x1fjunk"})
    ),
    "limits-string": ("capped", "limits", lambda r, k: r.set(k, "x")),
    "limits-counters": (
        "capped", "limits", lambda r, k: r.hset(k, mapping={"turn": "x", "grouped_ready": "x"})
    ),
    "group_running-text": ("capped", "group_running", lambda r, k: r.hset(k, "g1", "x")),
    "group_running-string": ("capped", "group_running", lambda r, k: r.set(k, "x")),
    "glimit-string": ("paced", "glimit", lambda r, k: r.set(k, "x")),
}  # fmt: skip


def test_every_standing_key_kind_has_a_case_and_the_scripts_guard_it():
    assert {kind for _, kind, _ in STANDING_DAMAGE.values()} == set(STANDING)
    source = "".join(scripts.source(name) for name in scripts.NAMES)
    for name in STANDING.values():
        assert name in source, name


@pytest.mark.backends("server")
@pytest.mark.parametrize("damage", STANDING_DAMAGE)
def test_an_overwritten_standing_key_is_set_right_and_nothing_stops(
    redis_url, raw_redis, monkeypatch, damage
):
    """The key overwritten before any work: grouped tasks (a cap, a rate) all run and
    leave no count behind; a run whose end crosses slots through the outbox ends; the
    reaper delivers what is a notice and drops what is not."""
    from handoff.testing import InProcessApp

    monkeypatch.setenv("TEST_REDIS_URL", redis_url)
    agent, kind, overwrite = STANDING_DAMAGE[damage]
    keys = Keys().agent(agent)
    key = keys.base + ":glimit:g1" if kind == "glimit" else getattr(keys, kind)
    if kind == "group_running":  # a count to overwrite: one lease of g1's already held
        raw_redis.hset(key, "g1", 1)
    overwrite(raw_redis, key)
    outbox = kind == "outbox"
    app = InProcessApp(
        "apps.flows" if outbox else "apps.groups",
        redis_url,
        ["echo", "step"] if outbox else [agent],
    )
    try:
        if outbox:
            root = app.enqueue("echo", {"i": 7, "next": "step"})  # step reports to echo's slot
        else:
            app.client.enqueue_many(agent, [{"sleep_s": 0} for _ in range(4)], group="g1")
        for _ in range(8):  # (a group rate's next starts come due as the clock moves)
            app.run_until_idle()
            if outbox or app.client.queue_stats([agent])[agent]["done"] == 4:
                break
            app.clock.advance(1)
        app.queue.reap([agent], now_ms=app.clock.now_ms + 60_000)
        if outbox:
            assert app.client.result(root, 5, follow=True) == {"i": 7}
        else:
            assert app.client.queue_stats([agent])[agent]["done"] == 4
            assert not raw_redis.exists(keys.group_running, keys.group_queue("g1"))
    finally:
        app.close()
    assert raw_redis.type(key) in (b"hash", b"none")
    assert not raw_redis.hlen(keys.outbox)  # delivered, or dropped as no notice
    assert int(raw_redis.hget(keys.stats, "corrupt")) >= 1


@pytest.mark.backends("server")
def test_a_fired_then_task_whose_join_state_was_overwritten_is_dead_lettered_at_claim(
    redis_url, raw_redis, monkeypatch
):
    """The join fired (its then-task queued), then its scope was replaced by a string: the
    claim that takes the then-task dead-letters it naming the key, leases the others."""
    from handoff.testing import InProcessApp, VirtualClock

    monkeypatch.setenv("TEST_REDIS_URL", redis_url)
    clock = VirtualClock()
    branches = InProcessApp("apps.flows", redis_url, ["splitter", "step"], clock=clock)
    merge = InProcessApp("apps.flows", redis_url, ["merge"], clock=clock)
    try:
        hit, healthy = (branches.enqueue("splitter", {"n": n}) for n in (3, 2))
        branches.run_until_idle()
        then = branches.client.result(hit)["join"]["then"]
        assert branches.client.status(then) == "queued"
        scope_key = Keys().agent("merge").scope(then)
        raw_redis.delete(scope_key)
        raw_redis.set(scope_key, "x")
        merge.run_until_idle()
        assert merge.client.status(then) == "dead"
        reason = f"corrupt bookkeeping: scope:{then} is a string, not a hash"
        assert merge.client.dead_reason(then) == reason
        with pytest.raises(TaskDead, match=reason):
            merge.client.result(hit, 5, follow=True)
        assert merge.client.result(healthy, 5, follow=True) == {"merged": [[{"i": 0}], [{"i": 1}]]}
    finally:
        branches.close()
        merge.close()
