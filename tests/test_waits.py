"""Waits and signals: a branch stops until its event is signalled or its timeout passes,
holding no process; exactly one of the two happens, on a server and on a cluster."""

from __future__ import annotations

import os
import re
import sys
import time
from collections import Counter

import pytest
from click.testing import CliRunner

from handoff import TaskCancelled, TaskDead, TaskExpired
from handoff.cli import main, run
from handoff.errors import InvalidPayload
from harness.procs import ROOT, wait_until
from harness.waits_race import after_runs, race, then_of, warm

BACKENDS = ("server", "cluster")


@pytest.fixture
def supervise(start):
    def _supervise(**settings):
        return start(["supervise", "--agents", "asker=1,after=1"], app="apps.waits", **settings)

    return _supervise


def _parked_count(raw_redis, agent: str = "after") -> int:
    """How many waits are parked: <base>:waiting and <base>:waiting_since, in step."""
    keys = f"handoff:{{{agent}}}:waiting", f"handoff:{{{agent}}}:waiting_since"
    ids = [sorted(raw_redis.zrange(key, 0, -1)) for key in keys]
    assert ids[0] == ids[1], ids
    return len(ids[0])


def test_a_signal_resumes_the_wait_with_its_data_once(client, raw_redis, supervise):
    supervise()
    root = client.enqueue("asker", {"i": 1, "event": "approved.1", "timeout_s": 60})
    then = then_of(client, root)
    assert client.status(then) == "waiting"
    assert client.tree(root)["children"][0]["status"] == "waiting"
    assert _parked_count(raw_redis) == 1
    # the event's waiters outlive the wait's timeout (60 s) by a minute, no more
    assert 60_000 < raw_redis.pttl("handoff:{events}:waiters:approved.1") <= 120_000
    assert client.signal("approved.1", {"by": "ann"}) == 1
    assert client.result(root, 20, follow=True) == {"event": {"by": "ann"}, "timed_out": False}
    assert client.signal("approved.1", {"by": "bob"}) == 0  # resumed once, not again
    assert _parked_count(raw_redis) == 0
    assert [r["event"] for r in after_runs(raw_redis)] == [{"by": "ann"}]


def test_a_timed_out_wait_fails_naming_the_event_or_continues(client, raw_redis, supervise):
    supervise()
    failing = client.enqueue("asker", {"i": 1, "event": "never.1", "timeout_s": 0.5})
    going_on = client.enqueue(
        "asker", {"i": 2, "event": "never.2", "timeout_s": 0.5, "on_timeout": "continue"}
    )
    with pytest.raises(TaskDead, match=r"wait for event 'never.1' timed out after 0\.[5-9] s"):
        client.result(failing, 20, follow=True)
    assert client.result(going_on, 20, follow=True) == {"event": None, "timed_out": True}
    assert [r["i"] for r in after_runs(raw_redis)] == [2]
    assert client.signal("never.1") == 0 and client.signal("never.2") == 0


def test_a_signal_before_the_wait_resumes_it_at_once_until_its_ttl(redis_url, raw_redis, supervise):
    from handoff import Client
    from handoff.config import RedisPoolConfig, Settings

    supervise()
    settings = Settings(redis=RedisPoolConfig(url=redis_url), signal_ttl_s=1.0)
    with Client(settings=settings) as client:
        warm(client)
        assert client.signal("early", [1, 2]) == 0  # nobody waits yet
        root = client.enqueue("asker", {"i": 1, "event": "early", "timeout_s": 30})
        assert client.result(root, 20, follow=True) == {"event": [1, 2], "timed_out": False}
        client.signal("stale", "x")
        time.sleep(1.2)  # past signal_ttl_s: no longer signalled
        late = client.enqueue("asker", {"i": 2, "event": "stale", "timeout_s": 30})
        then = then_of(client, late)
        time.sleep(0.5)
        assert client.status(then) == "waiting"
        assert client.signal("stale", "y") == 1
        assert client.result(late, 20, follow=True)["event"] == "y"
        assert [r["event"] for r in after_runs(raw_redis)] == [None, [1, 2], "y"]


def test_a_run_cancelled_while_waiting_ends_cancelled_and_a_signal_resumes_nothing(
    client, raw_redis, supervise
):
    supervise()
    root = client.enqueue("asker", {"i": 1, "event": "cancel.me", "timeout_s": 60})
    then = then_of(client, root)
    report = client.cancel(root, run=True)
    assert report.was["waiting"] == 1, report.was
    with pytest.raises(TaskCancelled):
        client.result(root, 20, follow=True)
    assert client.status(then) == "cancelled"
    assert _parked_count(raw_redis) == 0  # a cancel takes it out of both sets
    assert client.signal("cancel.me", 1) == 0
    time.sleep(0.5)
    assert after_runs(raw_redis) == []


