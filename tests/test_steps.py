"""task.step: named, memoized calls inside a handler (protocol/steps.py, step.lua).

The step functions of the test agents (tests/apps/steps.py) record every call in the
test's server, outside handoff, so these tests count what really ran."""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter

import orjson
import pytest

from harness.procs import stat, stop_process, wait_until

pytestmark = pytest.mark.backends("server", "cluster")


@pytest.fixture
def steps_app(redis_url, monkeypatch):
    from handoff.testing import InProcessApp

    monkeypatch.setenv("TEST_REDIS_URL", redis_url)
    made = InProcessApp("apps.steps", redis_url, agents=["stepper", "astepper", "badstep"])
    yield made
    made.close()


def events(raw_redis) -> list[tuple[str, str, str, int]]:
    """(task id, step, "call" | "ret", pid) in the order the server took them."""
    out = []
    for line in raw_redis.lrange("step_events", 0, -1):
        task_id, name, what, pid = line.decode().split("|")
        out.append((task_id, name, what, int(pid)))
    return out


def calls(raw_redis) -> Counter:
    return Counter((t, n) for t, n, what, _ in events(raw_redis) if what == "call")


def test_a_retried_task_reuses_every_step_it_completed(steps_app, raw_redis, backend):
    ids = [steps_app.enqueue("stepper", {"fail_attempts": 2}) for _ in range(5)]
    steps_app.run_until_idle()
    for task_id in ids:
        assert steps_app.client.result(task_id, wait_s=1) == ["model", "second", "third"]
    counted = calls(raw_redis)
    assert set(counted.values()) == {1} and len(counted) == 15  # 3 attempts, 1 call each
    assert {int(v) for v in raw_redis.hvals("model_calls")} == {1}


def test_the_run_tree_shows_each_step_ran_or_reused(steps_app, backend):
    task_id = steps_app.enqueue("stepper", {"fail_attempts": 1})
    steps_app.run_until_idle()
    node = steps_app.client.tree(task_id)
    assert [s[:2] for s in node["steps"]] == [
        ["model", "reused"], ["second", "reused"], ["third", "reused"]
    ]  # fmt: skip
    assert all(isinstance(s[2], int | float) for s in node["steps"])


def test_steps_are_loaded_lazily_and_cost_nothing_unused(steps_app, raw_redis, backend):
    """A task that never calls task.step: no read of steps at claim, nothing written."""
    from harness.procs import command_calls

    before = command_calls(raw_redis).get("hgetall", 0)
    task_id = steps_app.enqueue("badstep", {"case": "none"})
    steps_app.run_until_idle()
    assert command_calls(raw_redis).get("hgetall", 0) == before
    assert raw_redis.exists(steps_app.queue.keys.agent("badstep").steps(task_id)) == 0
    steps_app.enqueue("stepper", {})
    steps_app.run_until_idle()
    assert command_calls(raw_redis).get("hgetall", 0) == before + 1  # one read, on first use


def test_async_steps_reuse_like_sync_ones(steps_app, raw_redis, backend):
    task_id = steps_app.enqueue("astepper", {"fail_attempts": 2})
    steps_app.run_until_idle()
    assert steps_app.client.result(task_id, wait_s=1) == ["model", "plain"]
    assert sorted(calls(raw_redis).values()) == [1, 1]


def test_the_steps_hash_expires_with_the_record(steps_app, raw_redis, backend):
    task_id = steps_app.enqueue("stepper", {})
    steps_app.run_until_idle()
    key = steps_app.queue.keys.agent("stepper").steps(task_id)
    record_ttl_ms = raw_redis.pttl(steps_app.queue.keys.agent("stepper").result(task_id))
    assert abs(raw_redis.pttl(key) - record_ttl_ms) < 5000
    assert raw_redis.hlen(key) == 3


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("dup", "task.step('a'): this name was already used in this task"),
        ("object", "task.step('obj'): result is not JSON"),
        ("nan", "task.step('nan'): result holds NaN or an infinity"),
        ("big", "task.step('big'): result is 5002 bytes, over max_result_bytes (4096)"),
        ("name", "task.step(''): a name is a string of 1 to 200 characters"),
    ],
)
def test_bad_step_input_fails_the_task_in_one_line(redis_url, monkeypatch, case, says, backend):
    from handoff.testing import InProcessApp

    monkeypatch.setenv("TEST_REDIS_URL", redis_url)
    app = InProcessApp("apps.steps", redis_url, agents=["badstep"], max_result_bytes=4096)
    try:
        task_id = app.enqueue("badstep", {"case": case})
        app.run_until_idle()
        reason = app.client.dead_reason(task_id)
        assert task_id and "\n" not in reason and says in reason
    finally:
        app.close()


