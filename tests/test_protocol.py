"""The queue protocol against a real server: leases and tokens, claim replay, ordering,
round trips, poison and failure limits, the global cap, and bad data in Redis.

Time is virtual: every script takes now_ms, so lease expiry and delays are driven by the
test, never by sleeping.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import orjson
import pytest
import redis
import redis.exceptions as rex

from handoff.config import RedisPoolConfig, Settings
from handoff.connection.manager import RedisManager
from handoff.errors import HandoffError, InvalidPayload, NotReplicated
from handoff.protocol import scripts
from handoff.protocol.keys import Keys
from handoff.protocol.queue import ClaimRequest, Completion, Failure, TaskQueue
from handoff.protocol.task import Task, derived_task_id, new_task_id
from harness.faultproxy import FaultProxy

# Every test here runs on one server and on a 3-primary cluster (conftest.py).
BACKENDS = ("server", "cluster")

T0 = 1_800_000_000_000  # the virtual clock's start (ms)
LEASE_MS = 10_000


def make_queue(url: str, **overrides) -> TaskQueue:
    settings = Settings(redis=RedisPoolConfig(url=url), **overrides)
    return TaskQueue(RedisManager(settings.redis, background=False), settings)


@pytest.fixture
def queue(redis_url) -> Iterator[TaskQueue]:
    q = make_queue(redis_url)
    yield q
    q.manager.close()


def task(agent: str = "a", payload=None, *, priority: int = 0, at_ms: int = T0, **fields) -> Task:
    return Task(
        id=new_task_id(agent, at_ms),
        agent=agent,
        payload={"n": 0} if payload is None else payload,
        priority=priority,
        created_at=at_ms,
        enqueued_at=at_ms,
        **fields,
    )


def claim(q: TaskQueue, n: int, *, agent: str = "a", now: int = T0, **request) -> list[Task]:
    request.setdefault("lease_ms", LEASE_MS)
    return q.claim([ClaimRequest(agent, n, **request)], now_ms=now)[agent]


def members(r: redis.Redis, key: str) -> set[str]:
    return {m.decode() for m in r.zrange(key, 0, -1)}


# -- leases carry a token --------------------------------------------------------------------


def test_late_ack_with_an_old_token_after_a_reclaim_changes_nothing(queue, raw_redis):
    keys = Keys().agent("a")
    queue.enqueue([task()], now_ms=T0)
    [first] = claim(queue, 1, now=T0)
    # The lease expires; another worker claims the task again (the claim reaps it first).
    [second] = claim(queue, 1, now=T0 + LEASE_MS + 1)
    assert second.id == first.id and second.token != first.token
    before = {
        "leases": raw_redis.zrange(keys.leases, 0, -1, withscores=True),
        "tokens": raw_redis.hgetall(keys.tokens),
        "tasks": raw_redis.hgetall(keys.tasks),
    }

    assert queue.ack([Completion(first, b'"late"')], now_ms=T0 + LEASE_MS + 2) == [first.id]
    assert queue.extend([first], 60_000, now_ms=T0 + LEASE_MS + 2) == [first.id]
    assert queue.nack([Failure(first, "late", dead_now=True)], now_ms=T0 + LEASE_MS + 2) == [
        first.id
    ]
    assert queue.release([first]) == 0

    after = {
        "leases": raw_redis.zrange(keys.leases, 0, -1, withscores=True),
        "tokens": raw_redis.hgetall(keys.tokens),
        "tasks": raw_redis.hgetall(keys.tasks),
    }
    assert after == before
    assert raw_redis.exists(keys.result(first.id)) == 0
    assert raw_redis.zcard(keys.dead) == 0
    # The current holder still finishes normally.
    assert queue.ack([Completion(second, b'"ok"')], now_ms=T0 + LEASE_MS + 3) == []
    assert orjson.loads(raw_redis.get(keys.result(first.id)))["result"] == "ok"


def test_the_same_task_twice_in_one_ack_batch_finishes_once(queue, raw_redis):
    keys = Keys().agent("a")
    queue.enqueue([task()], now_ms=T0)
    [held] = claim(queue, 1, now=T0)
    assert queue.ack([Completion(held, b"1"), Completion(held, b"2")], now_ms=T0) == [held.id]
    assert raw_redis.hget(keys.stats, "done") == b"1"
    assert orjson.loads(raw_redis.get(keys.result(held.id)))["result"] == 1


def test_renewal_keeps_a_lease_alive_past_its_first_deadline(queue, raw_redis):
    queue.enqueue([task()], now_ms=T0)
    [held] = claim(queue, 1, now=T0)
    assert queue.extend([held], LEASE_MS, now_ms=T0 + LEASE_MS - 1) == []
    # At the old deadline nobody can take it: the renewal moved the deadline.
    assert claim(queue, 1, now=T0 + LEASE_MS + 1) == []
    assert queue.ack([Completion(held)], now_ms=T0 + LEASE_MS + 2) == []


# -- claim replay ----------------------------------------------------------------------------


def test_a_retried_claim_with_the_same_claim_id_returns_the_same_batch(queue, raw_redis):
    keys = Keys().agent("a")
    queue.enqueue([task(payload={"n": i}) for i in range(10)], now_ms=T0)
    request = ClaimRequest("a", 4, LEASE_MS, claim_id="c0ffee")
    first = queue.claim([request], now_ms=T0)["a"]
    again = queue.claim([request], now_ms=T0 + 1)["a"]
    assert [t.id for t in again] == [t.id for t in first]
    assert [t.payload for t in again] == [t.payload for t in first]
    assert raw_redis.zcard(keys.leases) == 4
    assert raw_redis.zcard(keys.queue) == 6
    # Deliveries were counted once.
    assert {int(v) for v in raw_redis.hvals(keys.deliveries)} == {1}
    # Once acked, a replay returns nothing and leases nothing new.
    queue.ack([Completion(t) for t in first], now_ms=T0 + 2)
    assert queue.claim([request], now_ms=T0 + 3)["a"] == []
    assert raw_redis.zcard(keys.leases) == 0 and raw_redis.zcard(keys.queue) == 6


@pytest.mark.parametrize("lost_replies", [1, 2])
@pytest.mark.parametrize("requests_per_call", [1, 2])
def test_a_claim_whose_reply_is_lost_is_retried_without_a_second_lease(
    redis_url, redis_tcp_addr, raw_redis, lost_replies, requests_per_call
):
    agents = ["a", "b"][:requests_per_call]
    with FaultProxy(redis_tcp_addr) as proxy:
        q = make_queue(proxy.url)
        try:
            for agent in agents:
                q.enqueue([task(agent, {"n": i}) for i in range(10)], now_ms=T0)
            q.manager.execute(lambda c: c.ping())  # connected: arm after the handshake
            proxy.reset_after_upstream_reply(lost_replies)
            got = q.claim([ClaimRequest(a, 4, LEASE_MS) for a in agents], now_ms=T0)
            assert proxy.connections_accepted > 1  # the reply really was lost and retried
        finally:
            q.manager.close()
    for agent in agents:
        keys = Keys().agent(agent)
        leased = members(raw_redis, keys.leases)
        # Every leased task came back to the caller: nothing waits for a lease to expire.
        assert {t.id for t in got[agent]} == leased
        assert len(got[agent]) == 4
        assert raw_redis.zcard(keys.queue) == 6
        assert {int(v) for v in raw_redis.hvals(keys.deliveries)} == {1}
        assert len({t.token for t in got[agent]}) == 1


def test_a_server_that_forgot_the_scripts_gets_them_again_and_nothing_doubles(queue, raw_redis):
    queue.enqueue([task("a", {"n": 1}), task("b", {"n": 1})], now_ms=T0)
    for node in _nodes(raw_redis):
        node.script_flush()  # a restarted server, or SCRIPT FLUSH: NOSCRIPT on the next call
        assert node.script_exists(scripts.sha("enqueue")) == [False]
    added = queue.enqueue([task("a", {"n": 2}), task("b", {"n": 2})], now_ms=T0 + 1)
    assert added == [True, True]
    for agent in ("a", "b"):
        assert raw_redis.zcard(Keys().agent(agent).queue) == 2
        assert int(raw_redis.hget(Keys().agent(agent).stats, "enqueued")) == 2


def test_a_single_plain_enqueue_after_a_script_flush_loads_the_scripts_and_adds_once(
    queue, raw_redis
):
    """One plain task of a known agent takes the direct path (one EVALSHA, no plan):
    NOSCRIPT there loads the scripts and sends it again; a repeat of the id adds nothing."""
    queue.enqueue([task("a", {"n": 1})])  # the agent is known from here on
    for node in _nodes(raw_redis):
        node.script_flush()
    again = task("a", {"n": 2})
    assert queue.enqueue([again]) == [True]
    assert queue.enqueue([again]) == [False]
    keys = Keys().agent("a")
    assert raw_redis.zcard(keys.queue) == 2
    assert int(raw_redis.hget(keys.stats, "enqueued")) == 2
    assert raw_redis.hexists(keys.tasks, again.id)


def _nodes(raw_redis) -> list:
    nodes = raw_redis.get_primaries() if hasattr(raw_redis, "get_primaries") else None
    return [n.redis_connection for n in nodes] if nodes else [raw_redis]


def test_an_enqueue_no_replica_confirms_raises_not_replicated_and_stays_written(
    redis_url, raw_redis
):
    q = make_queue(redis_url, enqueue_wait_replicas=1, enqueue_wait_timeout_ms=50)
    try:
        with pytest.raises(NotReplicated) as caught:
            q.enqueue([task("a", {"n": 1}), task("b", {"n": 1})], now_ms=T0)
    finally:
        q.manager.close()
    message = str(caught.value)
    assert "\n" not in message and "acknowledged by 0 of 1 replica(s) within 50 ms" in message
    for agent in ("a", "b"):  # written, on every node: WAIT cannot undo it
        assert raw_redis.zcard(Keys().agent(agent).queue) == 1


def test_an_enqueue_whose_reply_is_lost_stores_each_task_once(redis_url, redis_tcp_addr, raw_redis):
    with FaultProxy(redis_tcp_addr) as proxy:
        q = make_queue(proxy.url)
        try:
            q.manager.execute(lambda c: c.ping())
            scripts.load_all(q.manager.client)
            proxy.reset_after_upstream_reply(1)
            q.enqueue([task(payload={"n": i}) for i in range(50)], now_ms=T0)
        finally:
            q.manager.close()
    keys = Keys().agent("a")
    assert raw_redis.zcard(keys.queue) == 50 and raw_redis.hlen(keys.tasks) == 50
    assert int(raw_redis.hget(keys.stats, "enqueued")) == 50


# -- ordering --------------------------------------------------------------------------------


def test_priorities_first_then_fifo_within_a_priority(queue):
    made = []
    for i in range(30):
        made.append(task(payload={"n": i}, priority=[5, -3, 0][i % 3], at_ms=T0 + i))
    # Enqueue out of order, in several calls: order comes from priority and enqueue time.
    queue.enqueue(made[10:], now_ms=T0 + 40)
    queue.enqueue(made[:10], now_ms=T0 + 40)
    got = claim(queue, 100, now=T0 + 50)
    expected = sorted(made, key=lambda t: (t.priority, t.enqueued_at))
    assert [t.payload["n"] for t in got] == [t.payload["n"] for t in expected]


def test_fifo_within_one_batch_enqueued_in_the_same_millisecond(queue):
    queue.enqueue([task(payload={"n": i}) for i in range(500)], now_ms=T0)
    got = claim(queue, 100, now=T0) + claim(queue, 100, now=T0)
    assert [t.payload["n"] for t in got] == list(range(200))


def test_delayed_tasks_never_run_before_their_time(queue, raw_redis):
    late = task(payload="late", priority=-10, not_before=T0 + 5_000)
    queue.enqueue([late], now_ms=T0)
    queue.enqueue([task(payload="now")], now_ms=T0)
    assert [t.payload for t in claim(queue, 10, now=T0)] == ["now"]
    assert claim(queue, 10, now=T0 + 4_999) == []
    assert [t.payload for t in claim(queue, 10, now=T0 + 5_000)] == ["late"]


def test_a_delayed_task_takes_its_fifo_place_at_its_due_time(queue):
    # Scheduled for T0+100: it must not jump ahead of tasks enqueued before it was due.
    queue.enqueue([task(payload="scheduled", not_before=T0 + 100)], now_ms=T0)
    queue.enqueue([task(payload="earlier", at_ms=T0 + 50)], now_ms=T0 + 50)
    queue.enqueue([task(payload="later", at_ms=T0 + 150)], now_ms=T0 + 150)
    got = claim(queue, 10, now=T0 + 200)
    assert [t.payload for t in got] == ["earlier", "scheduled", "later"]


def test_a_retried_task_waits_out_its_backoff(queue):
    queue.enqueue([task(payload="x")], now_ms=T0)
    [held] = claim(queue, 1, now=T0)
    assert queue.nack([Failure(held, "boom", retry_delay_s=2.0)], now_ms=T0) == []
    assert claim(queue, 1, now=T0 + 999) == []  # backoff is at least half the base delay
    [again] = claim(queue, 1, now=T0 + 2_000)
    assert again.id == held.id and again.attempt == 2


# -- round trips -----------------------------------------------------------------------------


class RoundTrips:
    """Counts send_packed_command calls on connections of one pool (instrumentation)."""

    def __init__(self, monkeypatch, q: TaskQueue) -> None:
        self.count = 0
        pool = q.manager.pool
        original = redis.connection.AbstractConnection.send_packed_command

        def counting(conn, command, check_health=True):
            if conn in pool._connections:
                self.count += 1
            return original(conn, command, check_health)

        monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)

    def __enter__(self) -> RoundTrips:
        self.count = 0
        return self

    def __exit__(self, *exc) -> None:
        pass


def test_ten_thousand_tasks_enqueue_in_one_round_trip(queue, raw_redis, monkeypatch):
    queue.enqueue([task("a", {"warm": True})], now_ms=T0)  # scripts loaded, agent registered
    trips = RoundTrips(monkeypatch, queue)
    batch = [task("a", {"n": i}) for i in range(10_000)]
    with trips:
        added = queue.enqueue(batch, now_ms=T0)
    assert trips.count == 1
    assert added == [True] * 10_000
    assert raw_redis.zcard(Keys().agent("a").queue) == 10_001


def test_calls_for_many_agent_types_take_one_round_trip_per_node(queue, raw_redis, monkeypatch):
    agents = [f"kind{i}" for i in range(9)]
    queue.enqueue([task(a) for a in agents], now_ms=T0)  # scripts loaded, agents registered
    if hasattr(raw_redis, "get_node_from_key"):  # a cluster: one pipeline per owning node
        nodes = {raw_redis.get_node_from_key(Keys().agent(a).queue).name for a in agents}
    else:
        nodes = {"the server"}
    assert len(agents) > len(nodes)
    trips = RoundTrips(monkeypatch, queue)
    with trips:
        queue.reap(agents, now_ms=T0)
    assert trips.count == len(nodes)
    requests = [ClaimRequest(a, 1, LEASE_MS, 0) for a in agents]
    with trips:
        claimed = queue.claim(requests, now_ms=T0)
    assert trips.count == len(nodes)
    assert sorted(claimed.tasks) == sorted(agents)


def test_claim_and_ack_of_a_hundred_take_one_round_trip_each(queue, monkeypatch):
    queue.enqueue([task("a", {"n": i}) for i in range(150)], now_ms=T0)
    claim(queue, 1)  # warm: scripts loaded
    trips = RoundTrips(monkeypatch, queue)
    with trips:
        got = claim(queue, 100)
    assert (trips.count, len(got)) == (1, 100)
    with trips:
        assert queue.ack([Completion(t, b'{"ok":true}') for t in got], now_ms=T0) == []
    assert trips.count == 1
    with trips:
        queue.nack([Failure(t, "x") for t in claim(queue, 40)], now_ms=T0)
    assert trips.count == 2


# -- poison and failure limits ---------------------------------------------------------------


def test_a_task_delivered_more_than_max_deliveries_times_is_dead_lettered(redis_url, raw_redis):
    q = make_queue(redis_url, max_deliveries=3)
    keys = Keys().agent("a")
    try:
        q.enqueue([task(payload="poison")], now_ms=T0)
        now = T0
        for _ in range(3):  # claimed; the worker dies each time; the lease expires
            assert len(claim(q, 1, now=now)) == 1
            now += LEASE_MS + 1
        assert claim(q, 1, now=now) == []
    finally:
        q.manager.close()
    [dead_id] = members(raw_redis, keys.dead)
    reason = orjson.loads(raw_redis.hget(keys.dead_reasons, dead_id))
    assert "poison" in reason["reason"] and "3 times" in reason["reason"]
    assert raw_redis.zcard(keys.queue) == raw_redis.zcard(keys.leases) == 0
    assert raw_redis.hexists(keys.tasks, dead_id)  # the payload is kept with the dead task


def test_released_deliveries_do_not_count_towards_poison(redis_url):
    q = make_queue(redis_url, max_deliveries=2)
    try:
        q.enqueue([task()], now_ms=T0)
        for _ in range(5):
            q.release(claim(q, 1))
        assert len(claim(q, 1)) == 1
    finally:
        q.manager.close()


def test_max_attempts_via_nack_dead_letters_with_the_error_and_traceback(queue, raw_redis):
    keys = Keys().agent("a")
    queue.enqueue([task(max_attempts=3)], now_ms=T0)
    now = T0
    for attempt in (1, 2, 3):
        [held] = claim(queue, 1, now=now)
        assert held.attempt == attempt
        dead = queue.nack(
            [Failure(held, f"ValueError: bad {attempt}", traceback="Traceback ...\nValueError")],
            now_ms=now,
        )
        assert dead == []
        now += 3_600_000
    [dead_id] = members(raw_redis, keys.dead)
    reason = orjson.loads(raw_redis.hget(keys.dead_reasons, dead_id))
    assert reason["reason"] == "ValueError: bad 3"
    assert reason["traceback"].startswith("Traceback")
    assert reason["attempt"] == 3
    assert raw_redis.zcard(keys.delayed) == raw_redis.zcard(keys.leases) == 0


# -- the plain claim's fast path ---------------------------------------------------------------


@pytest.mark.backends("server")
def test_a_plain_claim_takes_the_fast_path_and_anything_else_the_full_one(queue, raw_redis):
    """claim.lua leases plain tasks before its prelude is defined (an idle worker's pickup
    waits on that server time); the full claim reads the agent's limits (HGETALL): it
    runs only when something asks for it, here a live limit."""
    keys = Keys().agent("a")
    queue.enqueue([task(), task()], now_ms=T0)
    raw_redis.config_resetstat()
    held = claim(queue, 2, claim_id="c1")
    assert [(t.attempt, t.deliveries) for t in held] == [(1, 1), (1, 1)]
    assert "cmdstat_hgetall" not in raw_redis.info("commandstats")
    assert [t.id for t in claim(queue, 2, claim_id="c1")] == [t.id for t in held]  # replay
    raw_redis.hset(keys.limits, "rate", "none")  # a live limit, lifted: the full claim looks
    queue.enqueue([task()], now_ms=T0)
    raw_redis.config_resetstat()
    assert len(claim(queue, 1)) == 1
    assert raw_redis.info("commandstats")["cmdstat_hgetall"]["calls"] == 1
    assert raw_redis.zcard(keys.queue) == 0 and raw_redis.zcard(keys.leases) == 3


def _delivered_once(q: TaskQueue, t: Task, now: int) -> int:
    """t claimed and its lease let expire (its worker died); returns the time it is due
    to be reaped, which the next claim does."""
    q.enqueue([t], now_ms=now)
    assert [h.id for h in claim(q, 1, now=now)] == [t.id]
    return now + LEASE_MS + 1


def test_a_suspect_behind_plain_tasks_is_left_queued_and_the_plain_ones_leased(queue, raw_redis):
    keys = Keys().agent("a")
    suspect = task(payload="suspect")
    now = _delivered_once(queue, suspect, T0)
    assert claim(queue, 0, now=now) == []  # reaped: queued again, delivered once
    plain = [task(at_ms=T0 - 1000), task(at_ms=T0 - 999)]  # ahead of it in the queue
    queue.enqueue(plain, now_ms=now)
    request = ClaimRequest("a", 3, LEASE_MS, isolate_suspects=True, solo=False)
    result = queue.claim([request], now_ms=now)
    assert [t.id for t in result["a"]] == [t.id for t in plain]
    assert result.suspects_waiting["a"] is True
    assert members(raw_redis, keys.queue) == {suspect.id}
    assert raw_redis.hget(keys.deliveries, suspect.id) == b"1"
    [alone] = claim(queue, 3, now=now, isolate_suspects=True, solo=True)
    assert (alone.id, alone.deliveries) == (suspect.id, 2)


def test_a_poison_task_behind_a_plain_one_is_dead_lettered_and_the_plain_one_leased(
    redis_url, raw_redis
):
    q = make_queue(redis_url, max_deliveries=1)
    keys = Keys().agent("a")
    try:
        poison = task(payload="poison")
        now = _delivered_once(q, poison, T0)
        assert claim(q, 0, now=now) == []  # reaped
        plain = task(at_ms=T0 - 1000)
        q.enqueue([plain], now_ms=now)
        assert [t.id for t in claim(q, 2, now=now)] == [plain.id]
    finally:
        q.manager.close()
    assert members(raw_redis, keys.dead) == {poison.id}
    assert members(raw_redis, keys.leases) == {plain.id}


# -- the global cap --------------------------------------------------------------------------


def test_global_limit_caps_concurrent_leases_across_claims(queue, raw_redis):
    keys = Keys().agent("a")
    queue.enqueue([task(payload={"n": i}) for i in range(20)], now_ms=T0)
    assert len(claim(queue, 3, global_limit=5)) == 3
    assert len(claim(queue, 3, global_limit=5)) == 2
    assert claim(queue, 3, global_limit=5) == []
    assert raw_redis.zcard(keys.leases) == 5
    # Expired leases free their slots (the claim reaps them first).
    assert len(claim(queue, 10, global_limit=5, now=T0 + LEASE_MS + 1)) == 5
    assert raw_redis.zcard(keys.leases) == 5


def test_global_limit_holds_for_claims_racing_from_many_threads(redis_url, raw_redis):
    queues = [make_queue(redis_url) for _ in range(8)]
    try:
        queues[0].enqueue([task(payload={"n": i}) for i in range(100)], now_ms=T0)
        barrier = threading.Barrier(len(queues))
        got: list[int] = []

        def run(q: TaskQueue) -> None:
            barrier.wait()
            got.append(len(claim(q, 4, global_limit=7)))

        threads = [threading.Thread(target=run, args=(q,)) for q in queues]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for q in queues:
            q.manager.close()
    assert sum(got) == 7
    assert raw_redis.zcard(Keys().agent("a").leases) == 7


# -- handoff children ------------------------------------------------------------------------


def child_of(parent: Task, index: int = 0) -> Task:
    return Task(
        id=derived_task_id("b", parent.id, str(index)),
        agent="b",
        payload={"from": parent.id},
        created_at=T0,
        enqueued_at=T0,
        parent_id=parent.id,
        trace=[*parent.trace, parent.id],
    )


def test_a_repeated_parent_makes_no_second_child(queue, raw_redis):
    b = Keys().agent("b")
    queue.enqueue([task()], now_ms=T0)
    [parent] = claim(queue, 1, now=T0)
    assert queue.enqueue([child_of(parent)], now_ms=T0) == [True]
    # The worker dies before the parent's ack; the parent runs again elsewhere.
    [again] = claim(queue, 1, now=T0 + LEASE_MS + 1)
    assert queue.enqueue([child_of(again)], now_ms=T0 + LEASE_MS + 1) == [False]
    assert queue.ack([Completion(again, handoffs=1)], now_ms=T0 + LEASE_MS + 1) == []
    assert raw_redis.zcard(b.queue) == 1
    # Even after the child finished (its payload gone), a third run makes no new child.
    [child] = claim(queue, 1, agent="b", now=T0 + LEASE_MS + 2)
    queue.ack([Completion(child)], now_ms=T0 + LEASE_MS + 2)
    assert queue.enqueue([child_of(parent)], now_ms=T0 + LEASE_MS + 3) == [False]
    assert raw_redis.zcard(b.queue) == 0 and raw_redis.hlen(b.tasks) == 0


@pytest.mark.parametrize("result_ttl_s", [0, 3600])
def test_duplicate_protection_lasts_its_own_window_whatever_the_result_ttl(
    redis_url, raw_redis, result_ttl_s
):
    """Before: with result_ttl_s = 0 a rerun parent made its finished child again, and a
    finished idempotency key was accepted again. Now both are refused for dedupe_window_s
    after they finish, and accepted once it has passed (and been swept)."""
    q = make_queue(redis_url, result_ttl_s=result_ttl_s, dedupe_window_s=60)
    try:
        keyed = Task(id=derived_task_id("a", "key", "k"), agent="a", payload=1, key="k")
        q.enqueue([keyed, task()], now_ms=T0)
        parent, plain = claim(q, 2, now=T0)
        assert parent.id == keyed.id
        assert q.enqueue([child_of(parent)], now_ms=T0) == [True]
        [child] = claim(q, 1, agent="b", now=T0)
        assert q.ack([Completion(child), Completion(plain)], now_ms=T0) == []  # child done
        # The parent's lease is lost; it runs again and hands off the same child.
        later = T0 + LEASE_MS + 1
        [again] = claim(q, 1, now=later)
        assert q.enqueue([child_of(again)], now_ms=later) == [False]
        assert q.ack([Completion(again, handoffs=1)], now_ms=later) == []
        assert q.enqueue([keyed], now_ms=later + 1) == [False]  # the key finished: refused
        assert raw_redis.zcard(Keys().agent("a").finished) == 1  # plain ids cost nothing
        past = later + 60_001
        q.reap(["a", "b"], now_ms=past)  # sweeps ids past their window
        assert raw_redis.zcard(Keys().agent("a").finished) == 0
        assert q.enqueue([keyed], now_ms=past) == [True]
        assert q.enqueue([child_of(again)], now_ms=past) == [True]
    finally:
        q.manager.close()


def test_duplicate_ids_in_one_batch_report_the_first_as_added(queue):
    keyed = Task(id=derived_task_id("a", "key", "k"), agent="a", payload=1, key="k")
    assert queue.enqueue([keyed, keyed, task()], now_ms=T0) == [True, False, True]


# -- bad input -------------------------------------------------------------------------------


def test_an_oversized_task_is_rejected_client_side_with_nothing_written(redis_url, raw_redis):
    q = make_queue(redis_url, max_payload_bytes=1000)
    try:
        with pytest.raises(InvalidPayload, match="over the max_payload_bytes limit of 1000"):
            q.enqueue([task(payload="x" * 10), task(payload="y" * 1000)], now_ms=T0)
    finally:
        q.manager.close()
    assert raw_redis.dbsize() == 0


def test_the_enqueue_script_checks_the_size_too(queue, raw_redis):
    keys = Keys().agent("a")
    small, big = task(payload="ok"), task(payload="x" * 2_000)
    args = [1_000, T0, 2, 0]  # max bytes, now, n, none delayed or keyed
    for t in (small, big):
        args += [t.id, 0, t.to_json()]
    refused = (rex.ResponseError, HandoffError)  # translated at the manager's boundary
    with pytest.raises(refused, match=r"is \d+ bytes, over the limit of 1000 bytes"):
        queue.run_scripts([("enqueue", keys.all(), args)])
    assert raw_redis.hlen(keys.tasks) == 0 and raw_redis.zcard(keys.queue) == 0


@pytest.mark.parametrize(
    "garbage",
    [
        b"{not json",
        b"\xff\xfe",
        b"[1, 2, 3]",
        b'{"id": "a.x"}',
        b'{"id": "a.other", "agent": "a", "payload": 1}',
        b'{"id": "ID", "agent": "a", "payload": 1, "trace": 5}',
        b'{"id": "ID", "agent": "a", "payload": 1, "priority": "high"}',
    ],
)
def test_a_corrupted_task_is_dead_lettered_on_claim_and_its_neighbours_delivered(
    queue, raw_redis, garbage
):
    keys = Keys().agent("a")
    tasks = [task(payload={"n": i}) for i in range(5)]
    queue.enqueue(tasks, now_ms=T0)
    victim = tasks[2].id
    raw_redis.hset(keys.tasks, victim, garbage.replace(b"ID", victim.encode()))
    got = claim(queue, 10)
    assert [t.payload["n"] for t in got] == [0, 1, 3, 4]
    assert members(raw_redis, keys.dead) == {victim}
    reason = orjson.loads(raw_redis.hget(keys.dead_reasons, victim))
    assert reason["reason"].startswith("corrupt task JSON")
    assert members(raw_redis, keys.leases) == {t.id for t in got}
    assert queue.ack([Completion(t) for t in got], now_ms=T0) == []
    assert raw_redis.hkeys(keys.tasks) == [victim.encode()]  # kept for inspection


def test_a_queue_entry_with_a_malformed_id_does_not_break_the_claim(queue, raw_redis):
    keys = Keys().agent("a")
    queue.enqueue([task(payload={"n": 1})], now_ms=T0)
    raw_redis.zadd(keys.queue, {"no-dot": -1})
    raw_redis.hset(keys.tasks, "no-dot", b"{}")
    got = claim(queue, 10)
    assert [t.payload for t in got] == [{"n": 1}]
    assert members(raw_redis, keys.dead) == {"no-dot"}


def test_a_task_id_that_does_not_belong_to_its_agent_is_rejected(queue, raw_redis):
    stray = Task(id=new_task_id("b"), agent="a", payload=1)
    with pytest.raises(InvalidPayload, match="does not belong to agent 'a'"):
        queue.enqueue([stray])
    assert raw_redis.dbsize() == 0


def test_a_claim_id_that_is_not_a_plain_token_is_rejected(queue, raw_redis):
    for bad in ("a b", "x" * 200, "{c}", "c:1", "c*", "c\n"):
        with pytest.raises(InvalidPayload, match="claim_id"):
            queue.claim([ClaimRequest("a", 1, LEASE_MS, claim_id=bad)])
    assert raw_redis.dbsize() == 0
