"""Cancellation (issue 15): client.cancel and `handoff cancel` end queued, delayed and
running tasks, or a whole run on every agent; real worker processes and real signals, on
a server and a 3-primary cluster."""

from __future__ import annotations

import random
import signal
import statistics
import sys
import threading
import time
from collections import Counter

import orjson
import psutil
import pytest
from click.testing import CliRunner

from handoff import TaskCancelled
from handoff.cli import main, run
from handoff.errors import InvalidPayload
from harness.procs import stat, stop_process, wait_until

BACKENDS = ("server", "cluster")


@pytest.fixture
def run_handoff(start):
    """run_handoff(args, **settings): a `handoff` process with the apps.cancels agents."""
    return lambda args, **settings: start(args, app="apps.cancels", **settings)


def _records(raw_redis, name: str) -> list[dict]:
    return [orjson.loads(item) for item in raw_redis.lrange(name, 0, -1)]


def _wait_record(raw_redis, name: str, task_id: str, timeout_s: float = 20) -> dict:
    """The first record of task_id in the list `name` (starts, stopped), once it is there."""

    def recorded():
        return next((r for r in _records(raw_redis, name) if r["id"] == task_id), None)

    return wait_until(recorded, timeout_s, f"{task_id} in {name}", step_s=0.002)


def _wait_started(raw_redis, task_id: str) -> dict:
    return _wait_record(raw_redis, "starts", task_id)


def test_cancelled_queued_tasks_never_start_and_the_others_all_run(client, raw_redis, run_handoff):
    ids = []
    for start in range(0, 10_000, 2_000):
        ids += client.enqueue_many("noop", [{"n": n} for n in range(start, start + 2_000)])
    doomed = set(random.Random(15).sample(ids, 1_000))
    for task_id in doomed:
        assert client.cancel(task_id).was == {"queued": 1}
    run_handoff(["worker", "noop"])
    wait_until(lambda: stat(client, "noop", "done") == 9_000, 60, "the 9,000 others to run")
    ran = [i.decode() for i in raw_redis.lrange("ran", 0, -1)]
    assert len(ran) == 9_000 and set(ran) == set(ids) - doomed  # each once, none cancelled
    assert {client.status(t) for t in random.Random(1).sample(sorted(doomed), 20)} == {"cancelled"}
    stats = client.queue_stats(["noop"])["noop"]
    assert stats["cancelled"] == 1_000 and stats["queued"] == 0
    with pytest.raises(TaskCancelled, match="was cancelled"):
        client.result(next(iter(doomed)), 1)


def test_a_delayed_task_is_cancelled_and_a_finished_or_unknown_one_is_left_alone(either_client):
    client = either_client
    later = client.enqueue("noop", {}, delay_s=60)
    report = client.cancel(later)
    assert report.was == {"delayed": 1} and "never starts" in report.line()
    assert client.status(later) == "cancelled"
    again = client.cancel(later)
    assert again.was == {"cancelled": 1} and again.line().endswith("nothing changed")
    unknown = client.cancel("noop.nothing-here")
    assert unknown.line() == "task noop.nothing-here is unknown: nothing to cancel"


def test_cancel_of_a_malformed_id_is_one_line_and_exit_2(redis_url, client, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["handoff", "--redis-url", redis_url, "cancel", "a b"])
    with pytest.raises(SystemExit) as exited:
        run()
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.count("\n") == 1
    assert err.startswith("handoff: error: invalid task id 'a b'")
    with pytest.raises(InvalidPayload, match="invalid task id"):
        client.cancel("{bad}")


