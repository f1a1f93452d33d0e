"""Hostile input from inside Redis: control messages and outbox notices a supervisor did
not expect.

A real supervisor and its workers; the messages are pushed with plain RPUSH, as anyone
with write access to the control list could.
"""

from __future__ import annotations

import os
import signal

import psutil
import pytest

from handoff.runtime.control import BadControlMessage, parse_control
from harness.procs import executions, stat, wait_until

pytestmark = pytest.mark.slow

HOSTILE = [
    b"[1,2]",
    b'{"op":"scale","agents":[1]}',
    b'{"op":"scale","agents":{"probe":"5"}}',
    b'{"op":"scale","agents":{"probe":-1}}',
    b'{"op":"scale","agents":{"probe":100000}}',
    b'{"op":"scale","agents":{"probe":true}}',
    b'{"op":"scale"}',
    b'{"op":"rm -rf"}',
    b"not json",
    b'"scale"',
    b"x" * 70_000,
    b'{"op":"scale","agents":{"elsewhere":9}}',  # no agent type supervised here
]


@pytest.mark.parametrize("raw", HOSTILE, ids=lambda raw: raw[:30].decode())
def test_parse_control_refuses_each_malformed_message_in_one_line(raw):
    with pytest.raises(BadControlMessage) as e:
        parse_control(raw, {"probe"}, 100)
    assert "\n" not in str(e.value) and len(str(e.value)) < 200


def test_parse_control_keeps_only_the_agent_types_supervised_here():
    request = parse_control(b'{"op":"scale","agents":{"probe":3,"other":2}}', {"probe"}, 100)
    assert request.counts == {"probe": 3}
    with pytest.raises(BadControlMessage, match="names no agent type supervised here"):
        parse_control(b'{"op":"scale","agents":{"other":2}}', {"probe"}, 100)


def test_malformed_control_messages_are_dropped_and_the_supervisor_keeps_going(start, raw_redis):
    sup = start(["supervise", "--agents", "probe=1"], max_processes_per_agent=3)
    wait_until(lambda: raw_redis.zcard("handoff:supervisors") == 1, 15, "the supervisor")
    (sid,) = [s.decode() for s in raw_redis.zrange("handoff:supervisors", 0, -1)]
    wait_until(lambda: len(sup.live_children()) == 1, 15, "one worker")
    workers = {p.pid for p in sup.live_children()}
    control = f"handoff:control:{sid}"
    raw_redis.rpush(control, *HOSTILE)
    wait_until(
        lambda: sup.output().count("control message dropped") == len(HOSTILE),
        15,
        "every hostile message to be dropped",
    )
    assert sup.proc.poll() is None
    assert {p.pid for p in sup.live_children()} == workers  # nothing restarted or scaled
    assert "Traceback" not in sup.output()
    raw_redis.rpush(control, b'{"op":"scale","agents":{"probe":4}}')  # over the bound
    raw_redis.rpush(control, b'{"op":"scale","agents":{"probe":2,"elsewhere":9}}')
    wait_until(lambda: len(sup.live_children()) == 2, 15, "two workers after a valid request")
    assert sup.output().count("control message dropped") == len(HOSTILE) + 1


def test_a_malformed_outbox_notice_is_dropped_once_and_the_supervisor_keeps_going(start, raw_redis):
    """Defect 4: one garbage outbox field raised IndexError in the reaper, and the
    supervisor's Redis thread died with it (no heartbeat, scale ignored, no reaping)."""
    sup = start(["supervise", "--agents", "probe=1"], max_processes_per_agent=3)
    wait_until(lambda: raw_redis.zcard("handoff:supervisors") == 1, 15, "the supervisor")
    (sid,) = [s.decode() for s in raw_redis.zrange("handoff:supervisors", 0, -1)]
    outbox = "handoff:{probe}:outbox"
    raw_redis.hset(outbox, mapping={"junk": b"1\x1fjunk", "short": b"1\x1fE\x1fprobe.x"})
    raw_redis.hset(outbox, b"\xff", b"1\x1fD\x1fprobe.j")  # a field name not UTF-8
    wait_until(lambda: raw_redis.hlen(outbox) == 0, 15, "the malformed notices to be dropped")
    beat = raw_redis.zscore("handoff:supervisors", sid)
    wait_until(lambda: raw_redis.zscore("handoff:supervisors", sid) > beat + 1000, 15, "beats")
    assert sup.output().count("malformed run notice dropped") == 3  # once each, not per tick
    raw_redis.rpush(f"handoff:control:{sid}", b'{"op":"scale","agents":{"probe":2}}')
    wait_until(lambda: len(sup.live_children()) == 2, 15, "two workers after a scale request")
    assert sup.proc.poll() is None and "Traceback" not in sup.output()


