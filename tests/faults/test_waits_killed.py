"""Waits under SIGKILL: the waits race of tests/test_waits.py (harness/waits_race.py)
while a supervisor is SIGKILLed every 500 ms and another started in its place, on one
server and on a 3-primary cluster. Timeouts fire from the supervisors' tick with no
leader, from any supervisor of the then-task's agent (`after`): two run. The steady one
(asker=1, after=1, ticking every 0.2 s) is never killed, so a timeout is late by a tick
at most. The victim (asker=1, after=0: it ticks for `after` but runs none of its tasks)
ticks every 20 ms, so a kill lands mid-tick often: a timeout fired and its run not yet
told, a registration or a resume owed. Every other kill takes its asker worker with it
(the whole session), mid-park at times: the wait parked and its registration owed. What
a kill leaves is for the next tick of either. Every then-task still runs, or is
dead-lettered, exactly once, as signalled or as timed out, never both (the then agent's
workers are never killed, so "once" is exact: not at-least-once)."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from harness.waits_race import race, warm

BACKENDS = ("server", "cluster")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

WAITS = int(os.environ.get("WAITS_TEST_N", "100"))  # the 1,000, scaled down
KILL_EVERY_S = 0.5
VICTIM_TICK_S = 0.02


class Killer(threading.Thread):
    """Every KILL_EVERY_S: SIGKILL the victim supervisor (every other time its session:
    its workers too), and start another in its place at once."""

    def __init__(self, launch) -> None:
        super().__init__(daemon=True)
        self.launch = launch
        self.victim = launch()
        self.halt = threading.Event()
        self.kills = 0

    def run(self) -> None:
        while not self.halt.wait(KILL_EVERY_S):  # the fault's cadence, not a synchronisation
            if self.kills % 2:
                os.killpg(self.victim.pid, signal.SIGKILL)  # its own session (HandoffProcess)
            else:
                os.kill(self.victim.pid, signal.SIGKILL)  # its workers see it gone, drain
            self.victim.proc.wait(10)
            self.kills += 1
            self.victim = self.launch()

    def stop(self) -> int:
        self.halt.set()
        self.join(30)
        return self.kills


def test_a_killed_supervisor_loses_no_timeout_and_fires_none_twice(
    client, raw_redis, start, redis_url, record_property
):
    start(["supervise", "--agents", "asker=1,after=1"], app="apps.waits")
    killer = Killer(
        lambda: start(
            ["supervise", "--agents", "asker=1,after=0"],
            app="apps.waits",
            reaper_interval_s=VICTIM_TICK_S,
        )
    )
    warm(client)
    killer.start()
    try:
        outcome = race(client, raw_redis, redis_url, WAITS)
    finally:
        kills = killer.stop()
    record_property("kills", kills)
    print(f"{kills} supervisors SIGKILLed")
    assert kills >= 4, kills  # the faults really landed
    assert outcome["signalled"] and outcome["timed out, ran"] and outcome["timed out, dead"]