def test_a_cancelled_async_handler_gets_cancelled_error_at_once(
    either_client, raw_redis, run_handoff
):
    """50 trials: the time from the cancel call to the handler's CancelledError."""
    client = either_client
    run_handoff(["worker", "patient"])
    delays_ms = []
    for trial in range(50):
        task_id = client.enqueue("patient", {"trial": trial})
        _wait_started(raw_redis, task_id)
        called_ms = time.time() * 1000
        assert client.cancel(task_id).was == {"running": 1}
        stop = _wait_record(raw_redis, "stopped", task_id, 10)
        assert stop["how"] == "CancelledError"
        delays_ms.append(stop["at_ms"] - called_ms)
        assert client.status(task_id) == "cancelled"
    delays_ms.sort()
    p99 = delays_ms[int(len(delays_ms) * 0.99) - 1]
    print(f"cancel -> CancelledError: p50 {statistics.median(delays_ms):.1f} ms, p99 {p99:.1f} ms")
    # Told at once, not at a poll: quietly p50 0.8 ms and p99 1.4 ms; a loaded CI machine
    # stretches the tail, so the bound is on the median, with the tail well under a second.
    assert statistics.median(delays_ms) < 100 and p99 < 1000, delays_ms


def test_a_sync_handler_waiting_on_its_flag_stops_at_once(client, raw_redis, run_handoff):
    run_handoff(["worker", "polite"])
    delays_ms = []
    for trial in range(10):
        task_id = client.enqueue("polite", {"trial": trial})
        _wait_started(raw_redis, task_id)
        called_ms = time.time() * 1000
        client.cancel(task_id)
        stop = _wait_record(raw_redis, "stopped", task_id, 10)
        assert stop["how"] == "flag"
        delays_ms.append(stop["at_ms"] - called_ms)
    delays_ms.sort()
    assert delays_ms[5] < 100 and delays_ms[-1] < 1000, delays_ms  # (a busy CI: the median)
    stats = client.queue_stats(["polite"])["polite"]
    assert stats["cancelled"] == 10 and stats["failed"] == 0 and stats["done"] == 0


def test_a_handler_that_ignores_its_cancel_is_stopped_and_nothing_else_is_lost(
    client, raw_redis, run_handoff
):
    sup = run_handoff(["supervise", "--agents", "stubborn=1"], cancel_grace_s=1, lease_s=3)
    wait_until(lambda: sup.live_children(), 20, "the worker")
    first = sup.live_children()[0].pid
    long = client.enqueue("stubborn", {"sleep_s": 60})
    _wait_started(raw_redis, long)
    short = client.enqueue_many("stubborn", [{"sleep_s": 1.5} for _ in range(3)])
    for task_id in short:
        _wait_started(raw_redis, task_id)
    client.cancel(long)

    def recycle_reasons() -> set[bytes]:
        ids = raw_redis.zrange("handoff:workers", 0, -1)
        return {raw_redis.hget(b"handoff:worker:" + w, "recycle_reason") or b"" for w in ids}

    # past the grace the worker says why it drains (monitor, dashboard) and is replaced
    reason = f"cancelled task {long} ignored its cancel".encode()
    wait_until(lambda: reason in recycle_reasons(), 10, "the recycle reason in its health")
    wait_until(
        lambda: [p.pid for p in sup.live_children()] not in ([], [first]), 30, "a new worker"
    )
    wait_until(lambda: stat(client, "stubborn", "done") == 3, 30, "the short tasks")
    ran = [i.decode() for i in raw_redis.lrange("ran", 0, -1)]
    assert sorted(ran) == sorted(short)  # each once: none lost, none run again
    starts = [r["id"] for r in _records(raw_redis, "starts")]
    assert starts.count(long) == 1 and all(starts.count(t) == 1 for t in short)
    assert client.status(long) == "cancelled"
    assert "still runs 1s after the cancel; recycling" in sup.output()


def _statuses(node: dict) -> list[str]:
    out = [node["status"]]
    for child in node.get("children", []):
        out += _statuses(child)
    if node.get("then"):
        out += _statuses(node["then"])
    return out


