"""Runs and joins, run in this process against a real server and a 3-primary cluster
(handoff.testing.InProcessApp settles tasks exactly as a worker does): a join's then-task
and the ends it finds, failure policies, nesting, result(follow=True), the run tree, and
bad joins. Killed processes: tests/faults/test_joins_killed.py."""

from __future__ import annotations

import threading
import time

import orjson
import pytest

from handoff import Handoff, Join
from handoff.errors import InvalidPayload, ResultTimeout, TaskDead
from handoff.testing import InProcessApp
from harness.async_facade import either
from harness.procs import command_calls, plain_client, wait_until

BACKENDS = ("server", "cluster")


@pytest.fixture
def app(redis_url, monkeypatch):
    monkeypatch.setenv("TEST_REDIS_URL", redis_url)  # where tests/apps/flows.py records
    made = InProcessApp("apps.flows", redis_url)
    yield made
    made.close()


@pytest.fixture(params=["Client", "AsyncClient"])
def reader(request, app):
    """Who reads the runs: the app's Client, then an AsyncClient."""
    if request.param == "Client":
        yield app.client
        return
    with either("AsyncClient", app.client.settings) as c:
        yield c


def merged(raw_redis) -> list[dict]:
    return [orjson.loads(item) for item in raw_redis.lrange("merged", 0, -1)]


def test_the_then_task_runs_once_after_every_branch_with_their_ends_in_order(app, raw_redis):
    root = app.enqueue("splitter", {"n": 4, "hops": 2, "fan": True})
    app.run_until_idle()
    [record] = merged(raw_redis)
    branches = record["branches"]
    assert len(branches) == 4  # one entry per listed handoff, in order
    for index, ends in enumerate(branches):
        assert len(ends) == 2  # each branch split in two at its first hop
        for end in ends:
            assert set(end) == {"id", "agent", "status", "result"}
            assert end["agent"] == "step" and end["status"] == "done"
            assert end["result"] == {"i": index}
    assert record["run"] == root
    ends_at = [orjson.loads(e)["at_ms"] for e in raw_redis.lrange("step_ends", 0, -1)]
    assert len(ends_at) == 8 and record["at_ms"] >= max(ends_at)
    assert app.client.result(root, 5, follow=True) == {
        "merged": [[{"i": i}, {"i": i}] for i in range(4)]
    }


def test_on_dead_fail_dead_letters_the_then_task_naming_the_end(app, raw_redis):
    root = app.enqueue("splitter", {"n": 3, "poison": [1], "on_dead": "fail"})
    app.run_until_idle()
    assert merged(raw_redis) == []  # the then handler never ran
    then_id = app.client.result(root)["join"]["then"]
    assert app.client.status(then_id) == "dead"
    dead_branch = app.client.result(root)["join"]["branches"][1]
    reason = app.client.dead_reason(then_id)
    assert reason.startswith(f"join branch 1 ended dead: task {dead_branch} (step): RuntimeError")
    with pytest.raises(TaskDead, match=f"task {then_id} \\(merge\\): join branch 1 ended dead"):
        app.client.result(root, 5, follow=True)


def test_on_dead_continue_runs_the_then_task_with_the_dead_end_listed(app, raw_redis):
    root = app.enqueue("splitter", {"n": 3, "poison": [0, 2], "on_dead": "continue"})
    app.run_until_idle()
    [record] = merged(raw_redis)
    statuses = [[end["status"] for end in ends] for ends in record["branches"]]
    assert statuses == [["dead"], ["done"], ["dead"]]
    dead_end = record["branches"][0][0]
    assert set(dead_end) == {"id", "agent", "status", "reason"}
    assert dead_end["reason"] == "RuntimeError: poisoned branch 0"
    assert app.client.result(root, 5, follow=True) == {"merged": [[None], [{"i": 1}], [None]]}


def test_nested_joins_end_inside_out(app, raw_redis):
    root = app.enqueue("splitter", {"n": 3, "nest": [0, 2]})
    app.run_until_idle()
    [record] = merged(raw_redis)
    results = [[end["result"] for end in ends] for ends in record["branches"]]
    assert results == [
        [{"i": 0, "inner": [[{"i": 0}], [{"i": 1}]]}],
        [{"i": 1}],
        [{"i": 2, "inner": [[{"i": 200}], [{"i": 201}]]}],
    ]
    inner_then = [orjson.loads(e) for e in raw_redis.lrange("step_ends", 0, -1)]
    nested_at = [e["at_ms"] for e in inner_then if e["id"] in {ends[0]["id"] for ends in
                 (record["branches"][0], record["branches"][2])}]  # fmt: skip
    assert len(nested_at) == 2 and record["at_ms"] >= max(nested_at)
    tree = app.client.tree(root)
    nested = tree["children"][0]
    assert nested["join"] and [c["status"] for c in nested["children"]] == ["done", "done"]
    assert nested["then"]["id"] == record["branches"][0][0]["id"]


