"""handoff.testing: the fixtures a user's tests get from the plugin, used as a user would.

These tests use only the plugin's fixtures (handoff_server, handoff_app); the plugin is
loaded through its entry point, as in any project that installs handoff.
"""

from __future__ import annotations

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


def test_a_whole_chain_runs_through_its_reviews_to_the_integrator(handoff_app):
    app = handoff_app("workers.demo")
    root = app.enqueue("planner", {"feature": "export", "steps": 2})
    runs = app.run_until_idle()
    reviews = [e for e in runs.values() if e.agent == "reviewer" and e.status == "done"]
    assert {e.result["step"] for e in reviews if isinstance(e.result, dict)} == {0, 1}
    merged = app.client.result(root, 5, follow=True)  # the run's one end: the integrator's
    assert merged["feature"] == "export"
    assert sorted(merged["approved_steps"] + merged["failed_steps"]) == [0, 1]
    tree = app.client.tree(root)
    assert [c["agent"] for c in tree["children"]] == ["coder", "coder"]
    assert tree["then"]["agent"] == "integrator" and tree["then"]["status"] == "done"


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
