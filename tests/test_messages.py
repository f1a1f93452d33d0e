"""Messages: data sent into a running task, read in order by its handler, blocking in
Redis; a task delivered again after a crash reads them all again from the first."""

from __future__ import annotations

import signal
import time

import orjson
import psutil
import pytest

from handoff import MessageRefused
from handoff.errors import InvalidPayload
from harness.procs import wait_until

BACKENDS = ("server", "cluster")


def _listening(raw_redis, n: int = 1) -> list[dict]:
    wait_until(lambda: raw_redis.llen("listening") >= n, 30, "the handler to start")
    return [orjson.loads(x) for x in raw_redis.lrange("listening", 0, -1)]


def test_messages_arrive_in_order_while_the_handler_runs(client, raw_redis, start):
    start(["supervise", "--agents", "listener=1,alistener=1"], app="apps.waits")
    sync = client.enqueue("listener", {"n": 5, "timeout_s": 20})
    early = client.send(sync, {"k": 0})  # before it starts: kept for it
    assert early
    _listening(raw_redis)
    for k in range(1, 5):
        client.send(sync, {"k": k})
        time.sleep(0.05)
    assert client.result(sync, 20) == [{"k": k} for k in range(5)]
    quiet = client.enqueue("listener", {"n": 2, "timeout_s": 0.3})
    started = time.monotonic()
    assert client.result(quiet, 20) == [None, None]  # nothing sent: None at each timeout
    assert time.monotonic() - started >= 0.6
    coro = client.enqueue("alistener", {"n": 3, "timeout_s": 20})
    _listening(raw_redis, 3)
    for k in range(3):
        client.send(coro, k)
    assert client.result(coro, 20) == [0, 1, 2]


def test_after_a_sigkill_the_next_delivery_reads_every_message_again(client, raw_redis, start):
    start(["supervise", "--agents", "listener=1"], app="apps.waits", lease_s=2)
    tid = client.enqueue("listener", {"n": 5, "timeout_s": 30, "hang_after": 3})
    [first] = _listening(raw_redis)
    for k in range(3):
        client.send(tid, f"m{k}")
    wait_until(lambda: raw_redis.llen("heard") == 3, 20, "three messages read")
    psutil.Process(first["pid"]).send_signal(signal.SIGKILL)
    for k in range(3, 5):
        client.send(tid, f"m{k}")
    assert client.result(tid, 30) == [f"m{k}" for k in range(5)]
    heard = [orjson.loads(x) for x in raw_redis.lrange("heard", 0, -1)]
    again = [h["got"] for h in heard if h["deliveries"] > 1]
    assert again[0] == ["m0"] and again[-1] == [f"m{k}" for k in range(5)], heard


def test_sending_to_a_finished_or_unknown_task_is_one_line(either_client):
    client = either_client
    with pytest.raises(MessageRefused, match=r"^task nobody\.x1 is unknown: message not sent$"):
        client.send("nobody.x1", 1)
    tid = client.enqueue("listener", {"n": 1})
    client.cancel(tid)
    with pytest.raises(MessageRefused, match=rf"^task {tid} is already cancelled: message"):
        client.send(tid, 1)
    with pytest.raises(InvalidPayload, match="message data is not JSON"):
        client.send(client.enqueue("listener", {"n": 1}), object())
    assert client.signal("nobody.waits") == 0  # (AsyncClient.signal too)