def test_cancelling_a_run_while_workers_are_killed_stops_every_task_of_it(
    client, raw_redis, run_handoff
):
    sup = run_handoff(
        ["supervise", "--agents", "cplanner=1,ccoder=2,creviewer=1"], lease_s=2, cancel_grace_s=1
    )
    root = client.enqueue("cplanner", {"coders": 5, "sleep_s": 0.8})
    wait_until(
        lambda: sum(r["agent"] == "ccoder" for r in _records(raw_redis, "starts")) >= 5,
        30, "the five coders to start",
    )  # fmt: skip
    coders = [w for w in raw_redis.zrange("handoff:workers", 0, -1) if w.startswith(b"ccoder-")]
    victim = int(random.Random(7).choice(coders).rsplit(b"-", 1)[1])
    assert victim in [p.pid for p in sup.live_children()]
    psutil.Process(victim).send_signal(signal.SIGKILL)
    report = client.cancel(root, run=True)
    cancelled_at_ms = time.time() * 1000
    assert report.run == root and report.cancelled >= 1, report.was
    with pytest.raises(TaskCancelled, match=f"run {root} was cancelled"):
        client.result(root, 20, follow=True)
    # the killed worker's leases expire (lease_s=2) and what they held comes back: it
    # must end cancelled, not start; a reviewer handed off at the instant neither
    wait_until(lambda: client.queue_stats(["ccoder"])["ccoder"]["running"] == 0, 20, "leases")
    late = [r for r in _records(raw_redis, "starts") if r["at_ms"] > cancelled_at_ms]
    assert late == []
    statuses = _statuses(client.tree(root))
    assert set(statuses) <= {"done", "cancelled"} and "cancelled" in statuses, statuses
    for agent in ("cplanner", "ccoder", "creviewer"):
        stats = client.queue_stats([agent])[agent]
        assert stats["queued"] == stats["running"] == stats["delayed"] == 0, (agent, stats)


def test_handoff_cancel_prints_one_line(redis_url, client):
    task_id = client.enqueue("noop", {})
    result = CliRunner().invoke(main, ["--redis-url", redis_url, "cancel", task_id])
    assert result.exit_code == 0
    assert result.output == f"task {task_id} cancelled (it was queued: it never starts)\n"
    result = CliRunner().invoke(main, ["--redis-url", redis_url, "cancel", task_id, "--json"])
    assert orjson.loads(result.output) == {"task": task_id, "run": None, "was": {"cancelled": 1}}


def test_a_child_handed_off_as_its_run_is_cancelled_never_starts(flows_app, raw_redis):
    flows = flows_app
    """The instant between a parent's children (enqueued) and its ack: the run is
    cancelled in between; the children end cancelled at enqueue, the ack is stale."""
    from handoff.protocol.queue import ClaimRequest
    from handoff.runtime.agents import get_spec
    from handoff.runtime.runner import Outcome
    from handoff.runtime.settle import settle

    spec = get_spec("apps.flows", "echo")
    raw_redis.sadd("handoff:agents", "step")  # as its worker does when it starts
    root = flows.enqueue("echo", {"i": 1, "next": "step", "hops": 0})
    now = flows.clock.now_ms
    [parent] = flows.queue.claim([ClaimRequest("echo", 1, 60_000)], now_ms=now)["echo"]
    completion, _, made = settle(Outcome(parent, spec.handler(parent)), spec, flows.settings)
    report = flows.client.cancel(root, run=True)
    assert report.was == {"running": 1}
    assert flows.queue.enqueue(made, now_ms=now) == [True]  # ... it ends cancelled there
    assert flows.queue.ack([completion], now_ms=now) == [root]  # stale: the lease is gone
    assert flows.run_until_idle() == {} and raw_redis.llen("step_ends") == 0
    assert flows.client.status(made[0].id) == "cancelled"
    with pytest.raises(TaskCancelled, match=f"run {root} was cancelled"):
        flows.client.result(root, 1, follow=True)


