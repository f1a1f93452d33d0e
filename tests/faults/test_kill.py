"""Scenarios 1-4 and 10: processes killed, stopped, poisoned; forks that touched Redis."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from harness.procs import executions, stat, stop_process, wait_until

from faults.checker import check

# Every test here runs on one server and on a 3-primary cluster (tests/conftest.py).
BACKENDS = ("server", "cluster")

pytestmark = pytest.mark.slow


def test_sigkill_holding_50_leases_reruns_exactly_those(start, client, raw_redis, record_property):
    ids = client.enqueue_many(
        "holder", [{"n": i, "first_s": 30 if i < 50 else 0} for i in range(1000)]
    )
    victim_sup = start(["worker", "holder"], prefetch=0)
    wait_until(lambda: raw_redis.llen("executed") == 50, 30, "the victim to hold 50 tasks")
    held = {task_id for _, task_id in executions(raw_redis)}
    assert held == set(ids[:50])
    victim_sup.proc.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    start(["supervise", "--agents", "holder=1"], prefetch=0)

    def reran_all() -> bool:
        runs = [t for _, t in executions(raw_redis) if t in held]
        return len(runs) == 100

    wait_until(reran_all, 30, "all 50 held tasks to run again")
    rerun_within_s = time.monotonic() - killed_at
    record_property("rerun_within_s", round(rerun_within_s, 2))
    assert rerun_within_s < 2.0 + 0.2 + 2.0  # lease + reaper interval + process start slack
    wait_until(lambda: stat(client, "holder", "done") == 1000, 60, "1000 done")
    result = check(client, ids, executions(raw_redis))
    assert not result.lost and not result.unexpected, result.report()
    assert set(result.duplicated) == held and set(result.duplicated.values()) == {2}


def test_sigterm_under_load_loses_nothing_runs_nothing_twice(
    start, client, raw_redis, record_property
):
    ids = client.enqueue_many("probe", [{"n": i, "sleep_s": 0.01} for i in range(2000)])
    sup = start(["supervise", "--agents", "probe=2"], graceful_timeout_s=2)
    wait_until(lambda: raw_redis.llen("executed") > 100, 30, "load")
    sent = time.monotonic()
    sup.signal(signal.SIGTERM)
    assert sup.wait(10) == 0
    record_property("exit_after_s", round(time.monotonic() - sent, 2))
    assert time.monotonic() - sent < 2 + 1.0
    assert client.queue_stats(["probe"])["probe"]["running"] == 0, sup.output()[-3000:]
    start(["supervise", "--agents", "probe=2"])
    wait_until(lambda: stat(client, "probe", "done") == 2000, 60, "the rest")
    result = check(client, ids, executions(raw_redis))
    assert not result.lost and not result.duplicated and not result.unexpected, result.report()


def test_stopped_worker_past_its_lease_abandons_and_its_ack_is_stale(start, client, raw_redis):
    tid = client.enqueue("slowpoke", {"sleep_s": 2.0})
    old = start(["worker", "slowpoke"], prefetch=0)
    wait_until(lambda: raw_redis.llen("executed") == 1, 15, "the old worker to start it")
    old_pid = executions(raw_redis)[0][0]
    stop_process(old_pid)
    try:
        new = start(["worker", "slowpoke"], prefetch=0)
        wait_until(lambda: client.status(tid) == "done", 15, "another worker to finish it")
        new_pid = next(pid for pid, _ in executions(raw_redis) if pid != old_pid)
        assert client.result(tid, wait_s=0) == {"by": new_pid}
    finally:
        os.kill(old_pid, signal.SIGCONT)
    wait_until(lambda: raw_redis.llen("finished") == 2, 15, "the old handler to finish too")
    # The old worker either notices first (its renewal fails: it abandons the task and
    # sends no ack) or acks first (the token is stale: counted, nothing changed).
    wait_until(
        lambda: (
            "lost the lease of 1 task" in old.output()
            or stat(client, "slowpoke", "stale_acks") == 1
        ),
        15,
        "the old worker to give the task up",
    )
    assert client.result(tid, wait_s=0) == {"by": new_pid}  # unchanged by the old worker
    assert stat(client, "slowpoke", "done") == 1
    new.signal(signal.SIGTERM)


def test_poison_is_buried_at_the_delivery_limit_without_a_hot_crash_loop(start, client, raw_redis):
    poison = client.enqueue("mixed", {"poison": True})
    others = client.enqueue_many("mixed", [{"n": i} for i in range(999)])
    sup = start(["supervise", "--agents", "mixed=1"], max_deliveries=3)
    wait_until(lambda: client.status(poison) == "dead", 60, "the poison task to be dead")
    assert "poison: delivered 3 times" in client.dead_reason(poison)
    wait_until(lambda: stat(client, "mixed", "done") == 999, 60, "999 others done")
    result = check(client, others, [(p, t) for p, t in executions(raw_redis) if t != poison])
    assert not result.lost, result.report()
    assert [t for _, t in executions(raw_redis)].count(poison) == 3
    spawns = sup.output().count("spawned worker")
    assert spawns == 4  # the first worker and one restart per crash, no more
    assert "restarting in 0.1s" in sup.output() and "restarting in 0.4s" in sup.output()


def test_forked_children_after_parent_used_redis_get_their_own_sockets(redis_url):
    from handoff.config import RedisPoolConfig
    from handoff.connection.manager import get_manager, reset_manager

    reset_manager()
    parent = get_manager(RedisPoolConfig(url=redis_url, min_idle_conns=5))
    parent.execute(lambda c: c.set("parent", "1"))
    pids = []
    for n in range(8):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                mine = get_manager(RedisPoolConfig(url=redis_url))
                assert mine is not parent
                for i in range(10_000):
                    # A counter of this child's own (ECHO has no key to route on a
                    # cluster): a reply meant for another process shows as a wrong count.
                    count = mine.execute(lambda c, k=f"fork:{n}": c.incr(k))
                    if count != i + 1:
                        os._exit(2)  # a mismatched reply: shared socket
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    for i in range(2000):  # the parent keeps using its own connections meanwhile
        assert parent.execute(lambda c: c.incr("fork:parent")) == i + 1
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    assert parent.execute(lambda c: c.get("parent")) == b"1"
    reset_manager()


def test_supervisor_cpu_stays_low_while_a_worker_crash_loops(start, client):
    client.enqueue("aborter", {})
    sup = start(["supervise", "--agents", "aborter=1"], max_deliveries=1000)
    wait_until(lambda: sup.output().count("killed by SIGABRT") >= 4, 30, "a crash loop")
    process = psutil.Process(sup.pid)
    before = process.cpu_times()
    spawns_before = sup.output().count("spawned worker")
    time.sleep(3)  # the measurement window
    after = process.cpu_times()
    assert (after.user + after.system - before.user - before.system) / 3 < 0.10
    assert sup.output().count("spawned worker") - spawns_before <= 3  # backing off, not hot


def test_a_handler_holding_the_gil_past_its_lease_is_named_in_one_warning(start, client):
    """docs/operations/reliability.md: a C call holding the GIL longer than lease_s starves
    the lease keeper; the task runs again, and the worker says which task and lease_s."""
    tid = client.enqueue("gilhog", {"hold_s": 2.5, "then_s": 1.0})
    sup = start(["supervise", "--agents", "gilhog=1"])
    warning = f"the lease of task {tid} was lost while its handler was still running (lease_s=1)"
    wait_until(lambda: warning in sup.output(), 30, "the warning")
    wait_until(lambda: client.status(tid) == "done", 30, "the task done by its second run")
    assert sup.output().count(warning) == 1
