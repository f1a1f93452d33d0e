"""Throwaway measurements for docs/reliability-rows-lua.md (not committed)."""
import time

import orjson
import pytest
from click.testing import CliRunner

from handoff.cli import main
from handoff.client import Client, TaskDead
from handoff.protocol.keys import Keys
from handoff.testing import InProcessApp, VirtualClock
from harness.procs import plain_client, wait_until


def _g(raw, name, group):
    return [orjson.loads(x) for x in raw.lrange(name, 0, -1) if orjson.loads(x)["group"] == group]


@pytest.mark.backends("server")
@pytest.mark.parametrize("restored", [False, True])
def test_m2(start, redis_url, raw_redis, client, restored):
    client.enqueue_many("capped", [{"sleep_s": 1.0} for _ in range(10)], group="g1")
    start(["worker", "capped"], app="apps.groups")
    wait_until(lambda: raw_redis.llen("gstarts") >= 2, 20, "2")
    CliRunner().invoke(main, ["--redis-url", redis_url, "limits", "capped", "group_concurrency=0"])
    t0 = time.time()
    client.enqueue("capped", {"sleep_s": 0}, group="g2")
    wait_until(lambda: _g(raw_redis, "gends", "g2"), 5, "g2")
    wait_until(lambda: len(_g(raw_redis, "gends", "g1")) >= 2, 5, "2 ends")
    total = 10
    if restored:
        CliRunner().invoke(main, ["--redis-url", redis_url, "limits", "capped", "group_concurrency=default"])
        client.enqueue("capped", {"sleep_s": 0}, group="g1")
        total = 11
    try:
        wait_until(lambda: len(_g(raw_redis, "gends", "g1")) == total, 10, "all")
        ok = True
    except AssertionError:
        ok = False
    ended = len(_g(raw_redis, "gends", "g1"))
    print(f"\nM2 restored={restored} ok={ok} g1_ended={ended}/{total} after_change_s={time.time()-t0:.2f} "
          f"group_running={raw_redis.hgetall('handoff:{capped}:group_running')}")


@pytest.mark.backends("server")
def test_m5(redis_url, monkeypatch):
    monkeypatch.setenv("TEST_REDIS_URL", redis_url)
    app = InProcessApp("apps.flows", redis_url, clock=VirtualClock(), run_ttl_s=60, result_ttl_s=60)
    root = app.enqueue("splitter", {"n": 1000, "poison": [0], "on_dead": "fail"})
    app.run_until_idle(timeout_s=120, batch=500)
    then = app.client.result(root)["join"]["then"]
    raw = plain_client(redis_url)
    k = Keys().agent("merge")
    sk, ek = k.scope(then), k.ends(then)
    print(f"\nM5 status={app.client.status(then)} scope_pttl={raw.pttl(sk)} ends_pttl={raw.pttl(ek)} "
          f"bytes={(raw.memory_usage(sk) or 0) + (raw.memory_usage(ek) or 0)} "
          f"no_ttl={[x for x in raw.scan_iter(match='handoff:*', count=1000) if raw.pttl(x) == -1 and (b':scope:' in x or b':ends:' in x)]}")
    app.close()
