"""A server at maxmemory (noeviction): enqueues are refused, and workers still drain it.

Filled with 2 KB tasks until an enqueue is refused, then one real worker process starts:
its claims, acks and lease renewals must go through at the limit (each frees memory), so
every accepted task is done, and enqueues are accepted again afterwards. With a 1 s lease
the same holds: no lease expires for want of a renewal, and the worker never stops
claiming. The monitor and the worker name the state: out of memory, not unreachable.
"""

from __future__ import annotations

import time

import pytest

from handoff.client import Client
from handoff.config import RedisPoolConfig, Settings
from handoff.connection.embedded_server import spawn_server
from handoff.connection.manager import RedisManager
from handoff.errors import ServerOutOfMemory
from handoff.observe.monitor import Monitor
from handoff.observe.view import problem_lines
from handoff.protocol.queue import TaskQueue
from harness.procs import HandoffProcess, handoff_env, wait_until

pytestmark = pytest.mark.slow

PAD = "x" * 2000


def fill(client: Client) -> int:
    """Enqueue 2 KB tasks until the server refuses; returns how many it accepted."""
    accepted = 0
    with pytest.raises(ServerOutOfMemory):
        for _ in range(100_000):
            accepted += len(client.enqueue_many("filler", [{"pad": PAD}] * 50))
    return accepted


@pytest.mark.parametrize("lease_s", [30.0, 1.0])
def test_a_full_server_drains_and_takes_enqueues_again(
    tmp_path, redis_url, lease_s, record_property
):
    server = spawn_server(
        unix_socket=str(tmp_path / "full.sock"),
        data_dir=str(tmp_path),
        extra=["--maxmemory", "8mb", "--maxmemory-policy", "noeviction"],
    )
    settings = Settings(redis=RedisPoolConfig(url=server.url))
    client = Client(settings=settings)
    monitor = Monitor(TaskQueue(RedisManager(settings.redis, background=False), settings))
    worker = None
    try:
        accepted = fill(client)
        assert accepted > 1000
        full = monitor.snapshot()
        assert full["redis"]["out_of_memory"] and not full["healthy"]
        assert any("server out of memory" in line for line in problem_lines(full))
        # Finished tasks keep no payload here: a kept payload (kept_payload_bytes) holds
        # its memory until the record expires, so the room would come back only then.
        env = handoff_env(redis_url, app="apps.probe", lease_s=lease_s, kept_payload_bytes=0)
        env["HANDOFF_REDIS_URL"] = server.url
        started = time.monotonic()
        worker = HandoffProcess(["worker", "filler"], env, tmp_path / "worker.log")
        wait_until(
            lambda: client.queue_stats(["filler"])["filler"]["done"] == accepted,
            60,
            f"all {accepted} tasks done at the memory limit",
        )
        record_property("drained_tasks", accepted)
        record_property("drain_s", round(time.monotonic() - started, 2))
        stats = client.queue_stats(["filler"])["filler"]
        assert stats["queued"] == stats["running"] == stats["dead"] == 0
        assert client.enqueue("filler", {"pad": "after"})  # room again
        wait_until(
            lambda: client.queue_stats(["filler"])["filler"]["done"] == accepted + 1,
            15,
            "a task enqueued after the drain",
        )
        assert not monitor.snapshot()["redis"]["out_of_memory"]
        log = worker.output()
        assert "unreachable" not in log and "Traceback" not in log
    finally:
        if worker is not None:
            worker.stop()
        monitor.queue.manager.close()
        client.close()
        server.stop()


def test_at_the_limit_a_handoff_that_cannot_be_stored_is_retried_not_held(
    tmp_path, redis_url, record_property
):
    """Defect 3: a task returning Handoff(...) at the memory limit held its lease forever
    (its child's enqueue refused before its ack, the batch kept and its leases renewed):
    0 done, the worker's slots full. Now the parent is retried later with backoff (its
    lease freed, counted, one log line per interval), and runs again once there is room."""
    server = spawn_server(
        unix_socket=str(tmp_path / "full.sock"),
        data_dir=str(tmp_path),
        extra=["--maxmemory", "3mb", "--maxmemory-policy", "noeviction"],
    )
    settings = Settings(redis=RedisPoolConfig(url=server.url))
    client = Client(settings=settings)
    worker = None
    try:
        ids = [client.enqueue("relay", {"fan": 1}, max_attempts=20) for _ in range(40)]
        fill(client)
        env = handoff_env(redis_url, app="apps.probe")
        env["HANDOFF_REDIS_URL"] = server.url
        started = time.monotonic()
        worker = HandoffProcess(["worker", "relay"], env, tmp_path / "worker.log")
        stats = lambda: client.queue_stats(["relay"])["relay"]  # noqa: E731

        def tried_and_let_go() -> bool:  # each parent retried later (or done), none held
            s = stats()
            return s["retried"] >= 10 and s["queued"] == s["running"] == 0

        wait_until(tried_and_let_go, 20, "the parents retried later, their leases freed")
        record_property("leases_freed_s", round(time.monotonic() - started, 2))
        record_property("retried_at_limit", stats()["retried"])
        assert stats()["dead"] == 0
        assert all(client.status(i) in ("delayed", "done") for i in ids)
        log = worker.output()
        assert 1 <= log.count("server out of memory") <= 3, log[-2000:]  # per interval
        with server.client() as raw:
            raw.config_set("maxmemory", "0")  # room again: the retries hand off
        wait_until(lambda: stats()["done"] == 40, 30, "every parent done once there is room")
        record_property("drain_after_room_s", round(time.monotonic() - started, 2))
        children = client.queue_stats(["probe"])["probe"]
        assert children["queued"] == 40 and stats()["dead"] == 0
        assert "Traceback" not in worker.output()
    finally:
        if worker is not None:
            worker.stop()
        client.close()
        server.stop()
