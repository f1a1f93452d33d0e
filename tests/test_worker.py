"""One worker process at a time: signals, parent death, handoffs, latency of idle pick-up."""

from __future__ import annotations

import os
import signal
from collections import Counter

import psutil
import pytest

from harness.procs import HandoffProcess, executions, handoff_env, stat, wait_until


def test_repeated_sigterm_is_harmless_and_nothing_is_lost(start, client, raw_redis):
    ids = client.enqueue_many("probe", [{"n": i, "sleep_s": 0.02} for i in range(300)])
    worker = start(["worker", "probe"], graceful_timeout_s=3)
    wait_until(lambda: len(executions(raw_redis)) > 10, 30, "work to start")
    worker.signal(signal.SIGTERM)
    worker.signal(signal.SIGTERM)  # honcho signals the whole group: the worker sees it twice
    worker.signal(signal.SIGINT)
    assert worker.wait(10) == 0
    stats = client.queue_stats(["probe"])["probe"]
    assert stats["running"] == 0
    assert stats["done"] + stats["queued"] == 300
    again = start(["worker", "probe"])
    wait_until(lambda: stat(client, "probe", "done") == 300, 60, "the rest done")
    counts = Counter(t for _, t in executions(raw_redis))
    assert set(counts) == set(ids) and max(counts.values()) == 1
    again.signal(signal.SIGTERM)
    assert again.wait(10) == 0


def test_workers_exit_when_their_supervisor_dies(start, client, raw_redis):
    client.enqueue_many("probe", [{"n": i, "sleep_s": 0.05} for i in range(200)])
    sup = start(["supervise", "--agents", "probe=2"])
    workers = wait_until(lambda: len(sup.live_children()) == 2 and sup.live_children(), 15, "2")
    wait_until(lambda: len(executions(raw_redis)) > 5, 30, "work to start")
    os.kill(sup.pid, signal.SIGKILL)
    for worker in workers:
        wait_until(lambda w=worker: not _alive(w), 15, f"worker {worker.pid} to exit")
    stats = client.queue_stats(["probe"])["probe"]
    assert stats["running"] == 0  # they gave their tasks back on the way out
    assert stats["done"] + stats["queued"] == 200


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_handoff_fan_out_through_real_workers(start, client, raw_redis):
    parents = client.enqueue_many("relay", [{"fan": 3} for _ in range(20)])
    start(["supervise", "--agents", "relay=1,probe=1"])
    wait_until(lambda: stat(client, "probe", "done") == 60, 30, "60 children done")
    for parent in parents:
        children = client.result(parent, wait_s=1)["handoff"]
        assert len(children) == 3
        for child in children:
            info = client.task(child)
            assert info["status"] == "done"
    assert stat(client, "relay", "handed_off") == 60


def test_unknown_agent_is_a_boot_error_for_a_lone_worker(redis_url, tmp_path):
    env = handoff_env(redis_url, app="apps.probe")
    worker = HandoffProcess(["worker", "nobody"], env, tmp_path / "w.log")
    try:
        assert worker.wait(20) == 3
        assert "unknown agent 'nobody'" in worker.output()
    finally:
        worker.stop()


@pytest.mark.parametrize("agent", ["probe", "aprobe"])
def test_an_idle_worker_starts_a_new_task_within_milliseconds(start, client, agent):
    start(["worker", agent])
    warm = client.enqueue(agent, {"n": 0, "sleep_s": 0})
    client.result(warm, wait_s=10)
    latencies = []
    for i in range(20):
        tid = client.enqueue(agent, {"n": i, "sleep_s": 0})
        client.result(tid, wait_s=5)
        info = client.task(tid)
        latencies.append(info["result"]["finished_at"] - int(tid.split(".")[1][:12], 16))
    latencies.sort()
    assert latencies[len(latencies) // 2] < 50  # ms, enqueue to done, median (generous: CI)