def test_a_wait_past_its_run_deadline_ends_expired(client, raw_redis, supervise):
    supervise()
    root = client.enqueue("asker", {"i": 1, "event": "slow", "timeout_s": 60}, run_deadline_s=1)
    with pytest.raises(TaskExpired):
        client.result(root, 20, follow=True)
    assert _parked_count(raw_redis) == 0


def test_a_branch_of_a_join_may_wait(client, raw_redis, start):
    start(["supervise", "--agents", "joiner=1,asker=1,after=1,gather=1"], app="apps.waits")
    root = client.enqueue("joiner", {"events": ["j.0", "j.1"]})
    wait_until(lambda: client.status(root) == "done", 20, "the join to start")
    for branch in client.result(root)["join"]["branches"]:
        then = then_of(client, branch)
        wait_until(lambda t=then: client.status(t) == "waiting", 20, "the branch to wait")
    assert client.signal("j.1", "one") == 1
    assert client.status(client.result(root)["join"]["then"]) == "unknown"  # not yet
    assert client.signal("j.0", "zero") == 1
    assert client.result(root, 20, follow=True) == ["zero", "one"]


def test_bad_waits_and_signals_are_one_line_and_write_nothing(client, raw_redis, supervise):
    supervise()
    for bad, why in (
        ("then", "wait then must be a Handoff, not dict"),
        ("event", "invalid event name ''"),
        ("timeout", "wait timeout_s -1: a number of seconds above 0"),
    ):
        root = client.enqueue("asker", {"i": 1, "event": "ok", "bad": bad, "timeout_s": 5})
        with pytest.raises(TaskDead, match=re.escape(why)):
            client.result(root, 20, follow=True)
    assert [k for k in raw_redis.keys("*") if b"wait" in k or b"{events}" in k] == []
    for event, data, why in (
        ("", None, "invalid event name ''"),
        ("x" * 201, None, "invalid event name"),
        ("has space", None, "invalid event name"),
        ("ok", object(), "signal data is not JSON"),
        ("ok", float("nan"), "NaN"),
    ):
        with pytest.raises(InvalidPayload, match=re.escape(why)) as caught:
            client.signal(event, data)
        assert "\n" not in str(caught.value)
    assert [k for k in raw_redis.keys("*") if b"{events}" in k] == []


def test_handoff_signal_prints_how_many_it_resumed(
    redis_url, client, supervise, monkeypatch, capsys
):
    supervise()
    root = client.enqueue("asker", {"i": 1, "event": "cli.1", "timeout_s": 60})
    then_of(client, root)
    runner = CliRunner()
    done = runner.invoke(main, ["--redis-url", redis_url, "signal", "cli.1", '{"ok": true}'])
    assert done.exit_code == 0, done.output
    assert done.output == "event cli.1: 1 wait(s) resumed; kept 3600s for a Wait returned later\n"
    assert client.result(root, 20, follow=True)["event"] == {"ok": True}
    early = runner.invoke(main, ["--redis-url", redis_url, "signal", "nobody.yet"])
    assert (
        early.output
        == "event nobody.yet: 0 wait(s) resumed; kept 3600s for a Wait returned later\n"
    )
    for args, why in (
        (["cli.1", "{nope"], "handoff: error: DATA is not JSON"),
        (["bad event"], "handoff: error: invalid event name 'bad event'"),
    ):
        monkeypatch.setattr(sys, "argv", ["handoff", "--redis-url", redis_url, "signal", *args])
        with pytest.raises(SystemExit) as exited:
            run()
        err = capsys.readouterr().err
        assert exited.value.code == 2 and err.count("\n") == 1 and err.startswith(why), err


WAITS = int(os.environ.get("WAITS_TEST_N", "100"))  # the 1,000, scaled down


def test_signals_racing_timeouts_run_each_then_task_once_as_signalled_or_timed_out(
    client, raw_redis, supervise, redis_url
):
    """100 waits with 1 s timeouts (half fail, half continue on timeout); two processes
    signal every event at random moments from 0.6 to 1.6 s after the waits were parked.
    Every then-task runs (or is dead-lettered) exactly once, as signalled or as timed out,
    never both; each event resumes at most once across both signallers (harness/waits_race.py)."""
    supervise()
    warm(client)
    outcome = race(client, raw_redis, redis_url, WAITS)
    assert outcome["signalled"] and outcome["timed out, ran"] and outcome["timed out, dead"]