def test_follow_returns_the_single_end_the_list_of_ends_or_the_task_itself(app, reader):
    single = app.enqueue("echo", {"x": 1})
    chain = app.enqueue("echo", {"x": 2, "next": "echo"})
    app.run_until_idle()
    assert reader.result(single, 5, follow=True) == {"x": 1}
    assert reader.result(chain, 5, follow=True) == {"x": 2}
    assert reader.result(chain, 5) == {"handoff": [reader.tree(chain)["children"][0]["id"]]}
    fan = app.enqueue("splitter", {"n": 2, "hops": 1, "fan": True})
    app.run_until_idle()
    step = reader.tree(fan)["children"][0]["id"]
    # A task inside a run follows the run it belongs to.
    assert reader.result(step, 5, follow=True) == {"merged": [[{"i": 0}] * 2, [{"i": 1}] * 2]}


def test_a_follow_waiter_blocks_without_polling_and_wakes_at_the_end(
    app, reader, raw_redis, backend
):
    root = app.enqueue("splitter", {"n": 20})
    got: dict = {}
    waiter = threading.Thread(target=lambda: got.update(value=reader.result(root, 30, follow=True)))
    before = command_calls(raw_redis)
    waiter.start()
    time.sleep(1.0)  # the waiter sits in Redis for this long: count what it sent meanwhile
    during = command_calls(raw_redis)
    app.run_until_idle()
    waiter.join(10)
    assert got["value"] == {"merged": [[{"i": i}] for i in range(20)]}
    sent = {name: during.get(name, 0) - before.get(name, 0) for name in during}
    assert sent.get("blmove", 0) <= 2, sent  # one blocking call per read_timeout_s / 2
    assert sent.get("evalsha", 0) <= 2, sent  # the follow script, not a polling loop


def test_follow_times_out_on_an_open_run_and_fails_on_an_unknown_one(app, reader):
    root = app.enqueue("splitter", {"n": 1})
    with pytest.raises(ResultTimeout, match=f"run {root} has not ended after 0.2s"):
        reader.result(root, 0.2, follow=True)
    with pytest.raises(ResultTimeout, match="is unknown"):
        reader.result("splitter.nosuchtask", 1, follow=True)


def test_the_tree_matches_what_the_handlers_did(app, reader, raw_redis):
    root = app.enqueue("splitter", {"n": 2, "hops": 1, "fan": True, "poison": [1]})
    runs = app.run_until_idle()
    tree = reader.tree(root)
    assert tree["id"] == root and tree["status"] == "done" and tree["join"]
    assert [c["id"] for c in tree["children"]] == reader.result(root)["join"]["branches"]
    first, poisoned = tree["children"]
    # each branch: its index, its payload in short (the join's record keeps them)
    labels = [(c["branch"], c["label"][:7]) for c in (first, poisoned)]
    assert labels == [(0, '{"i":0,'), (1, '{"i":1,')]
    assert [c["id"] for c in first["children"]] == runs[first["id"]].children
    assert all(c["status"] == "done" and c["result"] == {"i": 0} for c in first["children"])
    assert poisoned["status"] == "dead" and poisoned["reason"].startswith("RuntimeError")
    then = tree["then"]
    assert then["agent"] == "merge" and then["status"] == "dead"  # on_dead="fail"
    for node in (tree, first, *first["children"]):
        assert node["attempt"] == 1 and isinstance(node["ran_ms"], float)
        assert isinstance(node["enqueued_at"], int) and isinstance(node["finished_at"], int)


def test_an_unknown_tree_is_a_one_line_error(app, reader):
    with pytest.raises(InvalidPayload, match=r"^run splitter\.nope is unknown"):
        reader.tree("splitter.nope")


