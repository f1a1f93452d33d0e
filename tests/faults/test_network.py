"""Scenarios 6-8: the network between workers and Redis misbehaves (a TCP fault proxy)."""

from __future__ import annotations

import signal
import time

import orjson
import psutil
import pytest

from handoff.config import RedisPoolConfig, Settings
from handoff.connection.manager import RedisManager
from handoff.protocol.queue import ClaimRequest, TaskQueue
from harness.faultproxy import FaultProxy
from harness.procs import executions, stat, wait_until

from faults.checker import check

pytestmark = pytest.mark.slow

FAST_FAILING = {
    "redis_read_timeout_s": 1,
    "redis_write_timeout_s": 1,
    "redis_dial_timeout_s": 1,
    "redis_breaker_failure_threshold": 3,
    "redis_breaker_cooldown_s": 2,
    "redis_health_check_interval_s": 1,
}


def _worker_pid(sup) -> int:
    (child,) = wait_until(lambda: sup.live_children(), 15, "a worker")
    return child.pid


# The black hole lasts this long: enough for the breaker to open (within 10 s) and for its
# CPU share and log rate to be measured while open. The server's own outage is
# tests/faults/test_server.py's.
OUTAGE_S = 12


def test_black_hole_fails_fast_opens_the_breaker_and_recovers(
    start, client, raw_redis, redis_tcp_addr, record_property
):
    with FaultProxy(redis_tcp_addr) as proxy:
        ids = client.enqueue_many("probe", [{"n": i, "sleep_s": 0.02} for i in range(400)])
        sup = start(["supervise", "--agents", "probe=1"], url=proxy.url, **FAST_FAILING)
        worker = psutil.Process(_worker_pid(sup))
        wait_until(lambda: raw_redis.llen("executed") > 20, 30, "work to start")
        proxy.blackhole()
        holed_at = time.monotonic()
        cpu_before = worker.cpu_times()
        wait_until(lambda: "circuit breaker open" in sup.output(), 15, "the breaker to open")
        opened_after_s = time.monotonic() - holed_at
        time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - holed_at)))  # the outage itself
        cpu_after = worker.cpu_times()
        cpu_share = (cpu_after.user + cpu_after.system - cpu_before.user - cpu_before.system) / (
            time.monotonic() - holed_at
        )
        proxy.heal()
        wait_until(lambda: stat(client, "probe", "done") == 400, 60, "all done after healing")
        result = check(client, ids, executions(raw_redis))
        assert not result.lost and not result.unexpected, result.report()

        def breaker_closed() -> bool:
            fields = raw_redis.hgetall(f"handoff:worker:probe-{_host()}-{worker.pid}")
            return fields and orjson.loads(fields[b"pool"])["breaker"] == "closed"

        wait_until(breaker_closed, 15, "the worker to report a closed breaker")
        record_property("breaker_opened_after_s", round(opened_after_s, 2))
        record_property("cpu_share_while_open", round(cpu_share, 4))
        assert opened_after_s < 10  # calls time out (1 s each), they never hang
        assert cpu_share < 0.05
        errors = [line for line in sup.output().splitlines() if "ERROR" in line]
        assert len(errors) <= OUTAGE_S + 5  # about one line a second of the outage

        # And a stop during an outage is not blocked by a hung call either.
        proxy.blackhole()
        time.sleep(1.5)  # let calls get stuck in the black hole
        sent = time.monotonic()
        sup.signal(signal.SIGTERM)
        assert sup.wait(15) == 0
        assert time.monotonic() - sent < 4 + 1 + 3  # grace + read timeout + margin


def _host() -> str:
    import socket

    return socket.gethostname()


def test_latency_expires_no_lease_and_duplicates_nothing(start, client, raw_redis, redis_tcp_addr):
    with FaultProxy(redis_tcp_addr) as proxy:
        proxy.delay(200, jitter_ms=100)
        ids = client.enqueue_many("probe", [{"n": i, "sleep_s": 0.3} for i in range(30)])
        sup = start(["supervise", "--agents", "probe=2"], url=proxy.url)
        wait_until(lambda: stat(client, "probe", "done") == 30, 90, "30 done under latency")
        stats = client.queue_stats(["probe"])["probe"]
        assert stats["reaped"] == 0  # no lease expired
        result = check(client, ids, executions(raw_redis))
        assert not result.lost and not result.duplicated and not result.unexpected
        sup.signal(signal.SIGTERM)
        assert sup.wait(20) == 0


def _one_connection_queue(proxy: FaultProxy) -> tuple[RedisManager, TaskQueue]:
    """A queue on one connection through the proxy, connected (the handshake is behind
    it), so that the next reply the proxy drops is a claim's."""
    settings = Settings(redis=RedisPoolConfig(url=proxy.url, min_idle_conns=1, pool_size=1))
    manager = RedisManager(settings.redis, background=False)
    manager.execute(lambda c: c.ping())
    return manager, TaskQueue(manager, settings)


def test_claim_reply_lost_is_replayed_not_leased_twice(
    redis_url, redis_tcp_addr, client, record_property
):
    ids = client.enqueue_many("probe", [{"n": i} for i in range(10)])
    with FaultProxy(redis_tcp_addr) as proxy:
        manager, queue = _one_connection_queue(proxy)
        proxy.reset_after_upstream_reply(1)
        started = time.monotonic()
        claimed = queue.claim([ClaimRequest("probe", 10, lease_ms=60_000)])["probe"]
        took_s = time.monotonic() - started
        manager.close()
    assert sorted(t.id for t in claimed) == sorted(ids)  # the same batch came back
    record_property("claim_with_lost_reply_s", round(took_s, 3))
    assert took_s < 5  # nobody waited for the 60 s lease to expire
    stats = client.queue_stats(["probe"])["probe"]
    assert stats["running"] == 10 and stats["queued"] == 0
    deliveries = [client.task(i)["deliveries"] for i in ids]
    assert deliveries == [1] * 10  # leased once each


def test_a_claim_behind_a_wake_up_pop_whose_reply_is_lost_is_replayed(redis_tcp_addr, client):
    """An idle worker's pipeline (BLPOP on the wake list, the claim behind it): its reply
    lost, the claim is sent again alone with its claim id and gets the same batch back."""
    ids = client.enqueue_many("probe", [{"n": i} for i in range(10)])  # (and wake tokens)
    wake = client.queue.keys.agent("probe").wake
    with FaultProxy(redis_tcp_addr) as proxy:
        manager, queue = _one_connection_queue(proxy)
        proxy.reset_after_upstream_reply(1)
        request = ClaimRequest("probe", 10, lease_ms=60_000)
        claimed = queue.claim([request], after_pop=([wake], 5))["probe"]
        retried = len(manager.retry.backoff_schedule_s)
        manager.close()
    assert retried >= 1  # the reply really was lost: the claim went again
    assert sorted(t.id for t in claimed) == sorted(ids)
    stats = client.queue_stats(["probe"])["probe"]
    assert stats["running"] == 10 and stats["queued"] == 0
    assert [client.task(i)["deliveries"] for i in ids] == [1] * 10  # leased once each
