"""client.rerun / `handoff rerun`: a run's dead tasks sent through again, reusing what
finished (protocol/rerun.py, rerun.lua). The test agents (tests/apps/steps.py) record
their executions in the test's server, outside handoff."""

from __future__ import annotations

from collections import Counter

import pytest
from click.testing import CliRunner

from handoff import TaskDead

pytestmark = pytest.mark.backends("server", "cluster")
POISONED = [2, 5, 7]


@pytest.fixture
def rerun_app(redis_url, monkeypatch, raw_redis):
    from handoff.testing import InProcessApp

    monkeypatch.setenv("TEST_REDIS_URL", redis_url)
    raw_redis.set("poisoned", "1")
    made = InProcessApp("apps.steps", redis_url, agents=["rplanner", "worker_step", "rintegrator"])
    yield made
    made.close()


def _model_calls(raw_redis) -> Counter:
    return Counter(
        line.split(b"|")[0].decode()
        for line in raw_redis.lrange("step_events", 0, -1)
        if line.split(b"|")[2] == b"call"
    )


def test_rerun_finishes_a_join_whose_poisoned_branches_died(rerun_app, raw_redis, backend):
    """planner -> join of 20 branches -> integrator; 3 branches die until the flag is
    flipped. rerun: only those 3 run again (their stored model step reused), the
    integrator (dead-lettered by on_dead="fail") runs once, and the run's result is as if
    nothing had failed."""
    client = rerun_app.client
    run_id = rerun_app.enqueue("rplanner", {"n": 20, "poison": POISONED})
    rerun_app.run_until_idle()
    with pytest.raises(TaskDead):
        client.result(run_id, wait_s=1, follow=True)
    assert raw_redis.llen("branch_runs") == 17 and raw_redis.llen("integrator_runs") == 0
    done_branches = {b.decode() for b in raw_redis.lrange("branch_runs", 0, -1)}
    raw_redis.set("poisoned", "0")

    report = client.rerun(run_id)
    assert report.line() == (
        f"run {run_id}: 4 dead or cancelled task(s) sent again (3 requeued, 1 join "
        "then-task(s) waiting for their branches again); done tasks and stored steps are kept"
    )
    rerun_app.run_until_idle()

    assert client.result(run_id, wait_s=5, follow=True) == list(range(20))
    runs = Counter(b.decode() for b in raw_redis.lrange("branch_runs", 0, -1))
    assert set(runs.values()) == {1} and len(runs) == 20  # done branches never ran again
    assert done_branches < set(runs)
    assert set(_model_calls(raw_redis).values()) == {1}  # every model step called once
    assert raw_redis.llen("integrator_runs") == 1
    tree = client.tree(run_id)
    assert tree["then"]["status"] == "done"
    assert all(child["status"] == "done" for child in tree["children"])


def test_a_second_rerun_has_nothing_to_do(rerun_app, raw_redis, backend):
    run_id = rerun_app.enqueue("rplanner", {"n": 4, "poison": [1]})
    rerun_app.run_until_idle()
    raw_redis.set("poisoned", "0")
    rerun_app.client.rerun(run_id)
    rerun_app.run_until_idle()
    assert rerun_app.client.result(run_id, wait_s=5, follow=True) == [0, 1, 2, 3]
    report = rerun_app.client.rerun(run_id)
    assert (
        report.line() == f"run {run_id} has nothing to rerun: no task of it ended dead or cancelled"
    )


def test_a_run_in_progress_is_not_rerun(either_client, backend):
    run_id = either_client.enqueue("rplanner", {"n": 3})
    report = either_client.rerun(run_id)
    assert report.line() == (
        f"run {run_id} is still in progress (1 task(s) queued or running): nothing rerun"
    )


def test_rerun_still_poisoned_dies_again_and_can_be_rerun(rerun_app, raw_redis, backend):
    run_id = rerun_app.enqueue("rplanner", {"n": 3, "poison": [0]})
    rerun_app.run_until_idle()
    rerun_app.client.rerun(run_id)  # the flag still set: the branch dies again
    rerun_app.run_until_idle()
    with pytest.raises(TaskDead):
        rerun_app.client.result(run_id, wait_s=1, follow=True)
    raw_redis.set("poisoned", "0")
    rerun_app.client.rerun(run_id)
    rerun_app.run_until_idle()
    assert rerun_app.client.result(run_id, wait_s=5, follow=True) == [0, 1, 2]
    assert raw_redis.llen("integrator_runs") == 1


