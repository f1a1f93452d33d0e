"""Deadlines (issue 15, first part): a task not started by expires_in_s, or by its run's
run_deadline_s, ends expired and never runs; on a server and a 3-primary cluster."""

from __future__ import annotations

import time

import orjson
import pytest

from handoff import Handoff, TaskExpired
from handoff.errors import InvalidPayload
from handoff.testing import InProcessApp
from harness.procs import HandoffProcess, handoff_env, wait_until

BACKENDS = ("server", "cluster")


@pytest.fixture
def app(flows_app):
    return flows_app


def test_a_task_past_its_deadline_ends_expired_and_never_runs(app, raw_redis):
    late = app.enqueue("step", {"i": 1}, expires_in_s=1)
    on_time = app.enqueue("step", {"i": 2})
    app.clock.advance(2.0)
    runs = app.run_until_idle()
    assert late not in runs and runs[on_time].status == "done"
    assert app.client.status(late) == "expired"
    with pytest.raises(TaskExpired, match=f"task {late} expired: not started by its deadline"):
        app.client.result(late, 1)
    stats = app.client.queue_stats(["step"])["step"]
    assert stats["expired"] == 1 and stats["queued"] == 0 and stats["done"] == 1
    assert not raw_redis.hexists(app.queue.keys.agent("step").tasks, late)  # forgotten
    assert app.client.tree(late)["status"] == "expired"


def test_a_task_within_its_deadline_runs(app):
    task_id = app.enqueue("step", {"i": 3}, expires_in_s=60)
    assert app.run_until_idle()[task_id].status == "done"
    assert not app.client.queue.manager.execute(
        lambda c: c.hlen(app.queue.keys.agent("step").deadlines)
    )  # its deadline is forgotten with it


def test_a_runs_deadline_bounds_the_tasks_handed_off_in_it(redis_url, monkeypatch):
    monkeypatch.setenv("TEST_REDIS_URL", redis_url)
    echo = InProcessApp("apps.flows", redis_url, agents=["echo"])
    step = InProcessApp("apps.flows", redis_url, agents=["step"], clock=echo.clock)
    try:
        root = echo.enqueue("echo", {"i": 5, "next": "step"}, run_deadline_s=1)
        echo.run_until_idle()  # echo hands off to step, which inherits the run's deadline
        echo.clock.advance(2.0)  # ... and is not started by it
        step.run_until_idle()
        child = echo.client.tree(root)["children"][0]
        assert child["status"] == "expired"
        with pytest.raises(TaskExpired, match=rf"has an expired end: task {child['id']}"):
            echo.client.result(root, 2, follow=True)
    finally:
        echo.close()
        step.close()


def test_expired_branches_end_their_join_and_its_then_task_expires_too(
    redis_url, raw_redis, monkeypatch
):
    monkeypatch.setenv("TEST_REDIS_URL", redis_url)
    planner = InProcessApp("apps.flows", redis_url, agents=["splitter"])
    rest = InProcessApp("apps.flows", redis_url, agents=["step", "merge"], clock=planner.clock)
    try:
        root = planner.enqueue("splitter", {"n": 2, "hops": 1}, run_deadline_s=1)
        planner.run_until_idle()  # the join starts; its branches wait ...
        planner.clock.advance(2.0)  # ... past the run's deadline
        rest.run_until_idle()
        tree = planner.client.tree(root)
        assert [c["status"] for c in tree["children"]] == ["expired", "expired"]
        assert tree["then"]["status"] == "expired"  # the then-task has the run's deadline
        assert raw_redis.llen("merged") == 0 and raw_redis.llen("step_ends") == 0
    finally:
        planner.close()
        rest.close()


def test_a_deadline_must_be_a_positive_number_of_seconds(app):
    for bad in (0, -1, float("nan"), "soon"):
        with pytest.raises(InvalidPayload) as caught:
            app.enqueue("step", {}, expires_in_s=bad)
        assert str(caught.value).startswith("expires_in_s") and "\n" not in str(caught.value)
    with pytest.raises(InvalidPayload, match=r"^run_deadline_s"):
        app.client.enqueue_many("step", [{}], run_deadline_s=-5)
    with pytest.raises(InvalidPayload, match=r"^Handoff expires_in_s"):
        Handoff("step", {}, expires_in_s=0)


@pytest.mark.slow
def test_a_task_behind_a_backlog_expires_without_running(redis_url, raw_redis, client, tmp_path):
    """expires_in_s=1 behind 3 s of queued work (one worker, 16 slots, 0.8 s tasks)."""
    backlog = client.enqueue_many("step", [{"i": i, "hops": 0, "sleep_s": 0.8} for i in range(60)])
    late = client.enqueue("step", {"i": 999, "hops": 0}, expires_in_s=1)
    worker = HandoffProcess(["worker", "step"], handoff_env(redis_url, app="apps.flows"),
                            tmp_path / "w.log")  # fmt: skip
    try:
        wait_until(lambda: all(client.status(t) == "done" for t in backlog), 60, "the backlog")
        wait_until(lambda: client.status(late) == "expired", 10, "the late task to expire")
    finally:
        worker.stop()
    ran = {orjson.loads(e)["id"] for e in raw_redis.lrange("step_ends", 0, -1)}
    assert late not in ran and set(backlog) <= ran


def test_a_run_whose_child_expires_raises_task_expired_on_follow(client, start):
    """Real workers: echo hands off to step within run_deadline_s=1; step's worker starts
    only after the deadline, so the child ends expired; following the run raises
    TaskExpired (as result() of an expired root does), not TaskDead."""
    start(["worker", "echo"], app="apps.flows")

    def workers() -> list[bytes]:
        return client.queue.manager.execute(lambda c: c.zrange("handoff:workers", 0, -1))

    # up first: a root not started within its run's 1 s (a slow boot) would expire itself
    wait_until(lambda: any(w.startswith(b"echo-") for w in workers()), 30, "echo's worker")
    root = client.enqueue("echo", {"i": 7, "next": "step"}, run_deadline_s=1)
    children = wait_until(lambda: client.tree(root).get("children"), 20, "echo's handoff")
    past = time.time() + 1.5  # the run's deadline is stamped by this client's clock
    wait_until(lambda: time.time() > past, 5, "the run's deadline to pass")
    start(["worker", "step"], app="apps.flows")
    wait_until(lambda: client.status(children[0]["id"]) == "expired", 20, "its child to expire")
    with pytest.raises(
        TaskExpired, match=rf"run {root} has an expired end: task {children[0]['id']}"
    ):
        client.result(root, 5, follow=True)
