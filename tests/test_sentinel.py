"""Sentinel failover: workers follow the new primary on their own; WAIT 1 loses nothing.

Each test starts its own primary + replica + 3 sentinels (harness/topologies.py, about a
second) and stops them at the end. The test agents record what ran in this xdist
worker's own server (TEST_REDIS_URL), which no failover touches.
"""

from __future__ import annotations

import pytest
import redis

from handoff.client import Client
from handoff.config import RedisPoolConfig, Settings
from handoff.errors import NotReplicated, RedisUnavailable
from harness.failover import kill_a_primary_under_load, record
from harness.faultproxy import FaultProxy
from harness.procs import wait_until
from harness.topologies import HOST, free_tcp_port, start_sentinel_group


@pytest.fixture
def group(tmp_path):
    group = start_sentinel_group(tmp_path / "sentinel")
    yield group
    group.stop()


def test_a_graceful_failover_sends_the_next_write_to_the_new_primary(group, make_manager):
    """The old primary lives on as a replica: a pooled connection to it meets READONLY,
    is dropped, and the call is repeated on the primary the sentinels name now."""
    manager = make_manager(group.url, min_idle_conns=2, health_check_interval_s=60)
    assert manager.execute(lambda c: c.set("before", 1))
    old = group.primary_port()
    # Sentinel promotes without waiting for the replica to catch up: let it, first.
    (replica,) = [s.port for s in group.servers if s.port != old]
    wait_until(lambda: _get(replica, "before") == b"1", 10, "the replica to have the write")
    sentinel = redis.Redis(port=group.sentinels[0].port)
    sentinel.execute_command("SENTINEL", "FAILOVER", group.service)
    sentinel.close()
    new = group.wait_failover(old)
    wait_until(lambda: _role(old) == "slave", 15, "the old primary to become a replica")
    assert manager.execute(lambda c: c.set("after", 1))  # no error reaches the caller
    assert manager.execute(lambda c: c.get("before")) == b"1"
    check = redis.Redis(port=new)
    assert check.get("after") == b"1"
    check.close()


def _get(port: int, key: str) -> bytes | None:
    client = redis.Redis(port=port)
    try:
        return client.get(key)
    finally:
        client.close()


def _role(port: int) -> str:
    client = redis.Redis(port=port)
    try:
        return client.info("replication")["role"]
    finally:
        client.close()


@pytest.mark.timeout(180)
def test_killing_the_primary_mid_run_loses_no_enqueue_acknowledged_with_wait_1(
    group, start, record_property
):
    """SIGKILL the primary under load. Workers reconnect to the promoted replica with no
    operator action; every enqueue the producer was told succeeded (WAIT 1 confirmed it
    on the replica) is done in the end."""
    killed: list[int] = []
    run = kill_a_primary_under_load(
        group.url,
        start,
        kill=lambda: killed.append(group.kill_primary()),
        promoted=lambda: group.wait_failover(killed[0]),
    )
    assert run.acknowledged >= 300
    record(run, record_property)


def test_no_sentinel_answering_is_one_short_line_naming_them_and_the_service(make_manager):
    url = f"redis+sentinel://127.0.0.1:{free_tcp_port()}/nosuch"
    manager = make_manager(url, max_retries=1, min_idle_conns=0)
    with pytest.raises(RedisUnavailable) as caught:
        manager.execute(lambda c: c.ping())
    message = str(caught.value)
    assert "\n" not in message and len(message) < 400, message  # no client reprs
    assert "names a primary for service 'nosuch'" in message


@pytest.mark.parametrize("wait_replicas", [0, 1])
def test_with_a_lagging_replica_wait_1_turns_would_be_losses_into_refusals(
    group, wait_replicas, record_property
):
    """The replica's link to the primary goes through a fault proxy; it stalls, the
    producer enqueues 200 more tasks, the primary dies and the lagging replica is
    promoted. Without WAIT the producer was told all 200 succeeded and they are gone;
    with WAIT 1 it was told none did (NotReplicated), so nothing it was promised is lost."""
    primary = group.primary_port()
    (replica,) = [s.port for s in group.servers if s.port != primary]
    with FaultProxy((HOST, primary)) as proxy:
        _command(replica, "REPLICAOF", HOST, proxy.port)
        wait_until(lambda: _link_up_through(replica, proxy.port), 10, "the link via the proxy")
        settings = Settings(
            redis=RedisPoolConfig(url=group.url),
            enqueue_wait_replicas=wait_replicas,
            enqueue_wait_timeout_ms=100,
        )
        with Client(settings=settings) as producer:
            settled = producer.enqueue_many("probe", [{}] * 100)
            wait_until(lambda: _stored(replica, settled) == 100, 10, "the replica to have 100")
            proxy.blackhole()  # the replica stops hearing from the primary
            told_ok, refused = [], 0
            for _ in range(20):
                try:
                    told_ok += producer.enqueue_many("probe", [{}] * 10)
                except NotReplicated:
                    refused += 1
        old = group.kill_primary()
        new = group.wait_failover(old)
    assert new == replica
    lost = len(told_ok) - _stored(new, told_ok)
    record_property("acknowledged_after_the_stall", len(told_ok))
    record_property("lost", lost)
    assert _stored(new, settled) == 100
    if wait_replicas:
        assert (told_ok, refused, lost) == ([], 20, 0)
    else:
        assert (len(told_ok), refused, lost) == (200, 0, 200)


def _command(port: int, *args):
    client = redis.Redis(port=port)
    try:
        return client.execute_command(*args)
    finally:
        client.close()


def _link_up_through(replica: int, proxy_port: int) -> bool:
    info = _command(replica, "INFO", "replication")
    return info.get("master_port") == proxy_port and info.get("master_link_status") == "up"


def _stored(port: int, ids: list[str]) -> int:
    """How many of ids the server at port holds (HEXISTS on the agent's task hash)."""
    client = redis.Redis(port=port)
    try:
        pipe = client.pipeline(transaction=False)
        for task_id in ids:
            pipe.hexists("handoff:{probe}:tasks", task_id)
        return sum(pipe.execute())
    finally:
        client.close()


def test_an_async_client_follows_a_graceful_failover(group):
    """AsyncClient on Sentinel: it enqueues through the primary the sentinels name, and
    after a failover its next calls reach the new one with no error for the caller."""
    import asyncio

    from handoff import AsyncClient

    client = AsyncClient(settings=Settings(redis=RedisPoolConfig(url=group.url)))
    old = group.primary_port()
    (replica,) = [s.port for s in group.servers if s.port != old]

    async def before() -> str:
        task_id = await client.enqueue("probe", {"n": 1})
        assert await client.status(task_id) == "queued"
        return task_id

    async def after(first: str) -> None:
        second = await client.enqueue("probe", {"n": 2})
        assert await client.status(first) == "queued"
        assert await client.status(second) == "queued"
        await client.close()

    loop = asyncio.new_event_loop()
    try:
        first = loop.run_until_complete(before())
        wait_until(lambda: _stored(replica, [first]) == 1, 10, "the replica to have it")
        sentinel = redis.Redis(port=group.sentinels[0].port)
        sentinel.execute_command("SENTINEL", "FAILOVER", group.service)
        sentinel.close()
        group.wait_failover(old)
        wait_until(lambda: _role(old) == "slave", 15, "the old primary to become a replica")
        loop.run_until_complete(after(first))
    finally:
        loop.close()