@pytest.mark.parametrize(
    ("join", "reason"),
    [
        (Join([], then=Handoff("merge", {})), "join has no branches"),
        (Join([Handoff("step", {})], then="merge"), "join then must be a Handoff, not str"),
        (
            Join([Handoff("step", {})], then=Handoff("merge", {}), on_dead="ignore"),
            "join on_dead 'ignore' is not one of fail, continue",
        ),
        (
            Join([Handoff("step", {"i": i}) for i in range(4)], then=Handoff("merge", {})),
            "join has 4 branches, over max_join_branches (3)",
        ),
        (Join([Handoff("step", {}), {"x": 1}], then=Handoff("merge", {})), "join branches must"),
    ],
)
def test_a_bad_join_fails_its_task_with_one_line_and_nothing_else(
    redis_url, raw_redis, monkeypatch, join, reason
):
    from handoff.protocol.queue import ClaimRequest
    from handoff.runtime.agents import get_spec
    from handoff.runtime.runner import Outcome
    from handoff.runtime.settle import settle

    monkeypatch.setenv("TEST_REDIS_URL", redis_url)
    app = InProcessApp("apps.flows", redis_url, max_join_branches=3)
    try:
        neighbour = app.enqueue("echo", {"x": 1})
        bad = app.enqueue("splitter", {"n": 1})
        [task] = app.queue.claim([ClaimRequest("splitter", 1, 10_000)])["splitter"]
        assert task.id == bad
        spec = get_spec("apps.flows", "splitter")
        completion, failure, made = settle(Outcome(task, join), spec, app.settings)
        assert completion is None and made == [] and failure.dead_now
        assert failure.error.startswith(reason) and "\n" not in failure.error
        app.queue.nack([failure])
        assert app.client.status(bad) == "dead"
        assert app.client.dead_reason(bad) == failure.error
        assert app.client.status(neighbour) == "queued"
        assert raw_redis.llen("merged") == 0
        wait_until(lambda: app.client.status(bad) == "dead", 1, "the dead letter")
    finally:
        app.close()


def test_a_joiner_that_died_before_its_ack_returns_its_join_again_and_then_runs_once(
    app, raw_redis
):
    """The crash window between a Join's branches (enqueued) and its ack: the lease
    expires, the splitter runs again and returns the same Join; branches are the same
    ids, and the then-task runs once."""
    from handoff.protocol.queue import ClaimRequest
    from handoff.runtime.agents import get_spec
    from handoff.runtime.runner import Outcome
    from handoff.runtime.settle import settle

    spec = get_spec("apps.flows", "splitter")
    root = app.enqueue("splitter", {"n": 3})
    now = app.clock.now_ms
    [first] = app.queue.claim([ClaimRequest("splitter", 1, 1000)], now_ms=now)["splitter"]
    _, _, made = settle(Outcome(first, spec.handler(first)), spec, app.settings)
    app.queue.enqueue(made, now_ms=now)  # ... and the worker dies before its ack
    app.run_until_idle()  # the branches run meanwhile; the join cannot fire yet
    assert raw_redis.llen("merged") == 0
    app.clock.advance(2.0)  # past the lease: the splitter is delivered again
    runs = app.run_until_idle()
    assert raw_redis.llen("planned") == 2 and runs[root].status == "done"
    [record] = merged(raw_redis)
    assert [[e["result"] for e in ends] for ends in record["branches"]] == [
        [{"i": 0}], [{"i": 1}], [{"i": 2}]
    ]  # fmt: skip
    assert app.client.result(root, 5, follow=True)["merged"] == [[{"i": 0}], [{"i": 1}], [{"i": 2}]]


def test_notices_a_dead_worker_left_in_its_outbox_are_delivered_by_the_reaper(
    app, raw_redis, monkeypatch
):
    """The crash window between an ack (its notices written to the outbox in the same
    script) and their delivery: the run stays open until the reaper delivers them."""
    root = app.enqueue("echo", {"i": 7, "next": "step"})  # the step reports to echo's slot
    # The worker dies after its ack reached the server, before its notices did (on one
    # server they ride behind the ack in its pipeline; on a cluster they follow it).
    monkeypatch.setattr(type(app.queue), "deliver", lambda self, *a, **k: False)
    monkeypatch.setattr(type(app.queue), "_checked_deliveries", lambda self, *a, **k: ([], []))
    app.run_until_idle()
    monkeypatch.undo()
    child = app.client.tree(root)["children"][0]["id"]
    assert app.client.status(child) == "done"
    with pytest.raises(ResultTimeout):
        app.client.result(root, 0.1, follow=True)  # the child's end is still in its outbox
    outbox = app.queue.keys.agent("step").outbox
    assert raw_redis.hlen(outbox) == 1
    app.queue.reap(["step"], now_ms=app.clock.now_ms + 1000)  # within the grace: not yet
    assert raw_redis.hlen(outbox) == 1
    app.queue.reap(["step"], now_ms=app.clock.now_ms + 6000)
    assert raw_redis.hlen(outbox) == 0
    assert app.client.result(root, 5, follow=True) == {"i": 7}


