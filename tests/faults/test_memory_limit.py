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
        env = handoff_env(redis_url, app="apps.probe", lease_s=lease_s)
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
