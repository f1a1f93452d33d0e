"""The Client API against a real server: status, result, idempotency, dead letters, and
validation that happens before anything is sent."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator

import orjson
import pytest

from handoff.client import Client, build_task
from handoff.config import RedisPoolConfig, Settings
from handoff.errors import InvalidAgentName, InvalidPayload, ResultTimeout, TaskDead, TaskRejected
from handoff.protocol.keys import Keys
from handoff.protocol.queue import ClaimRequest, Completion, Failure, TaskQueue
from handoff.protocol.task import PRIORITY_SHIFT
from harness.async_facade import either
from harness.procs import command_calls, wait_until

# Every test here runs on one server and on a 3-primary cluster (tests/conftest.py).
BACKENDS = ("server", "cluster")

LEASE_MS = 30_000


@pytest.fixture
def settings(redis_url) -> Settings:
    return Settings(redis=RedisPoolConfig(url=redis_url), max_payload_bytes=10_000)


@pytest.fixture(params=["Client", "AsyncClient"])
def client(request, settings) -> Iterator[Client]:
    """Each behaviour test runs on Client and on AsyncClient (driven from this thread by
    harness/async_facade.py): one test body, both clients."""
    with either(request.param, settings) as c:
        yield c


@pytest.fixture
def sync_client(settings) -> Iterator[Client]:
    """For what only Client does (dead letters, stats, a fork)."""
    with Client(settings=settings) as c:
        yield c


@pytest.fixture
def worker_queue(settings) -> Iterator[TaskQueue]:
    """A second, independent connection pool playing the worker."""
    from handoff.connection.manager import RedisManager

    q = TaskQueue(RedisManager(settings.redis, background=False), settings)
    yield q
    q.manager.close()


def claim_one(q: TaskQueue, agent: str = "a", now_ms: int | None = None):
    [task] = q.claim([ClaimRequest(agent, 1, LEASE_MS)], now_ms=now_ms)[agent]
    return task


def test_status_follows_a_task_through_every_state(client, worker_queue):
    tid = client.enqueue("a", {"x": 1}, max_attempts=2)
    assert client.status(tid) == "queued"
    task = claim_one(worker_queue)
    assert task.id == tid and client.status(tid) == "running"
    worker_queue.nack([Failure(task, "flaky", retry_delay_s=0.01)])
    assert client.status(tid) == "delayed"
    now = int(time.time() * 1000)
    worker_queue.reap(["a"], now_ms=now + 60_000)  # virtual clock: the backoff is over
    assert client.status(tid) == "queued"
    task = claim_one(worker_queue, now_ms=now + 60_000)
    assert task.attempt == 2
    worker_queue.ack([Completion(task, b'{"answer": 42}')])
    assert client.status(tid) == "done"
    assert client.result(tid, wait_s=0) == {"answer": 42}
    assert client.status("a.neverenqueued") == "unknown"


def test_a_delayed_task_reports_delayed(client):
    tid = client.enqueue("a", {}, delay_s=600)
    assert client.status(tid) == "delayed"


def test_result_waits_for_the_task_to_finish(client, worker_queue, raw_redis):
    tid = client.enqueue("a", {"q": "?"})
    task = claim_one(worker_queue)
    results: list = []
    waiter = threading.Thread(target=lambda: results.append(client.result(tid, wait_s=30)))
    waiter.start()
    watched = f"{client.queue.keys.agent('a').base}:watched:runs"
    # result() is really waiting on the running task: it has registered for its end.
    wait_until(lambda: raw_redis.zscore(watched, tid) is not None, 10, "the waiter")
    worker_queue.ack([Completion(task, b'"forty-two"')])
    waiter.join(30)
    assert results == ["forty-two"]


def test_a_result_waiter_blocks_in_redis_and_wakes_at_the_ack(client, worker_queue, raw_redis):
    """No polling: across 2 s of waiting the waiter has sent the await script and one
    blocking BLMOVE, nothing more, and it returns at the ack."""
    tid = client.enqueue("a", {})
    task = claim_one(worker_queue)
    got: dict = {}
    waiter = threading.Thread(target=lambda: got.update(value=client.result(tid, 30)))
    before = command_calls(raw_redis)
    waiter.start()
    watched = f"{client.queue.keys.agent('a').base}:watched:runs"
    wait_until(lambda: raw_redis.zscore(watched, tid) is not None, 10, "the waiter")
    time.sleep(2.0)  # the idle wait being measured, not a synchronisation
    during = command_calls(raw_redis)
    worker_queue.ack([Completion(task, b'"ok"')])
    waiter.join(10)
    assert got["value"] == "ok"
    sent = {name: during.get(name, 0) - before.get(name, 0) for name in ("evalsha", "blmove")}
    assert sent["evalsha"] == 1 and sent["blmove"] <= 1, sent  # polling would send dozens


def test_a_result_waiter_on_an_id_enqueued_later_answers_at_its_ack(
    client, worker_queue, raw_redis
):
    """A join's then-task id is known before it is enqueued: result() on it looks again
    until the task appears, and answers at its ack, not when wait_s runs out (it slept
    out the whole wait_s, up to 300 s a chunk, before)."""
    from handoff.protocol.task import derived_task_id

    tid = derived_task_id("a", "key", "later")
    got: dict = {}
    started = time.monotonic()
    before = command_calls(raw_redis).get("evalsha", 0)
    waiter = threading.Thread(target=lambda: got.update(value=client.result(tid, 120)))
    waiter.start()
    wait_until(lambda: command_calls(raw_redis).get("evalsha", 0) > before, 10, "a first look")
    assert client.enqueue("a", {}, key="later") == tid
    worker_queue.ack([Completion(claim_one(worker_queue), b'"ok"')])
    waiter.join(100)
    assert got.get("value") == "ok"
    assert time.monotonic() - started < 60  # at the ack, not at the end of wait_s


def test_result_raises_task_dead_with_the_reason(client, worker_queue):
    tid = client.enqueue("a", {})
    task = claim_one(worker_queue)
    worker_queue.nack([Failure(task, "KeyError: 'code'", traceback="Traceback...", dead_now=True)])
    with pytest.raises(TaskDead, match="KeyError: 'code'"):
        client.result(tid, wait_s=5)
    assert client.status(tid) == "dead"


def test_result_times_out_with_result_timeout(client):
    tid = client.enqueue("a", {})
    started = time.monotonic()
    with pytest.raises(ResultTimeout, match="still queued"):
        client.result(tid, wait_s=0.05)
    assert 0.05 <= time.monotonic() - started < 5
    with pytest.raises(TimeoutError):  # also a TimeoutError for callers who catch that
        client.result(tid, wait_s=0)


def test_an_idempotency_key_enqueues_once(client, raw_redis, worker_queue):
    keys = Keys().agent("a")
    first = client.enqueue("a", {"v": 1}, key="order-17")
    again = client.enqueue("a", {"v": 2}, key="order-17")
    assert first == again
    assert raw_redis.zcard(keys.queue) == 1
    assert orjson.loads(raw_redis.hget(keys.tasks, first))["payload"] == {"v": 1}
    # Still once after it ran: the done record remembers the key for the result TTL.
    worker_queue.ack([Completion(claim_one(worker_queue))])
    assert client.enqueue("a", {"v": 3}, key="order-17") == first
    assert raw_redis.zcard(keys.queue) == 0
    ids = client.enqueue_many("a", [{}, {}, {}], keys=["k1", "k2", "k1"])
    assert ids[0] == ids[2] != ids[1]
    assert raw_redis.zcard(keys.queue) == 2


def test_enqueue_many_keeps_fifo_order_and_priority(client, worker_queue):
    client.enqueue_many("a", [{"n": i} for i in range(5)], priority=1)
    urgent = client.enqueue("a", {"n": "urgent"}, priority=-1)
    got = worker_queue.claim([ClaimRequest("a", 10, LEASE_MS)])["a"]
    assert got[0].id == urgent
    assert [t.payload["n"] for t in got[1:]] == [0, 1, 2, 3, 4]


def test_a_bad_payload_in_a_batch_is_named_and_nothing_is_written(client, raw_redis):
    payloads = [{"n": 1}, {"n": 2}, {"big": "x" * 20_000}, {"n": 4}]
    with pytest.raises(TaskRejected, match=r"payloads\[2\]: .*over the max_payload_bytes") as e:
        client.enqueue_many("a", payloads)
    assert e.value.index == 2
    with pytest.raises(TaskRejected, match=r"payloads\[1\]: payload is not JSON"):
        client.enqueue_many("a", [{}, {"s": {1, 2}}])
    assert raw_redis.dbsize() == 0


def test_an_oversized_single_task_is_rejected(client, raw_redis):
    with pytest.raises(InvalidPayload, match="over the max_payload_bytes limit of 10000"):
        client.enqueue("a", "x" * 20_000)
    assert raw_redis.dbsize() == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"delay_s": -1},
        {"delay_s": math.nan},
        {"delay_s": math.inf},
        {"delay_s": "soon"},
        {"priority": 1001},
        {"priority": 1.5},
        {"priority": True},
        {"max_attempts": 0},
        {"timeout_s": -1},
        {"key": ""},
        {"key": "k" * 257},
    ],
)
def test_bad_task_options_are_rejected_before_anything_is_sent(client, raw_redis, kwargs):
    with pytest.raises(InvalidPayload):
        client.enqueue("a", {}, **kwargs)
    assert raw_redis.dbsize() == 0


def test_an_unknown_task_id_shape_is_rejected(client):
    with pytest.raises(InvalidPayload, match="invalid task id"):
        client.status("no-dot-here")
    with pytest.raises(InvalidAgentName):
        client.enqueue("Not Valid", {})


def test_dead_letters_list_requeue_and_purge(sync_client, worker_queue, raw_redis):
    keys = Keys().agent("a")
    ids = sync_client.enqueue_many("a", [{"n": i} for i in range(3)])
    tasks = worker_queue.claim([ClaimRequest("a", 3, LEASE_MS)])["a"]
    worker_queue.nack(
        [Failure(t, f"broken {t.payload['n']}", traceback="tb", dead_now=True) for t in tasks]
    )
    listed = sync_client.dead_list("a")
    assert [e["id"] for e in listed] == ids
    assert [e["reason"] for e in listed] == ["broken 0", "broken 1", "broken 2"]
    assert all(e["traceback"] == "tb" and e["payload_bytes"] > 0 for e in listed)

    assert sync_client.dead_requeue("a", [ids[1]]) == [ids[1]]
    assert sync_client.status(ids[1]) == "queued"
    task = claim_one(worker_queue)
    assert task.id == ids[1] and task.attempt == 1  # fresh attempts

    assert sync_client.dead_purge("a") == 2
    assert sync_client.dead_list("a") == []
    assert {sync_client.status(i) for i in (ids[0], ids[2])} == {"unknown"}
    assert not raw_redis.hexists(keys.tasks, ids[0])
    assert sync_client.dead_requeue("a") == [] and sync_client.dead_purge("a") == 0
    with pytest.raises(InvalidPayload, match="does not belong to agent"):
        sync_client.dead_purge("a", ["b.x1"])
    with pytest.raises(InvalidPayload, match="limit"):
        sync_client.dead_requeue("a", limit=0)


def test_task_and_queue_stats(sync_client, worker_queue):
    tid = sync_client.enqueue("a", {"k": "v"}, priority=3)
    sync_client.enqueue("a", {}, delay_s=600)
    info = sync_client.task(tid)
    assert info["status"] == "queued" and info["task"]["payload"] == {"k": "v"}
    assert info["task"]["priority"] == 3
    stats = sync_client.queue_stats()
    assert stats["a"]["queued"] == 1 and stats["a"]["delayed"] == 1
    assert stats["a"]["enqueued"] == 2
    worker_queue.ack([Completion(claim_one(worker_queue), b"7")])
    info = sync_client.task(tid)
    assert info["status"] == "done" and info["result"]["result"] == 7
    assert sync_client.queue_stats(["a"])["a"]["done"] == 1


def test_build_task_places_a_delayed_task_at_its_due_time():
    task = build_task("a", {}, priority=2, delay_s=1.5, at_ms=1_800_000_000_000)
    assert task.not_before == 1_800_000_001_500
    assert task.id.startswith("a.") and task.key is None
    assert build_task("a", {}, key="x").id == build_task("a", {}, key="x").id
    assert PRIORITY_SHIFT > 10 * 365 * 86_400_000


def test_a_client_made_before_fork_builds_its_own_pool_in_the_child(sync_client, raw_redis):
    import os

    tid = sync_client.enqueue("a", {})
    pid = os.fork()
    if pid == 0:  # the child: the inherited client must not reuse the parent's sockets
        code = 1
        try:
            code = 0 if sync_client.status(tid) == "queued" and sync_client.enqueue("a", {}) else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert sync_client.status(tid) == "queued"
    assert raw_redis.zcard(Keys().agent("a").queue) == 2