def test_a_supervisor_thread_that_fails_stops_the_supervisor_as_a_crash(start, raw_redis):
    """A bug (not Redis, not data) in a side thread: the supervisor says so, stops its
    workers and exits 1, so honcho or systemd restarts it; it does not run on headless."""
    sup = start(["supervise", "--agents", "probe=1"], app="apps.broken_supervisor")
    wait_until(lambda: len(sup.live_children()) == 1, 15, "one worker")
    raw_redis.set("break-supervisor", 1)
    assert sup.wait(20) == 1
    out = sup.output()
    assert "the supervisor-redis thread failed; stopping as a crash" in out
    assert "RuntimeError: a bug in the supervisor's Redis thread" in out  # with its traceback
    assert sup.live_children() == []


# -- return values a handler should not get away with (defect 7) --------------------------

RETURNED = {
    "mixed": "result is a list mixing Handoff and other values",
    "nan": "result holds a NaN or infinite number",
    "inf": "result holds a NaN or infinite number",
    "big": "result is 2002 bytes, over max_result_bytes (1000)",
}


def test_mixed_lists_non_finite_numbers_and_oversized_results_fail_their_task(start, client):
    ids = {kind: client.enqueue("returner", {"kind": kind, "size": 2000}) for kind in RETURNED}
    fine = client.enqueue("returner", {"kind": "fine"})
    start(["worker", "returner"], max_result_bytes=1000)
    for kind, reason in RETURNED.items():
        wait_until(lambda i=ids[kind]: client.status(i) == "dead", 15, f"the {kind} task dead")
        assert client.dead_reason(ids[kind]).startswith(reason), kind
    assert client.result(fine, wait_s=15) == {"kind": "fine", "null": None}  # a real null
    assert client.queue_stats(["probe"]).get("probe", {}).get("enqueued", 0) == 0  # no child


# -- a handler that forks (defect 6) -------------------------------------------------------


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("agent", ["forker", "aforker"])
def test_a_process_forked_by_a_handler_never_runs_tasks_and_ends_with_its_code(
    start, client, raw_redis, agent
):
    ids = client.enqueue_many(agent, [{"n": i, "child_s": 0.3} for i in range(12)])
    worker = start(["worker", agent])
    wait_until(lambda: stat(client, agent, "done") == 12, 30, "every task done by the parent")
    runs = executions(raw_redis)
    assert sorted(task_id for _, task_id in runs) == sorted(ids)  # each once
    assert {pid for pid, _ in runs} == {worker.proc.pid}  # and never by a forked child
    wait_until(lambda: raw_redis.llen("forked") == 12, 15, "every child to record itself")
    children = [int(p) for p in raw_redis.lrange("forked", 0, -1)]
    wait_until(lambda: all(_gone(pid) for pid in children), 15, "every forked child to end")
    assert client.result(ids[0], wait_s=5) == "from the parent"
    worker.signal(signal.SIGTERM)
    assert worker.wait(10) == 0


def test_a_forked_child_that_lingers_obeys_sigterm(start, client, raw_redis):
    client.enqueue("forker", {"child_s": 600})
    worker = start(["worker", "forker"])
    wait_until(lambda: raw_redis.llen("forked") == 1, 15, "the child")
    child = int(raw_redis.lindex("forked", 0))
    os.kill(child, signal.SIGTERM)
    wait_until(lambda: _gone(child), 10, "the child to obey SIGTERM")
    worker.signal(signal.SIGTERM)
    assert worker.wait(10) == 0