@pytest.mark.parametrize("on_dead", ["continue", "fail"])
def test_a_cancelled_branch_ends_its_join_as_a_dead_one_would(
    on_dead, redis_url, raw_redis, monkeypatch
):
    """on_dead="continue": the then-task runs and sees the branch's end as cancelled;
    "fail" (the default) dead-letters it, naming the cancelled branch."""
    from handoff.testing import InProcessApp

    monkeypatch.setenv("TEST_REDIS_URL", redis_url)
    planner = InProcessApp("apps.flows", redis_url, agents=["splitter"])
    rest = InProcessApp("apps.flows", redis_url, agents=["step", "merge"], clock=planner.clock)
    try:
        root = planner.enqueue("splitter", {"n": 2, "on_dead": on_dead})
        planner.run_until_idle()  # the join starts; its two branches wait
        first, second = (c["id"] for c in planner.client.tree(root)["children"])
        assert planner.client.cancel(first).was == {"queued": 1}
        rest.run_until_idle()
        then = planner.client.tree(root)["then"]
        if on_dead == "continue":
            [record] = [orjson.loads(m) for m in raw_redis.lrange("merged", 0, -1)]
            ends = [[e["status"] for e in branch] for branch in record["branches"]]
            assert ends == [["cancelled"], ["done"]] and then["status"] == "done"
        else:
            assert raw_redis.llen("merged") == 0 and then["status"] == "dead"
            assert f"join branch 0 ended cancelled: task {first}" in then["reason"]
        assert planner.client.status(second) == "done"
    finally:
        planner.close()
        rest.close()


def test_cancelling_unknown_ids_writes_nothing(client, raw_redis):
    """An unknown id (or a run of one) is reported unknown and leaves no mark in any
    agent's slot: a mark lives an hour and takes every claim off its fast path."""
    agents = ["noop", "patient", "polite", "cplanner", "ccoder", "creviewer"]
    raw_redis.sadd("handoff:agents", *agents)  # as their workers do when they start
    for n in range(200):
        report = client.cancel(f"{agents[n % 6]}.nothing-{n}", run=n % 2 == 1)
        assert report.cancelled == 0, report.was
    assert client.cancel("noop.nothing-0").line().endswith("is unknown: nothing to cancel")
    assert [k for k in raw_redis.keys("*") if b"cancelled" in k] == []
    done = client.enqueue("noop", {})
    assert client.cancel(done).was == {"queued": 1}  # a real one still marks and ends


def test_a_cancelled_run_with_a_join_ends_at_once(client, start):
    """Real workers: a splitter's join waits on three running branches; the run cancel
    delivers every notice it causes itself (a join's then-task ending cancelled tells the
    run in another slot), so a follower hears at once, not at the reaper's sweep (~5 s)."""
    sup = start(["supervise", "--agents", "splitter=1,step=1,merge=1"], app="apps.flows")
    root = client.enqueue("splitter", {"n": 3, "step_sleep_s": 30})
    wait_until(
        lambda: client.status(root) == "done" and stat(client, "step", "running") == 3,
        30, "the splitter's join and its three branches to run",
    )  # fmt: skip
    called = time.monotonic()
    client.cancel(root, run=True)
    with pytest.raises(TaskCancelled, match=f"run {root} was cancelled"):
        client.result(root, 20, follow=True)
    took_ms = (time.monotonic() - called) * 1000
    print(f"cancel -> TaskCancelled on follow: {took_ms:.0f} ms")
    assert took_ms < 1000, took_ms
    assert "left in outboxes" not in sup.output()


def _one_slot_worker(client, raw_redis, run_handoff, lease_s: float = 10):
    """A `worker single` (max_concurrent=1, prefetch 2) and its pid, once it is up."""
    worker = run_handoff(["worker", "single"], prefetch=2, lease_s=lease_s)
    warm = client.enqueue("single", {})
    _wait_started(raw_redis, warm)
    raw_redis.rpush(f"go:{warm}", 1)
    wait_until(lambda: client.status(warm) == "done", 20, "the worker's first task")
    return worker


def _held_by_worker(raw_redis) -> int:
    """What the single worker holds, as its health hash says (it writes every 0.2 s)."""
    ids = raw_redis.zrange("handoff:workers", 0, -1)
    held = [raw_redis.hget(b"handoff:worker:" + w, "in_flight") for w in ids]
    return sum(int(h) for h in held if h is not None)


def _hold_three(client, raw_redis) -> tuple[str, str, str]:
    """A runs in the one slot; B and C are leased beside it and taken by the worker (not
    only leased in Redis: a claim reply still in flight is the claim's own moment), waiting
    for the slot."""
    wait_until(lambda: _held_by_worker(raw_redis) == 0, 20, "the worker's health to say idle")
    a, b, c = (client.enqueue("single", {"n": n}) for n in range(3))
    _wait_started(raw_redis, a)
    wait_until(lambda: stat(client, "single", "running") == 3, 20, "B and C leased beside A")
    wait_until(lambda: _held_by_worker(raw_redis) == 3, 20, "the worker to hold B and C")
    return a, b, c