def test_a_root_that_handed_off_then_lost_its_ack_and_ended_plainly_still_ends_its_run(app):
    """A handler that is not deterministic: the root's first delivery handed off (the child
    ran and reported to the run) but its ack was lost; run again, it returns a value. The
    run ends with both ends, in the order they came (first transition wins)."""
    from handoff.protocol.queue import ClaimRequest
    from handoff.runtime.agents import get_spec
    from handoff.runtime.runner import Outcome
    from handoff.runtime.settle import settle

    spec = get_spec("apps.flows", "echo")
    root = app.enqueue("echo", {"i": 3})
    now = app.clock.now_ms
    [first] = app.queue.claim([ClaimRequest("echo", 1, 1000)], now_ms=now)["echo"]
    _, _, made = settle(Outcome(first, Handoff("step", {"i": 4})), spec, app.settings)
    app.queue.enqueue(made, now_ms=now)  # ... and the ack is lost
    app.run_until_idle()  # the child runs and reports to the run, before the root's step
    app.clock.advance(2.0)
    app.run_until_idle()  # the root runs again and returns {"i": 3}
    assert app.client.result(root, 5, follow=True) == [{"i": 4}, {"i": 3}]


def test_inspect_tree_prints_the_run_indented_and_as_json(app, redis_url, monkeypatch, capsys):
    from click.testing import CliRunner

    from handoff.cli import main, run

    root = app.enqueue("splitter", {"n": 2, "hops": 1, "poison": [1]})
    app.run_until_idle()
    base = ["--redis-url", redis_url, "--app", "apps.flows", "inspect", "tree"]
    shown = CliRunner().invoke(main, [*base, root])
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert lines[0].startswith(f"[ok]  splitter  {root}") and "join of 2" in lines[0]
    assert lines[1].startswith("├─ [ok]  step  ") and lines[1].endswith("-> 1")
    assert lines[2].startswith("│  └─ [ok]  step  ") and lines[2].endswith('= {"i":0}')
    assert (
        lines[3].startswith("├─ [DEAD]  step  ") and "! RuntimeError: poisoned branch 1" in lines[3]
    )
    assert lines[4].startswith("└─ then [DEAD]  merge  ") and "join branch 1 ended dead" in lines[4]
    assert len(lines) == 5
    as_json = CliRunner().invoke(main, [*base, root, "--json"])
    assert orjson.loads(as_json.output) == app.client.tree(root)
    monkeypatch.setattr("sys.argv", ["handoff", *base, "splitter.nosuchrun"])
    with pytest.raises(SystemExit) as exit_:
        run()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert "run splitter.nosuchrun is unknown (never enqueued, or its tree expired)" in err


@pytest.mark.backends("server")
def test_every_key_of_a_run_expires_whatever_its_joins_then_task_ends_as(redis_url, monkeypatch):
    """Three joins whose then-tasks end dead (on_dead="fail"), cancelled (the run cancelled
    before the join fires) and expired (the run's deadline passed before it started): no
    key of theirs lives on without a TTL (only the agents' standing keys have none), and
    a join's state lives at most as long as its run's records (run_ttl_s, result_ttl_s)."""
    from handoff.protocol.keys import AGENT_KEY_NAMES, Keys
    from handoff.testing import VirtualClock

    monkeypatch.setenv("TEST_REDIS_URL", redis_url)
    clock = VirtualClock()
    apps = [
        InProcessApp("apps.flows", redis_url, agents, clock=clock, run_ttl_s=60, result_ttl_s=60)
        for agents in (["splitter", "step", "merge"], ["splitter", "step"], ["splitter"])
    ]
    try:
        everything, no_merge, splitter_only = apps
        dead = everything.enqueue("splitter", {"n": 2, "poison": [1], "on_dead": "fail"})
        everything.run_until_idle()
        cancelled = splitter_only.enqueue("splitter", {"n": 2})
        splitter_only.run_until_idle()
        everything.client.cancel(cancelled, run=True)
        expired = no_merge.enqueue("splitter", {"n": 2}, run_deadline_s=5)
        no_merge.run_until_idle()
        clock.advance(10)
        everything.run_until_idle()
        client = everything.client
        ends = {dead: "dead", cancelled: "cancelled", expired: "expired"}
        for root, status in ends.items():
            assert client.status(client.result(root)["join"]["then"]) == status
    finally:
        for app in apps:
            app.close()
    keys = Keys("handoff")
    standing = {f"{keys.agent(a).base}:{n}" for a in ("splitter", "step", "merge")
                for n in (*AGENT_KEY_NAMES, "watched:runs")} | {keys.agents}  # fmt: skip
    raw = plain_client(redis_url)
    joins, forever = 0, []
    for key in raw.scan_iter(match="handoff:*", count=1000):
        key = key.decode()
        ttl_ms = raw.pttl(key)
        if ttl_ms == -1 and key not in standing:
            forever.append(key)
        if ":scope:merge." in key or ":ends:merge." in key:
            joins += 1
            assert 0 < ttl_ms <= 60_000, (key, ttl_ms)
    assert not forever, forever
    assert joins >= 3  # the three joins' state was there, and expires
