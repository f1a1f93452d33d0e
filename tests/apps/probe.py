"""Agents for worker and supervisor tests. Each records what it did in the test's server
(TEST_REDIS_URL), so a test can check executions, concurrency and deliveries from outside.

    executed        LIST  "<pid> <task id>" per execution start
    conc:{<pid>}    running now in one worker;   peak:{<pid>}  its peak
    conc:{<agent>}  running now across workers;  peak:{<agent>} its peak

Each counter and its peak share a hash tag, so the tests run on a cluster too.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import time

import redis

from handoff import Handoff, agent
from harness.procs import plain_client

_client: redis.Redis | None = None
_client_pid = 0

_ENTER = """
local v = redis.call('INCR', KEYS[1])
if v > tonumber(redis.call('GET', KEYS[2]) or '0') then redis.call('SET', KEYS[2], v) end
return v
"""


def client() -> redis.Redis:
    global _client, _client_pid
    if _client is None or _client_pid != os.getpid():
        _client = plain_client(os.environ["TEST_REDIS_URL"])
        _client_pid = os.getpid()
    return _client


def _record(task, agent_name: str) -> None:
    pid = os.getpid()
    c = client()
    c.rpush("executed", f"{pid} {task.id}")
    for tag in (pid, agent_name):
        c.eval(_ENTER, 2, f"conc:{{{tag}}}", f"peak:{{{tag}}}")


def _leave(agent_name: str) -> None:
    c = client()
    pipe = c.pipeline(transaction=False)
    pipe.decr(f"conc:{{{os.getpid()}}}")
    pipe.decr(f"conc:{{{agent_name}}}")
    pipe.execute()


@agent("probe", max_concurrent=4, global_limit=6, lease_s=2.0)
def probe(task):
    """Sleeps payload['sleep_s'] (default 5 ms) and returns the payload's 'n'."""
    _record(task, "probe")
    try:
        time.sleep(task.payload.get("sleep_s", 0.005))
        return {"n": task.payload.get("n")}
    finally:
        _leave("probe")


@agent("aprobe", max_concurrent=8)
async def aprobe(task):
    _record(task, "aprobe")
    try:
        await asyncio.sleep(task.payload.get("sleep_s", 0.005))
        return task.payload.get("n")
    finally:
        _leave("aprobe")


@agent("flaky", max_concurrent=2, max_attempts=2, retry_delay_s=0.01)
def flaky(task):
    client().rpush("executed", f"{os.getpid()} {task.id}")
    raise ValueError(f"flaky failure for {task.payload}")


@agent("aborter", max_concurrent=1, lease_s=1.0)
def aborter(task):
    client().rpush("executed", f"{os.getpid()} {task.id}")
    os.abort()


@agent("leaker", max_concurrent=1)
def leaker(task):
    client().rpush("executed", f"{os.getpid()} {task.id}")
    hoard = getattr(leaker, "hoard", [])
    hoard.append(b"x" * (20 * 1024 * 1024))  # 20 MB more per task (touched), never freed
    time.sleep(0.1)
    leaker.hoard = hoard
    return len(hoard)


@agent("filler", max_concurrent=8)
def filler(task):
    """Does nothing and returns a small result (the memory-limit drain)."""
    return {"n": len(task.payload.get("pad", ""))}


@agent("returner", max_concurrent=2)
def returner(task):
    """Returns what payload['kind'] names: the return values a worker must refuse."""
    kind = task.payload["kind"]
    if kind == "mixed":
        return [Handoff("probe", {"n": 0}), 5]
    if kind == "nan":
        return {"score": float("nan")}
    if kind == "inf":
        return [1.0, [float("-inf")]]
    if kind == "big":
        return "x" * task.payload["size"]
    return {"kind": kind, "null": None}


@agent("forker", max_concurrent=2)
def forker(task):
    """Forks; the child records itself, lingers payload['child_s'] and returns without
    exiting, as careless handler code would (it must not go on as a worker)."""
    pid = os.fork()
    if pid == 0:
        client().rpush("forked", os.getpid())
        time.sleep(task.payload.get("child_s", 0))
        return "from the child"
    client().rpush("executed", f"{os.getpid()} {task.id}")
    return "from the parent"


@agent("aforker", max_concurrent=2)
async def aforker(task):
    """forker, as a coroutine."""
    pid = os.fork()
    if pid == 0:
        client().rpush("forked", os.getpid())
        await asyncio.sleep(task.payload.get("child_s", 0))
        return "from the child"
    client().rpush("executed", f"{os.getpid()} {task.id}")
    return "from the parent"


@agent("gilhog", max_concurrent=1, lease_s=1.0)
def gilhog(task):
    """On its first delivery, one C call that holds the GIL for payload['hold_s'] (libc's
    usleep through PyDLL, which keeps the GIL), then payload['then_s'] more of work."""
    if task.deliveries == 1:
        ctypes.PyDLL(None).usleep(int(task.payload["hold_s"] * 1_000_000))
        time.sleep(task.payload["then_s"])
    return {"by": os.getpid()}


@agent("busy", max_concurrent=4)
def busy(task):
    """The autoscaling load: records itself, then works payload['sleep_s'] (20 ms)."""
    client().rpush("executed", f"{os.getpid()} {task.id}")
    time.sleep(task.payload.get("sleep_s", 0.02))


@agent("sleeper", max_concurrent=1, timeout_s=0.5, max_attempts=1)
def sleeper(task):
    client().rpush("executed", f"{os.getpid()} {task.id}")
    time.sleep(60)


@agent("relay", max_concurrent=4)
def relay(task):
    """Hands off to probe (fan-out of payload['fan'] children), after payload['sleep_s']."""
    _record(task, "relay")
    _leave("relay")
    time.sleep(task.payload.get("sleep_s", 0))
    return [Handoff("probe", {"n": i}) for i in range(task.payload.get("fan", 1))]


@agent("holder", max_concurrent=50, lease_s=2.0)
def holder(task):
    """On its first delivery sleeps payload['first_s'] (so it can be killed holding it)."""
    _record(task, "holder")
    try:
        time.sleep(task.payload["first_s"] if task.deliveries == 1 else 0.01)
        return task.payload.get("n")
    finally:
        _leave("holder")


@agent("mixed", max_concurrent=2, lease_s=1.0)
def mixed(task):
    """Kills its own process on a poison payload; otherwise a quick no-op."""
    client().rpush("executed", f"{os.getpid()} {task.id}")
    if task.payload.get("poison"):
        os.abort()
    return task.payload.get("n")


@agent("slowpoke", max_concurrent=1, lease_s=1.0)
def slowpoke(task):
    """Sleeps payload['sleep_s'] on first delivery; records who finished, and when."""
    c = client()
    c.rpush("executed", f"{os.getpid()} {task.id}")
    time.sleep(task.payload["sleep_s"] if task.deliveries == 1 else 0)
    c.rpush("finished", f"{os.getpid()} {task.id}")
    return {"by": os.getpid()}
