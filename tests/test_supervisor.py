"""The running system: real supervisor and worker processes, real signals, a real server."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter

import psutil
import redis

from harness.procs import HandoffProcess, executions, handoff_env, stat, wait_until


def test_sigkill_of_a_worker_redelivers_only_what_it_held(start, client, raw_redis):
    ids = client.enqueue_many("probe", [{"n": i, "sleep_s": 0.002} for i in range(5000)])
    sup = start(["supervise", "--agents", "probe=2"])
    wait_until(lambda: len(raw_redis.lrange("executed", 0, 200)) > 200, 30, "work to start")
    victim = sup.live_children()[0].pid
    wait_until(lambda: raw_redis.exists(f"peak:{{{victim}}}"), 10, "victim to be running tasks")
    psutil.Process(victim).kill()
    wait_until(lambda: stat(client, "probe", "done") == 5000, 90, "all 5000 tasks done")
    runs = executions(raw_redis)
    counts = Counter(task_id for _, task_id in runs)
    assert set(counts) == set(ids)
    held_by_victim = {task_id for pid, task_id in runs if pid == victim}
    duplicates = {task_id for task_id, n in counts.items() if n > 1}
    assert duplicates <= held_by_victim
    assert all(n <= 2 for n in counts.values())
    stats = client.queue_stats(["probe"])["probe"]
    assert stats["dead"] == 0 and stats["queued"] == 0 and stats["running"] == 0


def test_handlers_never_exceed_max_concurrent_or_global_limit(start, client, raw_redis):
    # probe: max_concurrent=4 per worker, global_limit=6 across its 3 workers
    client.enqueue_many("probe", [{"n": i, "sleep_s": 0.02} for i in range(300)])
    sup = start(["supervise", "--agents", "probe=3"])
    wait_until(lambda: stat(client, "probe", "done") == 300, 60, "300 tasks done")
    pids = {pid for pid, _ in executions(raw_redis)}
    assert len(pids) >= 2
    per_worker = [int(raw_redis.get(f"peak:{{{pid}}}")) for pid in pids]
    assert max(per_worker) <= 4
    assert int(raw_redis.get("peak:{probe}")) <= 6
    assert int(raw_redis.get("peak:{probe}")) >= 5  # the limit is reached, not just respected
    sup.signal(signal.SIGTERM)
    assert sup.wait(10) == 0


def test_async_handlers_run_concurrently_up_to_their_limit(start, client, raw_redis):
    client.enqueue_many("aprobe", [{"n": i, "sleep_s": 0.05} for i in range(200)])
    start(["worker", "aprobe"])
    wait_until(lambda: stat(client, "aprobe", "done") == 200, 60, "200 async tasks done")
    (pid,) = {pid for pid, _ in executions(raw_redis)}
    assert int(raw_redis.get(f"peak:{{{pid}}}")) == 8


def test_sigterm_to_supervisor_loses_nothing_and_exits_zero_in_grace(start, client, raw_redis):
    ids = client.enqueue_many("probe", [{"n": i, "sleep_s": 0.05} for i in range(400)])
    sup = start(["supervise", "--agents", "probe=2"], graceful_timeout_s=3)
    wait_until(lambda: len(executions(raw_redis)) > 20, 30, "work to start")
    started = time.monotonic()
    sup.signal(signal.SIGTERM)
    assert sup.wait(10) == 0
    assert time.monotonic() - started < 3 + 1.0
    stats = client.queue_stats(["probe"])["probe"]
    assert stats["running"] == 0  # in-flight finished or went back
    assert stats["done"] + stats["queued"] == 400
    assert {client.status(i) for i in ids} <= {"done", "queued"}
    # a new supervisor finishes the rest; nothing ran twice
    start(["supervise", "--agents", "probe=2"])
    wait_until(lambda: stat(client, "probe", "done") == 400, 60, "the rest done")
    counts = Counter(task_id for _, task_id in executions(raw_redis))
    assert set(counts) == set(ids) and max(counts.values()) == 1


def test_raising_handler_retries_then_dead_letters_and_worker_stays_up(start, client, raw_redis):
    tid = client.enqueue("flaky", {"x": 1})
    sup = start(["supervise", "--agents", "flaky=1"])
    wait_until(lambda: client.status(tid) == "dead", 30, "the flaky task to be dead")
    assert len(executions(raw_redis)) == 2  # max_attempts=2
    assert "flaky failure" in client.dead_reason(tid)
    assert len(sup.live_children()) == 1
    assert sup.proc.poll() is None


def test_aborting_handler_is_dead_lettered_and_the_crash_loop_backs_off(start, client, raw_redis):
    tid = client.enqueue("aborter", {"x": 1})
    ok = client.enqueue_many("probe", [{"n": i} for i in range(50)])
    sup = start(["supervise", "--agents", "aborter=1,probe=1"], max_deliveries=3)
    wait_until(lambda: client.status(tid) == "dead", 60, "the poison task to be dead")
    assert "poison" in client.dead_reason(tid)
    aborter_runs = [t for _, t in executions(raw_redis) if t == tid]
    assert len(aborter_runs) == 3  # exactly the delivery limit
    wait_until(lambda: all(client.status(i) == "done" for i in ok), 30, "neighbours done")
    out = sup.output()
    assert out.count("killed by SIGABRT") == 3
    assert "restarting in 0.1s" in out and "restarting in 0.2s" in out  # backoff grows
    assert sup.proc.poll() is None


def test_blocked_handler_times_out_and_its_worker_is_recycled(start, client, raw_redis):
    tid = client.enqueue("sleeper", {})
    sup = start(["supervise", "--agents", "sleeper=1"], graceful_timeout_s=0.5)
    wait_until(lambda: client.status(tid) == "dead", 30, "the blocked task to be dead")
    assert "timed out" in client.dead_reason(tid)
    wait_until(lambda: "exit 4 (recycle)" in sup.output(), 15, "the stuck worker to recycle")
    wait_until(lambda: len(sup.live_children()) == 1, 15, "a replacement worker")
    assert sup.proc.poll() is None


def test_leaking_handler_is_recycled_past_max_rss(start, client, raw_redis):
    client.enqueue_many("leaker", [{} for _ in range(12)])
    sup = start(["supervise", "--agents", "leaker=1"], max_rss_mb=150)
    wait_until(lambda: stat(client, "leaker", "done") == 12, 60, "12 leaker tasks done")
    pids = {pid for pid, _ in executions(raw_redis)}
    assert len(pids) >= 2  # recycled at least once
    assert "recycling (RSS" in sup.output()
    assert sup.proc.poll() is None


def test_scale_command_and_ttin_ttou_change_the_process_count(start, client, redis_url):
    sup = start(["supervise", "--agents", "probe=1"])
    wait_until(lambda: len(sup.live_children()) == 1, 15, "one worker")
    sup.signal(signal.SIGTTIN)
    wait_until(lambda: len(sup.live_children()) == 2, 15, "two workers after SIGTTIN")
    sup.signal(signal.SIGTTOU)
    try:
        wait_until(lambda: len(sup.live_children()) == 1, 15, "one worker after SIGTTOU")
    except AssertionError as e:  # say what the supervisor and its workers did
        raise AssertionError(f"{e}\n{sup.output()[-4000:]}") from None
    env = handoff_env(redis_url, app="apps.probe")
    wait_until(
        lambda: client.queue.manager.execute(lambda c: c.zcard("handoff:supervisors")),
        10,
        "the supervisor to register",
    )
    scale = HandoffProcess(["scale", "probe=4"], env, sup.log_path.with_suffix(".scale"))
    assert scale.wait(30) == 0
    scale.stop()
    wait_until(lambda: len(sup.live_children()) == 4, 15, "four workers after scale")


def test_sighup_rolls_every_worker_without_losing_a_task(start, client, raw_redis):
    ids = client.enqueue_many("probe", [{"n": i, "sleep_s": 0.01} for i in range(600)])
    sup = start(["supervise", "--agents", "probe=2"])
    wait_until(lambda: len(sup.live_children()) == 2, 15, "two workers")
    before = {p.pid for p in sup.live_children()}
    wait_until(lambda: len(executions(raw_redis)) > 50, 30, "work to start")
    sup.signal(signal.SIGHUP)
    wait_until(
        lambda: len(sup.live_children()) == 2 and not before & {p.pid for p in sup.live_children()},
        30,
        "both workers replaced",
    )
    wait_until(lambda: stat(client, "probe", "done") == 600, 60, "all tasks done")
    assert {t for _, t in executions(raw_redis)} == set(ids)


def test_boot_error_halts_the_supervisor_with_a_clear_message(start):
    sup = start(["--app", "apps.does_not_exist", "supervise", "--agents", "probe=1"])
    assert sup.wait(20) == 3
    assert "cannot import app module 'apps.does_not_exist'" in sup.output()


def test_idle_worker_uses_under_one_percent_cpu(start, client):
    sup = start(["supervise", "--agents", "probe=1"])
    (worker,) = wait_until(lambda: sup.live_children(), 15, "a worker")
    wait_until(lambda: "started" in sup.output(), 15, "the worker to start")
    window_s = 6  # CPU times tick in 10 ms: 1% of 6 s is six ticks
    before = worker.cpu_times()
    time.sleep(window_s)  # the measurement window itself, not a synchronisation
    after = worker.cpu_times()
    used = (after.user - before.user) + (after.system - before.system)
    assert used / window_s < 0.01
    # and it still picks work up at once
    tid = client.enqueue("probe", {"n": 1, "sleep_s": 0})
    assert client.result(tid, wait_s=2) == {"n": 1}


def test_memory_optimization_applies_the_server_memory_settings_at_start(private_server, tmp_path):
    """redis.memory_optimization = true: the supervisor CONFIG SETs lazy freeing and the
    listpack sizes (the pool manager's memory settings); off, it touches nothing."""
    url = private_server.url
    server = redis.Redis.from_url(url, decode_responses=True)
    server.config_set("lazyfree-lazy-expire", "no")
    env = handoff_env(url, app="apps.probe")
    plain = HandoffProcess(["supervise", "--agents", "probe=1"], env, tmp_path / "off.log")
    try:
        wait_until(lambda: "started" in plain.output(), 30, "the first supervisor to start")
        assert server.config_get("lazyfree-lazy-expire")["lazyfree-lazy-expire"] == "no"
    finally:
        plain.stop()
    env["HANDOFF_REDIS_MEMORY_OPTIMIZATION"] = "true"
    tuned = HandoffProcess(["supervise", "--agents", "probe=1"], env, tmp_path / "on.log")
    try:
        wait_until(lambda: "memory settings" in tuned.output(), 30, "the settings to be applied")
        got = server.config_get("*-max-listpack-entries")
        assert server.config_get("lazyfree-lazy-expire")["lazyfree-lazy-expire"] == "yes"
        assert got["zset-max-listpack-entries"] == "256"
    finally:
        tuned.stop()


def test_a_server_that_stops_with_the_supervisor_is_said_but_not_as_an_error(
    private_server, tmp_path
):
    """honcho's Ctrl-C stops the server and the supervisor at once: Redis going away
    while the supervisor drains its workers is expected, and neither the supervisor nor
    a draining worker logs it as an error."""
    url = private_server.url
    env = handoff_env(url, app="apps.probe", graceful_timeout_s=6, reaper_interval_s=0.1)
    raw = redis.Redis.from_url(url)
    from handoff import Client
    from handoff.config import RedisPoolConfig, Settings

    with Client(settings=Settings(redis=RedisPoolConfig(url=url))) as client:
        client.enqueue("probe", {"n": 1, "sleep_s": 3})
    sup = HandoffProcess(["supervise", "--agents", "probe=1"], env, tmp_path / "sup.log")
    try:
        wait_until(lambda: raw.llen("executed") == 1, 30, "the task to start")
        sup.signal(signal.SIGTERM)  # graceful: the worker finishes its task first
        wait_until(lambda: "stopping gracefully" in sup.output(), 10, "the stop to begin")
        private_server.stop()
        said = wait_until(
            lambda: [ln for ln in sup.output().splitlines() if "supervisor: Redis:" in ln],
            10,
            "the supervisor to notice",
        )
        assert " INFO " in said[0] and "ERROR" not in said[0], said[0]
        assert sup.wait(15) == 0  # it still stops cleanly
        # nor do its draining worker's threads (the ack, the inbox's wait for cancels)
        assert "failed: Redis unreachable" in sup.output()
        assert [ln for ln in sup.output().splitlines() if " ERROR " in ln] == []
    finally:
        sup.stop()


def test_a_helper_thread_that_fails_replaces_its_worker_and_loses_nothing(start, client, raw_redis):
    """A bug in one of a worker's helper threads (waker, inbox, lease keeper, heartbeat)
    used to end that thread alone: a worker without its waker never claimed again, one
    without its lease keeper let others take its running tasks. Now the worker says so,
    drains and exits as a crash, and the supervisor replaces it."""
    ids = client.enqueue_many("probe", [{"n": i, "sleep_s": 0.01} for i in range(200)])
    sup = start(["supervise", "--agents", "probe=1"], app="apps.broken_thread")
    wait_until(lambda: len(executions(raw_redis)) > 20, 30, "work to start")
    raw_redis.set("break-inbox", 1)
    wait_until(lambda: "exit 1 (crash)" in sup.output(), 15, "the worker to exit as a crash")
    assert "the inbox thread failed; replacing this worker" in sup.output()
    assert "RuntimeError: a bug in the inbox thread" in sup.output()  # with its traceback
    wait_until(lambda: stat(client, "probe", "done") == 200, 60, "the rest done by its successor")
    counts = Counter(task_id for _, task_id in executions(raw_redis))
    assert set(counts) == set(ids) and max(counts.values()) == 1
    assert len({pid for pid, _ in executions(raw_redis)}) == 2  # the worker, then its successor


def test_workers_are_named_for_their_agent_and_number_in_ps(start):
    """ps showed every worker with its supervisor's command line; now each is named, and a
    replacement takes the number of the worker it replaces."""
    sup = start(["supervise", "--agents", "probe=2"])
    wait_until(lambda: len(sup.live_children()) == 2, 15, "two workers")

    def titles() -> dict[int, str]:
        return {p.pid: " ".join(p.cmdline()).strip() for p in sup.live_children()}

    wait_until(
        lambda: sorted(titles().values()) == ["handoff worker probe #1", "handoff worker probe #2"],
        10,
        "both named",
    )
    first = next(pid for pid, title in titles().items() if title.endswith("#1"))
    os.kill(first, signal.SIGKILL)
    wait_until(
        lambda: (
            first not in titles()
            and sorted(titles().values()) == ["handoff worker probe #1", "handoff worker probe #2"]
        ),
        20,
        "a replacement named #1",
    )


def test_a_worker_wedged_holding_the_gil_is_killed_and_replaced(start, client, record_property):
    """A worker whose interpreter stops (here a C call that keeps the GIL for 60 s) kept
    its process and slots forever: the supervisor never looked at its workers' heartbeats.
    Past worker_stall_s it is SIGKILLed and replaced, and its task comes back by its lease."""
    tid = client.enqueue("gilhog", {"hold_s": 60, "then_s": 0})
    sup = start(["supervise", "--agents", "gilhog=1"], worker_stall_s=1.5)
    (wedged,) = wait_until(lambda: sup.live_children(), 15, "a worker")
    wait_until(lambda: client.status(tid) == "running", 15, "the task to start")
    began = time.monotonic()
    said = wait_until(
        lambda: [ln for ln in sup.output().splitlines() if " stalled: no heartbeat for " in ln],
        15,
        "the supervisor to name the stalled worker",
    )
    record_property("stall_detected_s", round(time.monotonic() - began, 2))
    assert len(said) == 1 and f"worker {wedged.pid} (gilhog) stalled" in said[0], said
    age = float(said[0].split("no heartbeat for ")[1].split("s")[0])
    assert 1.5 <= age < 5, said[0]  # past 1.5 s, printed to a tenth: 1.52 reads 1.5
    wait_until(lambda: not wedged.is_running() or wedged.status() == "zombie", 10, "the kill")
    assert client.result(tid, wait_s=20)["by"] != wedged.pid  # its successor ran it again
    record_property("task_done_after_s", round(time.monotonic() - began, 2))
    assert [p.pid for p in sup.live_children()] != [wedged.pid]
    assert "crashed: killed by SIGKILL" in sup.output()  # counted as a crash (backoff)
