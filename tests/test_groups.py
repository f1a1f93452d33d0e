"""Groups (issue 16): fair rotation between groups, each group's start rate and
concurrency, RateLimited pausing one group, live changes, bad input; real worker
processes on a server and a 3-primary cluster (the rotation's order in-process too)."""

from __future__ import annotations

import signal
import time

import orjson
import pytest
from click.testing import CliRunner

from handoff import Handoff
from handoff.cli import main
from handoff.errors import ConfigError, InvalidPayload
from harness.procs import stat, wait_until

BACKENDS = ("server", "cluster")


@pytest.fixture
def workers(start):
    """workers(agent, n=1, **settings): n `handoff worker AGENT` processes (apps.groups)."""
    return lambda agent, n=1, **settings: [
        start(["worker", agent], app="apps.groups", **settings) for _ in range(n)
    ]


def _starts(raw_redis, name: str = "gstarts") -> list[dict]:
    return [orjson.loads(item) for item in raw_redis.lrange(name, 0, -1)]


def _worst_second(times_ms: list[float]) -> int:
    times_ms = sorted(times_ms)
    return max(sum(1 for t in times_ms if start <= t < start + 1000) for start in times_ms)


@pytest.fixture
def app(redis_url, monkeypatch):
    from handoff.testing import InProcessApp

    monkeypatch.setenv("TEST_REDIS_URL", redis_url)
    made = InProcessApp("apps.groups", redis_url, agents=["fair"])
    yield made
    made.close()


def test_one_task_of_a_small_group_waits_at_most_one_rotation(app, raw_redis):
    """5,000 tasks of one group enqueued first, then one each for 20 groups: all 20 start
    within the first 21 starts (one turn of the big group, then each once)."""
    for start in range(0, 5_000, 1_000):
        app.client.enqueue_many(
            "fair", [{"n": i} for i in range(start, start + 1_000)], group="big"
        )
    small = [app.enqueue("fair", {"n": g}, group=f"customer-{g}") for g in range(20)]
    ungrouped = app.enqueue("fair", {"n": -1})
    assert app.client.status(small[0]) == "queued"
    stats = app.client.queue_stats(["fair"])["fair"]
    assert stats["queued"] == 5_021 and stats["groups_ready"] == 21
    assert stats["busiest_groups"][0] == {
        "group": "big", "ready": 5_000, "running": 0, "waiting_s": 0.0
    }  # fmt: skip
    shown = CliRunner().invoke(main, ["--redis-url", app.settings.redis.url, "inspect", "queues"])
    assert "fair groups: 21 ready, none waiting; busiest: big 5000 ready 0 running" in shown.output
    app.run_until_idle(timeout_s=120, batch=10)
    order = [s["id"] for s in _starts(raw_redis)]
    assert len(order) == 5_021 and len(set(order)) == 5_021
    positions = sorted(order.index(t) for t in [*small, ungrouped])
    assert positions[-1] <= 21, positions  # within one rotation of the 21 others
    assert app.client.queue_stats(["fair"])["fair"]["queued"] == 0


def test_a_higher_priority_goes_first_and_handoffs_keep_their_group(app, raw_redis):
    app.client.enqueue_many("fair", [{"n": i} for i in range(5)], group="a")
    urgent = app.enqueue("fair", {"n": 99, "next": True}, group="b", priority=-5)
    app.run_until_idle(batch=1)
    starts = _starts(raw_redis)
    assert starts[0]["id"] == urgent  # priority first, whatever the rotation says
    child = [s for s in starts if s["id"].startswith("fair.k")]
    assert len(child) == 1 and child[0]["group"] == "b"


def test_group_names_and_limits_are_checked_in_one_line(app):
    for bad in ("", "x" * 129, "a{b}", "with space", "tab\t", 42):
        with pytest.raises(InvalidPayload, match="invalid group") as e:
            app.enqueue("fair", {}, group=bad)
        assert "\n" not in str(e.value)
    with pytest.raises(InvalidPayload, match="invalid Handoff group"):
        Handoff("fair", {}, group="{x}")
    from handoff import agent

    with pytest.raises(ConfigError, match=r"agent 'g1': group_rate .*expected N/s"):
        agent("g1", group_rate="fast")(lambda task: None)
    with pytest.raises(ConfigError, match="group_concurrency"):
        agent("g2", group_concurrency=-1)(lambda task: None)


def test_three_groups_each_start_at_their_own_rate_at_once(client, raw_redis, workers):
    """group_rate="5/s", 2 worker processes x 50 slots, 3 groups of 25 tasks: every group
    holds 5 starts in any sliding second and keeps to 95 % of it, all three at once."""
    for group in ("red", "green", "blue"):
        client.enqueue_many("paced", [{"n": i} for i in range(25)], group=group)
    workers("paced", 2)
    wait_until(lambda: raw_redis.llen("gstarts") >= 75, 60, "the 75 starts")
    starts = _starts(raw_redis)
    spans = []
    for group in ("red", "green", "blue"):
        times = sorted(s["at_ms"] for s in starts if s["group"] == group)
        assert len(times) == 25 and _worst_second(times) <= 5, (group, times)
        rate = (len(times) - 1) / ((times[-1] - times[0]) / 1000)
        assert rate >= 0.95 * 5, (group, rate)
        spans.append((times[0], times[-1]))
    assert max(s for s, _ in spans) < min(e for _, e in spans)  # they ran side by side


