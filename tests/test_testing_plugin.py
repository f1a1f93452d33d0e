"""handoff.testing: the fixtures a user's tests get from the plugin, used as a user would.

These tests use only the plugin's fixtures (handoff_server, handoff_app); the plugin is
loaded through its entry point, as in any project that installs handoff.
"""

from __future__ import annotations

import pytest
import redis


def test_the_planner_hands_each_step_to_a_coder(handoff_app):
    app = handoff_app("workers.demo", agents=["planner", "coder"])
    root = app.enqueue("planner", {"feature": "search", "steps": 3})
    runs = app.run_until_idle()
    coders = runs[root].children
    assert [runs[c].agent for c in coders] == ["coder"] * 3
    reviews = [runs[c].children[0] for c in coders]  # handed to the reviewer, not run here
    assert all(app.client.status(r) == "queued" for r in reviews)
    assert app.client.task(reviews[0])["task"]["payload"]["code"].startswith("def step_0()")


def test_a_whole_chain_runs_through_its_reviews_and_its_approval_to_the_merger(handoff_app):
    from workers.demo import approval_event

    app = handoff_app("workers.demo")
    root = app.enqueue("planner", {"feature": "export", "steps": 2})
    runs = app.run_until_idle()
    reviews = [e for e in runs.values() if e.agent == "reviewer" and e.status == "done"]
    assert {e.result["step"] for e in reviews if isinstance(e.result, dict)} == {0, 1}
    tree = app.client.tree(root)
    assert [c["agent"] for c in tree["children"]] == ["coder", "coder"]
    integrator = tree["then"]
    assert integrator["agent"] == "integrator" and integrator["status"] == "done"
    [merger] = integrator["children"]  # the merge waits for its approval, holding nothing
    assert merger["agent"] == "merger" and merger["status"] == "waiting"
    event = approval_event("export", root)
    assert integrator["wait"] == event
    assert app.client.signal(event, {"approved": True, "by": "ann"}) == 1
    app.run_until_idle()
    end = app.client.result(root, 5, follow=True)  # the run's one end: the merger's
    assert (end["verdict"], end["by"], end["published"]) == ("approved", "ann", True)
    merged = end["merged"]
    assert merged["feature"] == "export"
    assert sorted(merged["approved_steps"] + merged["failed_steps"]) == [0, 1]


def test_retries_come_due_on_the_virtual_clock_and_end_dead(
    handoff_app, handoff_server, monkeypatch
):
    monkeypatch.setenv("TEST_REDIS_URL", handoff_server)  # where the probe agents record
    app = handoff_app("apps.probe", agents=["flaky"])
    tid = app.enqueue("flaky", {"x": 1})
    runs = app.run_until_idle(timeout_s=5)
    assert runs[tid].status == "dead" and runs[tid].attempts == 2  # max_attempts=2
    assert "flaky failure" in runs[tid].reason
    assert app.client.status(tid) == "dead"


def test_a_bad_payload_is_refused_before_anything_is_written(handoff_app, handoff_server):
    app = handoff_app("workers.demo", agents=["planner"])
    try:
        app.enqueue("planner", {"feature": "x", "steps": 0})
    except Exception as e:
        assert type(e).__name__ == "InvalidPayload" and "field 'steps'" in str(e)
    else:
        raise AssertionError("a payload with steps=0 was accepted")
    assert redis.Redis.from_url(handoff_server).dbsize() == 0


def test_each_test_starts_with_an_empty_server(handoff_server):
    client = redis.Redis.from_url(handoff_server)
    assert client.dbsize() == 0
    client.set("left-behind", 1)  # the next test using the fixture must not see this


def test_a_task_delayed_an_hour_runs_on_the_virtual_clock(handoff_app):
    app = handoff_app("workers.demo", agents=["planner"])
    later = app.enqueue("planner", {"feature": "later", "steps": 1}, delay_s=3600)
    start_ms = app.clock.now_ms
    runs = app.run_until_idle(timeout_s=5)
    assert runs[later].status == "done"
    assert app.clock.now_ms - start_ms >= 3_599_000  # the clock moved, the test did not wait


@pytest.mark.parametrize(
    ("app_name", "agent", "payload", "least_s"),
    [
        ("apps.flows", "metered", {}, 3.5),  # rate="5/s": 20 starts take ~3.8 s
        ("apps.groups", "spender", {"units": 100}, 1.5),  # 1000 units/s, 100 each: ~1.9 s
    ],
)
def test_limited_agents_run_to_the_end_on_the_virtual_clock(
    handoff_app, handoff_server, monkeypatch, app_name, agent, payload, least_s
):
    """The clock jumps to the limiter's next admission (the claim says when), as it does
    to a retry: every queued task runs, in virtual time that obeys the limit."""
    monkeypatch.setenv("TEST_REDIS_URL", handoff_server)  # where the agents record
    app = handoff_app(app_name, agents=[agent])
    ids = app.client.enqueue_many(agent, [payload] * 20)
    start_ms = app.clock.now_ms
    runs = app.run_until_idle(timeout_s=10)
    assert [runs[t].status if t in runs else "not run" for t in ids] == ["done"] * 20
    assert least_s * 1000 <= app.clock.now_ms - start_ms <= 2 * least_s * 1000


def test_a_joins_run_result_is_its_then_tasks_as_the_client_says(
    handoff_app, handoff_server, monkeypatch
):
    monkeypatch.setenv("TEST_REDIS_URL", handoff_server)
    app = handoff_app("apps.flows", agents=["splitter", "step", "merge"])
    root = app.enqueue("splitter", {"n": 2})
    runs = app.run_until_idle(timeout_s=10)
    expected = {"merged": [[{"i": 0}], [{"i": 1}]]}
    assert app.client.result(root, 5, follow=True) == expected
    assert runs.result(root) == expected
    assert [(end.agent, end.status) for end in runs.ends(root)] == [("merge", "done")]
