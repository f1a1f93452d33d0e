"""One failover scenario for Sentinel and Cluster alike: kill a primary under load.

A supervisor runs two probe workers, a producer enqueues 10 tasks a call with WAIT 1
(counting what it was told succeeded), the test's `kill` SIGKILLs the primary and
`promoted` waits for its replacement; then every acknowledged task must get done.
The producer is paced (PACE_S between calls, about 500 tasks a second): unpaced it
acknowledged some 15,000 tasks in the few seconds a failover takes, and checking each
one's status took the test most of its half a minute while proving nothing more.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from handoff.client import Client
from handoff.config import RedisPoolConfig, Settings
from handoff.errors import HandoffError
from harness.procs import wait_until

PACE_S = 0.02  # between the producer's calls of 10 enqueues


@dataclass
class FailoverRun:
    acknowledged: int  # enqueues the producer was told succeeded (all of them done)
    promoted_after_s: float
    resumed_after_s: float  # when 100 more tasks were done after the promotion


def kill_a_primary_under_load(
    url: str, start, kill: Callable[[], None], promoted: Callable[[], None]
) -> FailoverRun:
    settings = Settings(redis=RedisPoolConfig(url=url), enqueue_wait_replicas=1)
    sup = start(["supervise", "--agents", "probe=2"], url=url)
    acknowledged: list[str] = []
    stop = threading.Event()

    def produce() -> None:
        with Client(settings=settings) as producer:
            while not stop.is_set():
                try:
                    acknowledged.extend(producer.enqueue_many("probe", [{"sleep_s": 0}] * 10))
                except HandoffError:  # unreachable, or not confirmed by a replica
                    pass
                stop.wait(PACE_S)

    with Client(settings=settings) as client:
        producer = threading.Thread(target=produce)
        producer.start()
        try:
            wait_until(lambda: done(client) >= 300, 30, "the workers to get going")
            kill()
            killed_at = time.monotonic()
            promoted()
            promoted_after_s = time.monotonic() - killed_at
            done_at_failover = done(client)
            wait_until(lambda: done(client) > done_at_failover + 100, 60, "work to resume")
            resumed_after_s = time.monotonic() - killed_at
        finally:
            stop.set()
            producer.join(30)
        pending = list(acknowledged)
        wait_until(lambda: all_done(client, pending), 60, "every acknowledged task to be done")
    assert sup.proc.poll() is None  # the supervisor and its workers rode it out
    return FailoverRun(len(acknowledged), promoted_after_s, resumed_after_s)


def all_done(client: Client, ids: list[str]) -> bool:
    """Whether every id is done; the ones found done are dropped from ids, so each poll
    asks only about the rest."""
    ids[:] = [task_id for task_id in ids if client.status(task_id) != "done"]
    return not ids


def done(client: Client) -> int:
    """Tasks done so far (-1 while the primary cannot be reached: mid-failover)."""
    try:
        return int(client.queue_stats(["probe"])["probe"]["done"])
    except HandoffError:
        return -1


def record(run: FailoverRun, record_property) -> None:
    record_property("acknowledged", run.acknowledged)
    record_property("promoted_after_s", round(run.promoted_after_s, 2))
    record_property("resumed_after_s", round(run.resumed_after_s, 2))