def test_handoff_rerun_says_in_one_line_what_it_did(rerun_app, raw_redis, redis_url, backend):
    from handoff.cli import main

    run_id = rerun_app.enqueue("rplanner", {"n": 2, "poison": [0]})
    rerun_app.run_until_idle()
    raw_redis.set("poisoned", "0")
    result = CliRunner().invoke(main, ["--redis-url", redis_url, "rerun", run_id])
    assert result.exit_code == 0, result.output
    assert (
        result.output.count("\n") == 1 and "2 dead or cancelled task(s) sent again" in result.output
    )
    rerun_app.run_until_idle()
    assert rerun_app.client.result(run_id, wait_s=5, follow=True) == [0, 1]


def test_a_then_task_that_died_itself_runs_again_alone(rerun_app, raw_redis, backend):
    raw_redis.set("integrator_poisoned", "1")
    run_id = rerun_app.enqueue("rplanner", {"n": 3})
    rerun_app.run_until_idle()
    with pytest.raises(TaskDead):
        rerun_app.client.result(run_id, wait_s=1, follow=True)
    raw_redis.set("integrator_poisoned", "0")
    report = rerun_app.client.rerun(run_id)
    assert (len(report.requeued), report.rearmed) == (1, [])
    rerun_app.run_until_idle()
    assert rerun_app.client.result(run_id, wait_s=5, follow=True) == [0, 1, 2]
    assert raw_redis.llen("branch_runs") == 3 and raw_redis.llen("integrator_runs") == 2


def test_a_run_of_one_dead_task_is_rerun(rerun_app, raw_redis, backend):
    run_id = rerun_app.enqueue("worker_step", {"i": 4, "poison": True})
    rerun_app.run_until_idle()
    raw_redis.set("poisoned", "0")
    assert rerun_app.client.rerun(run_id).requeued == [run_id]
    rerun_app.run_until_idle()
    assert rerun_app.client.result(run_id, wait_s=5, follow=True) == {"i": 4, "model": "model"}
    assert set(_model_calls(raw_redis).values()) == {1}


def test_a_cancelled_run_is_rerun_from_where_it_stopped(rerun_app, redis_url, raw_redis, backend):
    """Cancelled while its branches waited: the rerun lifts the run's cancel marks,
    sends the branches again from the JSON their records kept, and the integrator (its
    join fired while the run was cancelled) waits for them and runs once."""
    from handoff.testing import InProcessApp

    planner_only = InProcessApp("apps.steps", redis_url, agents=["rplanner"])
    try:
        run_id = planner_only.enqueue("rplanner", {"n": 4})
        planner_only.run_until_idle()  # its branches wait in their queue
        rerun_app.client.cancel(run_id, run=True)
    finally:
        planner_only.close()
    rerun_app.run_until_idle()
    assert rerun_app.client.status(run_id) == "done"
    assert raw_redis.llen("branch_runs") == 0 and raw_redis.llen("integrator_runs") == 0
    report = rerun_app.client.rerun(run_id)
    assert (len(report.requeued), len(report.rearmed)) == (4, 1), report.line()
    rerun_app.run_until_idle()
    assert rerun_app.client.result(run_id, wait_s=5, follow=True) == [0, 1, 2, 3]
    assert raw_redis.llen("branch_runs") == 4 and raw_redis.llen("integrator_runs") == 1


def test_rerun_through_real_worker_processes(start, client, raw_redis, redis_url, backend):
    """The same run as above on `handoff supervise` (a process per agent type), rerun
    with `handoff rerun`: the branches' ends reach the join in another slot through the
    outbox, before and after the rerun."""
    from handoff.cli import main
    from harness.procs import wait_until

    raw_redis.set("poisoned", "1")
    run_id = client.enqueue("rplanner", {"n": 20, "poison": POISONED})
    start(["supervise", "--agents", "rplanner=1,worker_step=1,rintegrator=1"], app="apps.steps")
    wait_until(lambda: client.status(run_id) == "done", 30, "the planner")
    wait_until(lambda: _run_ended(client, run_id), 30, "the run to end dead")
    assert raw_redis.llen("integrator_runs") == 0  # dead-lettered by on_dead="fail"
    raw_redis.set("poisoned", "0")
    said = CliRunner().invoke(main, ["--redis-url", redis_url, "rerun", run_id])
    assert said.exit_code == 0 and "4 dead or cancelled task(s) sent again" in said.output
    assert client.result(run_id, wait_s=30, follow=True) == list(range(20))
    runs = Counter(b.decode() for b in raw_redis.lrange("branch_runs", 0, -1))
    assert len(runs) == 20 and set(runs.values()) == {1}
    assert set(_model_calls(raw_redis).values()) == {1}
    assert raw_redis.llen("integrator_runs") == 1


def _run_ended(client, run_id: str) -> bool:
    try:
        client.result(run_id, wait_s=0.2, follow=True)
    except TaskDead:
        return True
    except Exception:
        return False
    return True