def test_sigkilled_workers_never_repeat_a_completed_step(start, client, raw_redis, backend):
    """STEPS_TEST_N tasks (100; the issue's 1,000 with STEPS_TEST_N=1000), their workers
    SIGKILLed at random points: every task done; a step's function is called again only
    when the call before it never returned to its handler (killed mid-call, or before
    its store)."""
    n = int(os.environ.get("STEPS_TEST_N", "100"))
    ids = client.enqueue_many("stepper", [{"sleep_s": 0.02} for _ in range(n)])
    # Eight crashes in a row would back the restarts off for 25 s: cap it, as the kills
    # are the test's, not a crash loop to be shielded from.
    sup = start(
        ["supervise", "--agents", "stepper=2"],
        app="apps.steps",
        lease_s=1,
        crash_backoff_max_s=0.2,
        max_deliveries=1000,  # STEPS_TEST_N=1000 kills 40 times: not the poison limit
    )
    kills = 0
    rng = random.Random(7)
    most_kills = max(8, n // 25)  # kills land all along a bigger run too
    deadline = time.monotonic() + 60
    while (
        stat(client, "stepper", "done") < n and kills < most_kills and time.monotonic() < deadline
    ):
        time.sleep(rng.uniform(0.1, 0.4))
        live = sup.live_children()
        if live:
            os.kill(rng.choice(live).pid, signal.SIGKILL)
            kills += 1
    wait_until(lambda: stat(client, "stepper", "done") == n, 60 + n / 10, "every task done")
    assert kills >= 3
    returned: set[tuple[str, str]] = set()
    for task_id, name, what, _pid in events(raw_redis):
        if what == "ret":
            returned.add((task_id, name))
        else:  # a call after task.step once returned would be a repeat
            assert (task_id, name) not in returned, f"{name} of {task_id} ran again"
    counted = calls(raw_redis)
    assert {t for t, _ in counted} == set(ids)
    repeats = sum(c - 1 for c in counted.values())
    assert repeats <= kills * 2  # at most one interrupted step per slot per kill
    for task_id in ids:
        assert client.result(task_id, wait_s=1) == ["model", "second", "third"]


def test_a_stale_delivery_cannot_store_its_step(start, client, raw_redis, backend):
    """A worker stopped (SIGSTOP) mid-step past its lease: another worker runs the task;
    resumed, the first one's store is refused (LeaseLost) and writes nothing."""
    task_id = client.enqueue("stepper", {"stall_s": 2.0})
    first = start(["worker", "stepper"], app="apps.steps", lease_s=1)
    wait_until(lambda: calls(raw_redis)[(task_id, "model")] == 1, 30, "the first call")
    stop_process(first.pid)
    try:
        start(["worker", "stepper"], app="apps.steps", lease_s=1)
        wait_until(lambda: stat(client, "stepper", "done") == 1, 30, "done elsewhere")
    finally:
        os.kill(first.pid, signal.SIGCONT)
    stats_key = client.queue.keys.agent("stepper").stats
    wait_until(lambda: raw_redis.hget(stats_key, "stale_steps") == b"1", 30, "the stale store")
    stored = raw_redis.hget(client.queue.keys.agent("stepper").steps(task_id), "model")
    assert orjson.loads(stored)["delivery"] == 2  # the second delivery's, kept
    assert (task_id, "model", "ret", first.pid) not in events(raw_redis)
    assert client.result(task_id, wait_s=1) == ["model", "second", "third"]


def test_inspect_task_and_the_tree_text_show_the_steps(steps_app, backend):
    from handoff.cli.tree_view import tree_lines

    task_id = steps_app.enqueue("stepper", {"fail_attempts": 1})
    steps_app.run_until_idle()
    info = steps_app.client.task(task_id)
    assert [(s["name"], s["delivery"]) for s in info["steps"]] == [
        ("model", 1), ("second", 1), ("third", 1)
    ]  # fmt: skip
    (line,) = tree_lines(steps_app.client.tree(task_id))
    assert "steps model reused" in line and "third reused" in line