def test_a_groups_concurrency_cap_holds_and_the_others_go_on(client, raw_redis, workers):
    for group in ("a", "b", "c"):
        client.enqueue_many("capped", [{"sleep_s": 0.15} for _ in range(8)], group=group)
    workers("capped", 2)
    wait_until(lambda: raw_redis.llen("gends") >= 24, 60, "the 24 tasks")
    events = [(s["at_ms"], 1, s["group"]) for s in _starts(raw_redis)]
    events += [(s["at_ms"], -1, s["group"]) for s in _starts(raw_redis, "gends")]
    running: dict[str, int] = {}
    peak: dict[str, int] = {}
    for _, delta, group in sorted(events, key=lambda e: (e[0], e[1])):
        running[group] = running.get(group, 0) + delta
        peak[group] = max(peak.get(group, 0), running[group])
    assert peak == {"a": 2, "b": 2, "c": 2}  # each at its cap, none over
    wait_until(lambda: stat(client, "capped", "done") == 24, 10, "every ack")  # ends come first
    assert not raw_redis.hlen("handoff:{capped}:group_running")  # nothing left counted


def test_rate_limited_pauses_its_group_everywhere_and_the_others_go_on(client, raw_redis, workers):
    """RateLimited(2) in group "hot": "hot" starts nothing on any worker for 2 s (the task
    then runs, its attempt unchanged) while "cool" keeps starting."""
    workers("courteous", 2)
    limited = client.enqueue("courteous", {"limited_s": 2}, group="hot")
    wait_until(lambda: raw_redis.exists(f"limited:{limited}"), 20, "the 429")
    # (the pause is set a few ms after the raise, by the worker that saw it)
    parked = "handoff:{courteous}:parked"
    wait_until(lambda: raw_redis.zscore(parked, "hot"), 5, "the group to be paused")
    hot = client.enqueue_many("courteous", [{"n": i} for i in range(3)], group="hot")
    cool = client.enqueue_many(
        "courteous", [{"n": i, "sleep_s": 0.1} for i in range(20)], group="cool"
    )
    wait_until(lambda: stat(client, "courteous", "done") == 24, 30, "every task")
    starts = _starts(raw_redis)
    first = next(s for s in starts if s["id"] == limited)
    again = [s for s in starts if s["id"] == limited][1]
    paused_s = (again["at_ms"] - first["at_ms"]) / 1000
    assert 1.9 <= paused_s <= 2.3, paused_s
    assert again["attempt"] == first["attempt"] == 1
    hot_starts = [s["at_ms"] for s in starts if s["id"] in hot]
    assert min(hot_starts) >= first["at_ms"] + 1900  # nothing of "hot" in the pause
    cool_starts = [s["at_ms"] for s in starts if s["id"] in cool]
    assert min(cool_starts) < first["at_ms"] + 1000  # "cool" went on meanwhile


def test_a_live_group_rate_change_takes_effect_within_a_second(
    client, raw_redis, workers, redis_url
):
    client.enqueue_many("paced", [{"n": i} for i in range(200)], group="g")
    workers("paced", 1)
    wait_until(lambda: raw_redis.llen("gstarts") >= 5, 20, "the first starts at 5/s")
    result = CliRunner().invoke(
        main, ["--redis-url", redis_url, "limits", "paced", "group_rate=50/s"]
    )
    assert result.exit_code == 0 and "group_rate 50/s (set live)" in result.output
    changed_ms = time.time() * 1000
    wait_until(lambda: raw_redis.llen("gstarts") >= 150, 20, "the faster starts")
    later = sorted(s["at_ms"] for s in _starts(raw_redis) if s["at_ms"] > changed_ms + 1000)
    assert len(later) >= 20 and _worst_second(later) > 20  # well past 5/s within a second
    bad = CliRunner().invoke(main, ["--redis-url", redis_url, "limits", "paced", "group_rate=x"])
    assert bad.exit_code == 2 and "group_rate" in bad.output


def test_idle_groups_leave_no_keys_behind(client, raw_redis, workers):
    for group in ("one", "two"):
        client.enqueue_many("capped", [{"sleep_s": 0} for _ in range(3)], group=group)
    proc = workers("capped", 1)[0]
    wait_until(lambda: stat(client, "capped", "done") == 6, 30, "the 6 tasks")
    proc.signal(signal.SIGTERM)
    proc.wait(10)
    base = "handoff:{capped}"
    for key in (":groups", ":parked", ":task_groups", ":group_running", ":gq:one", ":gq:two"):
        assert not raw_redis.exists(base + key), key
    stats = client.queue_stats(["capped"])["capped"]
    assert stats["queued"] == 0 and stats["groups_ready"] == stats["groups_waiting"] == 0