def _release_after(raw_redis, task_id: str, jitter_s: float) -> None:
    time.sleep(jitter_s)  # jitter to spread the race, not a wait for anything
    raw_redis.rpush(f"go:{task_id}", 1)


def _starts_of(raw_redis, task_id: str) -> list[dict]:
    return [r for r in _records(raw_redis, "starts") if r["id"] == task_id]


def test_a_held_task_cancelled_while_its_worker_is_stopped_never_starts(
    client, raw_redis, run_handoff
):
    """The worker SIGSTOPped across the cancels (its 10 s lease never lapses), then A ends
    and the worker goes on: B (cancelled) and C (its run cancelled) never start."""
    worker = _one_slot_worker(client, raw_redis, run_handoff)
    for trial in range(3):
        a, b, c = _hold_three(client, raw_redis)
        stop_process(worker.pid)
        try:
            report_b = client.cancel(b)
            report_c = client.cancel(c, run=True)
            raw_redis.rpush(f"go:{a}", 1)
        finally:
            psutil.Process(worker.pid).send_signal(signal.SIGCONT)
        wait_until(lambda a=a: client.status(a) == "done", 20, "A to finish")
        wait_until(lambda: stat(client, "single", "running") == 0, 20, "the worker idle")
        assert _starts_of(raw_redis, b) == [] and _starts_of(raw_redis, c) == []
        assert client.status(b) == client.status(c) == "cancelled"
        # its worker could not answer: the report says so, and that it does not start
        assert report_b.was == {"claimed": 1}, (trial, report_b.was, report_c.was)
        assert report_c.was == {"claimed": 1}, (trial, report_b.was, report_c.was)
        assert "if it waited for a slot it never starts" in report_b.line()


def test_a_cancel_landing_as_the_slot_frees_is_exact_about_the_start(
    client, raw_redis, run_handoff
):
    """40 races: A ends (its handler returns) and B's cancel lands in the same
    millisecond. B never starts after cancel() returned, and the report says which it
    was: leased (it never starts) or running (it started before the cancel returned)."""
    _one_slot_worker(client, raw_redis, run_handoff)
    leases = client.queue.keys.agent("single").leases
    outcomes: Counter = Counter()
    never: list[str] = []  # reported leased: checked once the slot has moved past them all
    rng = random.Random(1)
    for _ in range(40):
        a, b = client.enqueue("single", {"n": 0}), client.enqueue("single", {"n": 1})
        _wait_started(raw_redis, a)
        # B itself leased (a count of 2 could still be the last round's B: a cancelled
        # running task keeps its lease until its handler has ended)
        wait_until(lambda b=b: raw_redis.zscore(leases, b) is not None, 20, "B leased")
        # A's end, from another thread, within ~4 ms either side of the cancel landing
        jitter_s = rng.uniform(0, 0.004)
        release = threading.Thread(target=_release_after, args=(raw_redis, a, jitter_s))
        release.start()
        report = client.cancel(b)
        returned_ms = time.time() * 1000
        release.join()
        state = next(iter(report.was))
        outcomes[state] += 1
        if state == "running":  # its start is recorded a moment after the slot took it
            [start] = wait_until(lambda b=b: _starts_of(raw_redis, b), 10, "B's start record")
            assert start["at_ms"] <= returned_ms, (start, returned_ms)
            raw_redis.rpush(f"go:{b}", 1)  # (its handler is told; the flag is not polled)
        else:
            assert state == "leased" and "never starts" in report.line(), report.was
            never.append(b)
    last = client.enqueue("single", {"n": 2})  # the slot has moved past every B
    _wait_started(raw_redis, last)
    raw_redis.rpush(f"go:{last}", 1)
    assert [b for b in never if _starts_of(raw_redis, b)] == []
    print(f"40 cancels as the slot frees: {dict(outcomes)}")
