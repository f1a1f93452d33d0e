"""Sentinel failover: workers follow the new primary on their own; WAIT 1 loses nothing.

Each test starts its own primary + replica + 3 sentinels (tests/topologies.py, about a
second) and stops them at the end. The test agents record what ran in this xdist
worker's own server (TEST_REDIS_URL), which no failover touches.
"""

from __future__ import annotations

import pytest
import redis

from core.errors import RedisUnavailable

from failover import kill_a_primary_under_load, record
from procs import wait_until
from topologies import free_tcp_port, start_sentinel_group


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