def _parked(client, event: str, n: int = 1) -> list:
    """n then-tasks of `after` parked on event (wait.lua alone: as if the worker that
    parked them died before registering them)."""
    from handoff.protocol import waits
    from handoff.protocol.task import Task, derived_task_id, now_ms

    tasks = [
        Task(derived_task_id("after", event, str(i)), "after", {"i": i},
             wait=waits.wait_record(event, "fail", 60, now_ms()))
        for i in range(n)
    ]  # fmt: skip
    queue = client.queue
    args = ["", 1 << 20]
    for t in tasks:
        args += [t.id, 0, t.to_json(), "inf", event, t.wait["since"]]
    queue.run_scripts([("wait", waits._wait_keys(queue.keys, "after"), args)])  # park_plan's
    return tasks


def test_a_wait_parked_by_a_process_that_died_is_registered_by_the_next_tick(client, monkeypatch):
    from handoff.protocol import waits

    monkeypatch.setattr(waits, "OUTBOX_GRACE_MS", 0)
    [task] = _parked(client, "orphan")
    assert client.signal("orphan", 1) == 0  # not registered: the event has no waiter
    assert client.status(task.id) == "waiting"
    time.sleep(0.01)
    client.queue.run(waits.tick_plan(client.queue, ["after"], 60_000))  # registers: signalled
    assert client.status(task.id) == "queued"  # resumed by the still-signalled event
    assert client.signal("orphan", 2) == 0  # and only once


def test_a_signal_whose_sender_died_is_delivered_by_a_tick_once(client, raw_redis, monkeypatch):
    from handoff.protocol import waits

    monkeypatch.setattr(waits, "OUTBOX_GRACE_MS", 0)
    tasks = _parked(client, "dropped", n=3)
    client.queue.run(
        waits.register_plan(client.queue, [("after", t.id, "dropped", "inf") for t in tasks])
    )
    keys = waits._event_keys(client.queue.keys, "dropped")
    client.queue.run_scripts([("signal", keys, ["", 60_000, b'"d"', "tok"])])  # then died
    assert {client.status(t.id) for t in tasks} == {"waiting"}
    time.sleep(0.01)
    left = raw_redis.hgetall(client.queue.keys.events_outbox)
    assert len(left) == 3
    client.queue.run(waits.tick_plan(client.queue, ["after"], 60_000))
    assert {client.status(t.id) for t in tasks} == {"queued"}
    assert raw_redis.hlen(client.queue.keys.events_outbox) == 0
    again = [(f.decode(), "after", v.split(b"\x1f")[2].decode(), b'"d"') for f, v in left.items()]
    assert client.queue.run(waits.resume_plan(client.queue, again)) == 0  # delivered twice: once
    stored = raw_redis.hget(client.queue.keys.agent("after").tasks, tasks[0].id)
    assert stored.endswith(b',"woke":{"event":"d"}}') and stored.count(b'"woke"') == 1


def test_a_wait_returned_again_after_a_crash_parks_and_resumes_once(client, raw_redis):
    """The task that returned the Wait ran again (its ack was lost): the same then-task id
    is parked again, a duplicate; one signal resumes it once."""
    from handoff.protocol import waits
    from handoff.protocol.task import Task, derived_task_id, now_ms

    def then() -> Task:
        wait = waits.wait_record("twice", "fail", 60, now_ms())
        return Task(derived_task_id("after", "asker.x", "wait"), "after", {"i": 0}, wait=wait)

    assert client.queue.run(waits.park_plan(client.queue, [then()])) == [True]
    assert client.queue.run(waits.park_plan(client.queue, [then()])) == [False]
    assert raw_redis.hlen("handoff:{events}:waiters:twice") == 1
    assert raw_redis.hlen(client.queue.keys.agent("after").wait_outbox) == 0  # delivered
    assert client.signal("twice", "x") == 1
    assert client.queue.run(waits.park_plan(client.queue, [then()])) == [False]  # ran: still
    assert client.signal("twice", "y") == 0
    assert raw_redis.zcard(client.queue.keys.agent("after").queue) == 1


