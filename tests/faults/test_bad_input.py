"""Scenarios 9, 11 and 12: racing reapers, hostile payloads, hostile agent names."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from handoff.client import Client
from handoff.config import RedisPoolConfig, Settings
from handoff.connection.manager import RedisManager
from handoff.errors import InvalidAgentName, InvalidPayload
from handoff.protocol.keys import AGENT_NAME, Keys, check_agent
from handoff.protocol.queue import ClaimRequest, TaskQueue
from harness.procs import ROOT, handoff_env, stat, wait_until

# Every test here runs on one server and on a 3-primary cluster (tests/conftest.py).
BACKENDS = ("server", "cluster")

pytestmark = pytest.mark.slow


def test_five_reapers_requeue_each_expired_lease_exactly_once(redis_url, client, raw_redis):
    client.enqueue_many("probe", [{"n": i} for i in range(10_000)])
    settings = Settings(redis=RedisPoolConfig(url=redis_url))
    queue = TaskQueue(RedisManager(settings.redis, background=False), settings)
    leased = 0
    while leased < 10_000:
        got = queue.claim([ClaimRequest("probe", 1000, lease_ms=1)], now_ms=1_000)["probe"]
        leased += len(got)
    assert raw_redis.zcard("handoff:{probe}:leases") == 10_000
    counts: list[int] = []
    barrier = threading.Barrier(5)

    def reaper() -> None:
        mine = TaskQueue(RedisManager(settings.redis, background=False), settings)
        barrier.wait()
        total = 0
        while True:
            reaped, _ = mine.reap(["probe"], limit=500, now_ms=10_000)["probe"]
            if not reaped:
                break
            total += reaped
        counts.append(total)
        mine.manager.close()

    threads = [threading.Thread(target=reaper) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sum(counts) == 10_000
    assert raw_redis.zcard("handoff:{probe}:queue") == 10_000
    assert raw_redis.zcard("handoff:{probe}:leases") == 0
    assert stat(client, "probe", "reaped") == 10_000
    queue.manager.close()


def _cli(redis_url: str, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess:
    env = handoff_env(redis_url, app="apps.probe")
    return subprocess.run(
        [sys.executable, "-m", "handoff", *args],
        input=stdin,
        capture_output=True,
        cwd=ROOT,
        env=env,
        timeout=60,
    )


def test_hostile_payloads_are_rejected_or_buried_and_never_unpickled(
    start, client, raw_redis, redis_url, tmp_path
):
    with pytest.raises(InvalidPayload, match="over the max_payload_bytes limit"):
        client.enqueue("probe", {"blob": "x" * (10 * 1024 * 1024)})
    with pytest.raises(InvalidPayload, match="JSON"):
        client.enqueue("probe", b"\xff\xfe not utf-8")
    bad_json = _cli(redis_url, "enqueue", "probe", "{not json")
    assert bad_json.returncode != 0 and b"invalid JSON" in bad_json.stderr
    bad_utf8 = _cli(redis_url, "enqueue", "probe", "-", stdin=b'{"ok": 1}\n\xff\xfe\n')
    assert bad_utf8.returncode != 0 and b"line 2" in bad_utf8.stderr
    assert stat(client, "probe", "enqueued") == 0  # nothing of those batches was written

    # Planted directly in Redis, behind the client's back:
    marker = tmp_path / "unpickled"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    good = client.enqueue_many("probe", [{"n": i, "sleep_s": 0} for i in range(20)])
    planted = {
        "probe.pickle": pickle.dumps(Exploit()),
        "probe.badjson": b'{"id": "probe.badjson", "agent": "probe", "payload": ',
        "probe.badutf8": b'{"id": "probe.badutf8", "agent": "probe", "payload": "\xff"}',
        "probe.nofields": b'{"id": "probe.nofields", "agent": "probe"}',
        "probe.notobject": b"[1, 2, 3]",
    }
    for task_id, raw in planted.items():
        raw_redis.hset("handoff:{probe}:tasks", task_id, raw)
        raw_redis.zadd("handoff:{probe}:queue", {task_id: 0})
    sup = start(["supervise", "--agents", "probe=1"])
    wait_until(lambda: all(client.status(t) == "done" for t in good), 30, "the good tasks")
    wait_until(lambda: all(client.status(t) == "dead" for t in planted), 30, "the bad buried")
    for task_id in planted:
        assert "corrupt task JSON" in client.dead_reason(task_id)
    assert not marker.exists()
    assert len(sup.live_children()) == 1 and "Traceback" not in sup.output()


names = st.one_of(
    st.text(min_size=0, max_size=300),
    st.sampled_from(["a{b}", "a:b", "a*", "a?", "a[b]", "a b", "a\nb", "A", "-a", "x" * 64, ""]),
    st.text(alphabet="{}:*?[] \n\tabc-_é☃", min_size=1, max_size=70),
)


@settings(max_examples=300, deadline=None)
@given(name=names)
def test_fuzzed_agent_names_fail_before_any_redis_call(name):
    keys = Keys("handoff")
    if AGENT_NAME.fullmatch(name):
        agent_keys = keys.agent(name)
        for key in [*agent_keys.all(), agent_keys.result("x"), agent_keys.claim("c")]:
            # The first {...} in the key is the agent's hash tag: one slot per agent.
            tag = key[key.index("{") + 1 : key.index("}")]
            assert tag == name
        return
    with pytest.raises(InvalidAgentName):
        check_agent(name)
    with pytest.raises(InvalidAgentName):
        keys.agent(name)
    # A client pointed at no server at all: the name is refused before any connection.
    dead_end = Client(settings=Settings(redis=RedisPoolConfig(url="redis://127.0.0.1:1/0")))
    with pytest.raises(InvalidAgentName):
        dead_end.enqueue(name, {})
