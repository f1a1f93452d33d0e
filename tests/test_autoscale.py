"""Autoscaling: the decision rule on its own, then real supervisors on a real server.

The load is tests/apps/probe.py's `busy` agent (4 slots a process, 20 ms a task, each run
recorded). Settings are lean for a test suite: target wait 0.5 s, cool-down 2 s.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from collections import Counter

import orjson
import pytest

from handoff.config.autoscale_spec import Bounds, parse_autoscale
from handoff.runtime.autoscale import AgentScaler, Observation
from harness.procs import executions, stat, wait_until

LEAN = {"autoscale_target_wait_s": 0.5, "autoscale_cooldown_s": 2.0}
DECISION = re.compile(r"autoscale busy (\d+) -> (\d+)")


def decisions(sup) -> list[tuple[int, int]]:
    return [(int(a), int(b)) for a, b in DECISION.findall(sup.output())]


# -- the rule --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("coder=3:1", "MIN 3 is over MAX 1"),
        ("coder=-1:2", "expected AGENT=MIN:MAX"),
        ("coder=a:b", "expected AGENT=MIN:MAX"),
        ("coder=1:99", "MAX must be between 1 and 64"),
        ("coder=1:2,coder=1:3", "named twice"),
    ],
)
def test_bad_bounds_are_one_line_naming_the_part(text, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        parse_autoscale(text, 64)


def test_the_rule_adds_for_a_backlog_and_removes_only_after_a_quiet_cooldown():
    scaler = AgentScaler(Bounds(1, 6), target_wait_s=1.0, cooldown_s=10.0)
    first = Observation(0.0, queued=1000, oldest_age_s=0.0, done=0)
    assert scaler.decide(first, mine=1, total=1, slots=4, my_share=1.0).count == 2  # no task time
    burst = Observation(1.0, queued=1000, oldest_age_s=0.2, done=50, task_s=0.02)
    scaler.observe(first)
    scaler.observe(burst)
    decision = scaler.decide(burst, mine=2, total=2, slots=4, my_share=1.0)
    assert decision is not None and decision.count == 6  # 1000 / 200 per s needs 5 more: 6
    quiet = Observation(5.0, queued=0, oldest_age_s=0.0, done=1050, task_s=0.02)
    assert scaler.decide(quiet, mine=6, total=6, slots=4, my_share=1.0) is None  # not yet
    later = Observation(12.0, queued=0, oldest_age_s=0.0, done=1050, task_s=0.02)
    scaler.observe(later)
    down = scaler.decide(later, mine=6, total=6, slots=4, my_share=1.0)
    assert down is not None and 1 <= down.count < 6 and down.reason.startswith("down after")


def test_a_steady_load_keeps_its_count():
    """300 tasks/s of 20 ms tasks on 4-slot processes (200/s each): 3 processes, kept."""
    scaler = AgentScaler(Bounds(1, 6), target_wait_s=0.5, cooldown_s=2.0)
    changes, mine = 0, 3
    for tick in range(100):
        obs = Observation(tick * 0.2, queued=tick % 3, oldest_age_s=0.01, done=60 * tick,
                          task_s=0.02)  # fmt: skip
        scaler.observe(obs)
        decision = scaler.decide(obs, mine=mine, total=mine, slots=4, my_share=1.0)
        if decision is not None:
            changes, mine = changes + 1, decision.count
    assert mine == 3 and changes == 0


def test_min_zero_starts_one_for_the_first_task_and_shares_split_by_maximum():
    scaler = AgentScaler(Bounds(0, 4), target_wait_s=1.0, cooldown_s=10.0)
    first = Observation(0.0, queued=1, oldest_age_s=0.0, done=0)
    assert scaler.decide(first, mine=0, total=0, slots=4, my_share=0.5).count == 1
    burst = Observation(1.0, queued=400, oldest_age_s=0.1, done=0, task_s=0.4)  # 10/s each
    decision = scaler.decide(burst, mine=1, total=2, slots=4, my_share=0.5)
    assert decision.total == 40 and decision.count == 4  # half of 40, capped at its max


# -- real supervisors ------------------------------------------------------------------------


def test_a_burst_scales_up_fast_drains_faster_and_scales_back(
    start, client, raw_redis, record_property
):
    fixed_ids = client.enqueue_many("busy", [{"n": i} for i in range(600)])
    fixed = start(["supervise", "--agents", "busy=1"])
    began = time.monotonic()
    wait_until(lambda: stat(client, "busy", "done") == 600, 60, "the fixed single process")
    fixed_rate = 600 / (time.monotonic() - began)
    fixed.signal(signal.SIGTERM)
    assert fixed.wait(15) == 0

    sup = start(["supervise", "--autoscale", "busy=1:6"], **LEAN)
    wait_until(lambda: len(sup.live_children()) == 1, 15, "the minimum, one process")
    peak = [1]
    ids = client.enqueue_many("busy", [{"n": i} for i in range(3000)])
    began = time.monotonic()

    def at_most_six(count: int) -> bool:
        peak[0] = max(peak[0], len(sup.live_children()))
        return peak[0] >= count

    wait_until(lambda: at_most_six(6), 3, "six processes within 3 s of the burst")
    reached_s = time.monotonic() - began
    wait_until(lambda: at_most_six(99) or stat(client, "busy", "done") == 3600, 60, "the drain")
    scaled_rate = 3000 / (time.monotonic() - began)
    wait_until(lambda: at_most_six(99) or len(sup.live_children()) == 1, 30, "back to one")
    record_property("reached_6_s", round(reached_s, 2))
    record_property("drain_ratio", round(scaled_rate / fixed_rate, 2))
    assert peak[0] == 6 and all(after <= 6 for _, after in decisions(sup))
    assert scaled_rate >= 4 * fixed_rate, (scaled_rate, fixed_rate)
    counts = Counter(task_id for _, task_id in executions(raw_redis))
    assert set(counts) == set(fixed_ids) | set(ids) and max(counts.values()) == 1


def test_min_zero_holds_no_process_until_a_task_arrives(start, client, record_property):
    sup = start(["supervise", "--autoscale", "busy=0:2"], **LEAN)
    wait_until(lambda: "started" in sup.output(), 15, "the supervisor")
    assert sup.live_children() == []
    began = time.monotonic()
    tid = client.enqueue("busy", {"sleep_s": 0})
    wait_until(lambda: client.status(tid) == "done", 15, "the first task done")
    record_property("first_task_s", round(time.monotonic() - began, 3))
    assert len(sup.live_children()) == 1
    parts = lambda: client.queue.manager.execute(lambda c: c.hlen("handoff:{busy}:autoscalers"))  # noqa: E731
    assert parts() == 1
    sup.signal(signal.SIGTERM)
    assert sup.wait(15) == 0
    assert parts() == 0  # a stopped supervisor's part is gone at once


def test_a_malformed_peer_part_is_dropped_once_and_autoscaling_goes_on(start, client, raw_redis):
    """A peer's part is data anyone could write: garbage there raised in the Redis thread
    and ended it (no more scaling, reaping or heartbeat). Now it is said and deleted."""
    sup = start(["supervise", "--autoscale", "busy=0:2"], **LEAN)
    wait_until(lambda: "started" in sup.output(), 15, "the supervisor")
    key = "handoff:{busy}:autoscalers"
    raw_redis.hset(key, mapping={"x": b"not json", "y": b'{"max":1}', "z": b"[1]"})
    wait_until(lambda: raw_redis.hlen(key) == 1, 15, "the malformed parts to be dropped")
    tid = client.enqueue("busy", {"sleep_s": 0})
    wait_until(lambda: client.status(tid) == "done", 15, "a task done by an added process")
    assert sup.output().count("malformed part") == 3 and "Traceback" not in sup.output()


def test_two_supervisors_share_a_burst_and_one_takes_over_when_the_other_dies(
    start, client, raw_redis
):
    one = start(["supervise", "--autoscale", "busy=0:4"], **LEAN)
    two = start(["supervise", "--autoscale", "busy=0:4"], **LEAN)
    ids = client.enqueue_many("busy", [{"n": i} for i in range(3000)])
    seen = {"one": 0, "two": 0, "total": 0}

    def both_working() -> bool:
        a, b = len(one.live_children()), len(two.live_children())
        seen.update(
            one=max(seen["one"], a), two=max(seen["two"], b), total=max(seen["total"], a + b)
        )
        return seen["one"] > 0 and seen["two"] > 0 and stat(client, "busy", "done") > 300

    wait_until(both_working, 30, "both supervisors taking part")
    one.proc.send_signal(signal.SIGKILL)  # its workers see their parent gone and drain
    wait_until(lambda: stat(client, "busy", "done") >= 3000, 90, "the burst done by the other")
    assert seen["total"] <= 8
    assert set(task_id for _, task_id in executions(raw_redis)) == set(ids)  # nothing lost


def test_a_steady_load_does_not_flap_and_scaling_down_under_load_loses_nothing(
    start, client, raw_redis
):
    sup = start(["supervise", "--autoscale", "busy=1:6"], **LEAN)
    wait_until(lambda: len(sup.live_children()) == 1, 15, "one process")
    stop = threading.Event()
    sent: list[str] = []

    def produce() -> None:  # 300 tasks/s: half of what 3 processes do
        while not stop.is_set():
            sent.extend(client.enqueue_many("busy", [{"n": 0}] * 30))
            stop.wait(0.1)

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        settle_at = time.monotonic() + 12
        wait_until(lambda: time.monotonic() > settle_at, 20, "12 s of steady load")
    finally:
        stop.set()
        producer.join(10)
    changes = decisions(sup)
    assert len(changes) <= 2, changes
    wait_until(lambda: len(sup.live_children()) == 1, 30, "back to one after the load")
    counts = Counter(task_id for _, task_id in executions(raw_redis))
    assert set(counts) == set(sent) and max(counts.values()) == 1


def test_scale_pins_an_autoscaled_agent_and_auto_resumes_it(start, client, redis_url, tmp_path):
    sup = start(["supervise", "--autoscale", "busy=1:6"], **LEAN)
    wait_until(lambda: len(sup.live_children()) == 1, 15, "one process")
    wait_until(
        lambda: client.queue.manager.execute(lambda c: c.zcard("handoff:supervisors")),
        10,
        "the supervisor registered",
    )
    scale = start(["scale", "busy=3"])
    assert scale.wait(30) == 0
    wait_until(lambda: len(sup.live_children()) == 3, 15, "three, pinned")
    wait_until(lambda: "busy pinned at 3" in sup.output(), 10, "the pin logged")
    monitor = start(["monitor", "--once", "--json"])
    assert monitor.wait(30) == 0
    snap = orjson.loads(monitor.output()[monitor.output().index("{") :])
    assert snap["agents"]["busy"]["autoscale"] == {
        "min": 1, "max": 6, "current": 3, "supervisors": 1, "capped": False,
    }  # fmt: skip
    resume = start(["scale", "busy=auto"])
    assert resume.wait(30) == 0
    wait_until(lambda: "autoscale busy resumed" in sup.output(), 10, "autoscaling resumed")
    wait_until(lambda: len(sup.live_children()) == 1, 30, "back to the minimum, idle")


def test_auto_on_an_agent_no_supervisor_autoscales_says_so(start, client):
    """`scale AGENT=auto` said "sent" and did nothing on an agent with a fixed count."""
    sup = start(["supervise", "--agents", "busy=1"], **LEAN)
    wait_until(
        lambda: client.queue.manager.execute(lambda c: c.zcard("handoff:supervisors")),
        10,
        "the supervisor registered",
    )
    resume = start(["scale", "busy=auto"])
    assert resume.wait(30) == 1
    out = resume.output()
    assert "busy is not autoscaled by any live supervisor" in out and "sent" not in out, out
    assert len(sup.live_children()) == 1


def test_the_host_cap_holds_and_is_said_once(start, client):
    sup = start(["supervise", "--autoscale", "busy=0:3,probe=0:3"], max_processes=3, **LEAN)
    client.enqueue_many("busy", [{"n": i} for i in range(2000)])
    client.enqueue_many("probe", [{"n": i, "sleep_s": 0.02} for i in range(2000)])
    wait_until(lambda: "host cap reached" in sup.output(), 15, "the cap reached")
    wait_until(
        lambda: stat(client, "busy", "done") + stat(client, "probe", "done") > 500, 30, "work"
    )
    assert len(sup.live_children()) <= 3
    assert sup.output().count("host cap reached") == 1


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [("busy=3:1", "MIN 3 is over MAX 1"), ("nosuch=1:2", "nosuch"), ("busy=1:99", "max_processes")],
)
def test_bad_autoscale_arguments_start_nothing(start, spec, fragment):
    sup = start(["supervise", "--autoscale", spec])
    assert sup.wait(15) == 2
    assert fragment in sup.output() and "spawned" not in sup.output()