def test_the_waiting_sets_stay_in_step_and_leave_no_key_behind(client, raw_redis):
    """<base>:waiting (by due time) and <base>:waiting_since (by parking time: the
    monitor's oldest wait) hold the same waits through each way out (a signal, a
    timeout, a cancel); then both are gone, and every key left has a TTL or is one of the
    agents' standing keys. Parking registers the then agent, so the monitor lists it."""
    from handoff.protocol import waits
    from handoff.protocol.keys import AGENT_KEY_NAMES
    from handoff.protocol.task import Task, derived_task_id, now_ms

    queue, keys = client.queue, client.queue.keys.agent("after")
    since = now_ms() - 5_000

    def then(name: str, timeout_s: float | None = None) -> Task:
        wait = waits.wait_record(f"step.{name}", "fail", timeout_s, since)
        return Task(derived_task_id("after", "steps", name), "after", {"i": 0}, wait=wait)

    tasks = [then("signalled"), then("timed", timeout_s=0.05), then("cancelled")]
    assert queue.run(waits.park_plan(queue, tasks)) == [True] * 3
    assert _parked_count(raw_redis) == 3
    assert raw_redis.smembers("handoff:agents") == {b"after"}  # the monitor starts from it
    assert raw_redis.zrange(keys.waiting_since, 0, 0, withscores=True)[0][1] == since
    assert client.signal("step.signalled") == 1
    assert _parked_count(raw_redis) == 2
    wait_until(lambda: queue.run(waits.tick_plan(queue, ["after"], 60_000)) == 1, 5, "the timeout")
    assert _parked_count(raw_redis) == 1 and client.status(tasks[1].id) == "dead"
    assert client.cancel(tasks[2].id).was == Counter({"waiting": 1})
    assert _parked_count(raw_redis) == 0
    assert not raw_redis.exists(keys.waiting, keys.waiting_since, keys.wait_outbox)
    standing = {f"{keys.base}:{n}" for n in AGENT_KEY_NAMES} | {"handoff:agents"}
    forever = [
        k.decode() for k in raw_redis.scan_iter(match="handoff:*", count=1000)
        if raw_redis.pttl(k) == -1 and k.decode() not in standing
    ]  # fmt: skip
    assert forever == [], forever


def _acl_users(raw_redis) -> list[str]:
    """The shipped config/acl.conf's producer, and its worker line for `asker` and for
    `after` + `listener`, each with the other agents it reaches (as that file says)."""
    users = []
    for line in (ROOT / "config" / "acl.conf").read_text().splitlines():
        if line.startswith("user handoff-producer"):
            users.append(line.split()[1:])
        if not line.startswith("user handoff-worker-probe"):
            continue
        for name, others in (("asker", ["after"]), ("after", ["asker", "listener"])):
            rule = line.replace(
                "{probe}:*", "{probe}:* " + " ".join(f"~handoff:{{{o}}}:*" for o in others)
            )
            rule = rule.replace("probe", name)
            users.append(rule.split()[1:])
    for rule in users:
        if hasattr(raw_redis, "get_nodes"):
            raw_redis.execute_command("ACL", "SETUSER", *rule, target_nodes=raw_redis.ALL_NODES)
        else:
            raw_redis.execute_command("ACL", "SETUSER", *rule)
    return [rule[0] for rule in users]


def test_least_privilege_users_wait_signal_time_out_and_send(redis_url, raw_redis, start):
    from handoff import Client
    from handoff.config import RedisPoolConfig, Settings

    names = _acl_users(raw_redis)
    try:
        for agents, user in (("asker=1", "asker"), ("after=1,listener=1", "after")):
            login = {
                "redis_username": f"handoff-worker-{user}",
                "redis_password": "change-me-worker",
            }
            start(["supervise", "--agents", agents], app="apps.waits", **login)
        pool = RedisPoolConfig(
            url=redis_url, username="handoff-producer", password="change-me-producer"
        )
        with Client(settings=Settings(redis=pool)) as producer:
            warm(producer)
            gone = producer.enqueue(
                "asker", {"i": 1, "event": "acl.t", "timeout_s": 0.3, "on_timeout": "continue"}
            )
            assert producer.result(gone, 20, follow=True) == {"event": None, "timed_out": True}
            tid = producer.enqueue("listener", {"n": 1, "timeout_s": 20})
            producer.send(tid, "hello")
            assert producer.result(tid, 20) == ["hello"]
    finally:
        for name in names:
            if hasattr(raw_redis, "get_nodes"):
                raw_redis.execute_command("ACL", "DELUSER", name, target_nodes=raw_redis.ALL_NODES)
            else:
                raw_redis.execute_command("ACL", "DELUSER", name)