def test_a_cost_limit_holds_the_units_charged_per_window(client, raw_redis, workers):
    """cost_limit="1000/s" and handlers charging 100 each (the issue's 1000/min scaled to
    a second, to stay quick): at most 10 starts in any sliding second, across 2 worker
    processes of 50 slots, and close to 10/s once the first charge is known."""
    client.enqueue_many("spender", [{"n": i} for i in range(60)])
    workers("spender", 2)
    wait_until(lambda: raw_redis.llen("gstarts") >= 30, 30, "30 starts")
    times = sorted(s["at_ms"] for s in _starts(raw_redis))
    assert _worst_second(times) <= 10, times
    later = [t for t in times if t >= times[1]]  # after the first charge landed
    rate = (len(later) - 1) / ((later[-1] - later[0]) / 1000)
    assert 8.5 <= rate <= 10, rate


def test_a_bad_charge_fails_its_task_with_one_line(app):
    from handoff import Task
    from handoff.errors import InvalidPayload

    task = Task("spender.1", "spender", {})
    for bad in (-1, "lots", float("nan"), True, 10**13):
        with pytest.raises(InvalidPayload, match=r"^charge\(.*\): units must be a number") as e:
            task.charge(bad)
        assert "\n" not in str(e.value)
    task.charge(2.5)
    task.charge(0)
    assert task.charged == 2.5


def test_prometheus_shows_the_busiest_groups(app):
    """The monitor's snapshot carries each agent's busiest groups; the exporter shows them
    per agent and group (ready, running, waiting)."""
    from prometheus_client.core import CollectorRegistry
    from prometheus_client.exposition import generate_latest

    from handoff.observe.metrics_export import SnapshotCollector
    from handoff.observe.monitor import Monitor

    app.client.enqueue_many("fair", [{"n": i} for i in range(7)], group="acme")
    app.client.enqueue_many("fair", [{"n": i} for i in range(2)], group="globex")
    snapshot = Monitor(app.queue).snapshot()
    registry = CollectorRegistry()
    registry.register(SnapshotCollector(lambda: snapshot))
    text = generate_latest(registry).decode()
    assert 'handoff_group_ready{agent="fair",group="acme"} 7.0' in text
    assert 'handoff_group_ready{agent="fair",group="globex"} 2.0' in text
    assert 'handoff_groups_ready{agent="fair"} 2.0' in text


def _limits(redis_url, *changes):
    result = CliRunner().invoke(main, ["--redis-url", redis_url, "limits", "capped", *changes])
    assert result.exit_code == 0, result.output


def _ended(raw_redis, group: str) -> int:
    return sum(1 for s in _starts(raw_redis, "gends") if s["group"] == group)


@pytest.mark.backends("server")
@pytest.mark.parametrize("restored", [False, True], ids=["cap-lifted", "cap-restored"])
def test_a_live_group_cap_change_strands_no_group(client, raw_redis, workers, redis_url, restored):
    """group_concurrency=2 with g1 at its cap, set live to 0; a claim runs (a g2 task) and
    g1's two leases end under no cap. Then (cap-restored) one more g1 task and the declared
    cap back: every g1 task runs, and the group's running count ends at nothing, whatever
    the cap was when each lease began and ended."""
    client.enqueue_many("capped", [{"sleep_s": 1.0} for _ in range(10)], group="g1")
    workers("capped", 1)
    wait_until(lambda: raw_redis.llen("gstarts") >= 2, 20, "g1 at its cap of 2")
    first_two = [s["id"] for s in _starts(raw_redis)[:2]]
    _limits(redis_url, "group_concurrency=0")
    client.enqueue("capped", {"sleep_s": 0}, group="g2")
    wait_until(lambda: _ended(raw_redis, "g2"), 5, "a claim under no cap (g2's task)")
    # A lease ends at the ack, after the handler's end record: waited for by status, so
    # both end under no cap before the cap-restored case puts the cap back.
    wait_until(
        lambda: {client.status(t) for t in first_two} == {"done"}, 5, "g1's first two leases to end"
    )
    total = 10
    if restored:
        _limits(redis_url, "group_concurrency=default")
        client.enqueue("capped", {"sleep_s": 0}, group="g1")
        total = 11
    wait_until(lambda: _ended(raw_redis, "g1") == total, 10, f"all {total} g1 tasks")
    # A handler records its end before its ack: the count is read once every ack is in
    # (g1's and g2's), when a stranded count would stay.
    wait_until(lambda: stat(client, "capped", "done") == total + 1, 10, "every ack")
    assert not raw_redis.hlen("handoff:{capped}:group_running")  # nothing left counted
    assert not raw_redis.exists("handoff:{capped}:groups", "handoff:{capped}:gq:g1")
