"""Sentinel failover: workers follow the new primary on their own; WAIT 1 loses nothing.

Each test starts its own primary + replica + 3 sentinels (tests/topologies.py, about a
second) and stops them at the end. The test agents record what ran in this xdist
worker's own server (TEST_REDIS_URL), which no failover touches.
"""

from __future__ import annotations

import threading
import time

import pytest
import redis
from topologies import start_sentinel_group

from config import RedisPoolConfig, Settings
from core.client import Client
from core.errors import HandoffError

from procs import wait_until


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
    settings = Settings(redis=RedisPoolConfig(url=group.url), enqueue_wait_replicas=1)
    sup = start(["supervise", "--agents", "probe=2"], url=group.url)
    acknowledged: list[str] = []
    refused: list[str] = []
    stop = threading.Event()

    def produce() -> None:
        with Client(settings=settings) as producer:
            while not stop.is_set():
                try:
                    acknowledged.extend(producer.enqueue_many("probe", [{"sleep_s": 0}] * 10))
                except HandoffError as e:  # unreachable, or not confirmed by the replica
                    refused.append(type(e).__name__)

    with Client(settings=settings) as client:
        producer = threading.Thread(target=produce)
        producer.start()
        try:
            wait_until(lambda: _done(client) >= 300, 30, "the workers to get going")
            old = group.kill_primary()
            killed_at = time.monotonic()
            group.wait_failover(old)
            promoted_after_s = time.monotonic() - killed_at
            done_at_failover = _done(client)
            wait_until(lambda: _done(client) > done_at_failover + 100, 60, "work to resume")
            resumed_after_s = time.monotonic() - killed_at
        finally:
            stop.set()
            producer.join(30)
        wait_until(
            lambda: all(s == "done" for s in _statuses(client, acknowledged)),
            60,
            "every acknowledged task to be done",
        )
    assert len(acknowledged) >= 300
    assert sup.proc.poll() is None  # the supervisor and its workers rode it out
    record_property("acknowledged", len(acknowledged))
    record_property("promoted_after_s", round(promoted_after_s, 2))
    record_property("resumed_after_s", round(resumed_after_s, 2))


def _done(client: Client) -> int:
    """Tasks done so far (-1 while the primary cannot be reached: mid-failover)."""
    try:
        return int(client.queue_stats(["probe"])["probe"]["done"])
    except HandoffError:
        return -1


def _statuses(client: Client, ids: list[str]) -> list[str]:
    return [client.status(task_id) for task_id in ids]
