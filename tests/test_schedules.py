"""Periodic schedules: the ticks (daylight saving time included, on a virtual clock), bad
declarations, and each tick enqueued exactly once however many supervisors fire it.

The firing tests run against a real server and a real 3-primary cluster. The last one
runs three real supervisor processes for SCHEDULE_SOAK_S seconds (8 by default, so the
suite stays fast; the issue's 30 s run is `SCHEDULE_SOAK_S=30 pytest
tests/test_schedules.py -k three_supervisors`), one of them SIGKILLed halfway.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
from collections import Counter
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import orjson
import pytest

from handoff.config import ConfigError, RedisPoolConfig, Settings, load_settings
from handoff.config.schedule_spec import MAX_PRIORITY, MIN_PRIORITY, make_schedule
from handoff.connection.manager import RedisManager
from handoff.protocol import task as task_model
from handoff.protocol.keys import Keys
from handoff.protocol.queue import ClaimRequest, Completion, TaskQueue
from handoff.runtime import schedules as schedules_module
from handoff.runtime.agents import AgentSpec
from handoff.runtime.schedules import (
    MIN_DEDUPE_WINDOW_S,
    Scheduler,
    declared_schedules,
    read_last_ticks,
    schedule,
    tick_key,
)
from handoff.runtime.ticks import latest_tick_ms, next_tick_ms, tick_time
from harness.procs import ROOT, handoff_env, stat, wait_until

SOAK_S = float(os.environ.get("SCHEDULE_SOAK_S", "8"))
BERLIN = ZoneInfo("Europe/Berlin")
SPRING = datetime(2025, 3, 30, tzinfo=BERLIN)  # 02:00 CET -> 03:00 CEST
FALL = datetime(2025, 10, 26, tzinfo=BERLIN)  # 03:00 CEST -> 02:00 CET
HOUR_MS = 3_600_000


def ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def local(tick: int) -> str:
    """A tick as Berlin wall-clock time with its offset: '03-30 03:00+02:00'."""
    return datetime.fromtimestamp(tick / 1000, BERLIN).strftime("%m-%d %H:%M%z")[:-2] + ":00"


def berlin(cron: str, **fields):
    return make_schedule("nightly", agent="reporter", cron=cron, timezone="Europe/Berlin", **fields)


def ticks_between(spec, start: datetime, end: datetime) -> list[str]:
    out, tick = [], latest_tick_ms(spec, ms(start) - 1)
    while True:
        tick = next_tick_ms(spec, tick)
        if tick >= ms(end):
            return out
        out.append(local(tick))


@pytest.fixture(autouse=True)
def _empty_registry(monkeypatch):
    """schedule(...) in a test registers in this process: each test starts with none."""
    monkeypatch.setattr(schedules_module, "_REGISTRY", {})


# --- ticks (pure) -------------------------------------------------------------------------


def test_every_s_ticks_are_multiples_of_the_interval_since_the_epoch():
    spec = make_schedule("s", agent="a", every_s=60)
    assert next_tick_ms(spec, 1_000) == 60_000
    assert next_tick_ms(spec, 60_000) == 120_000  # strictly after
    assert latest_tick_ms(spec, 60_000) == 60_000  # at or before
    assert latest_tick_ms(spec, 119_999) == 60_000


@pytest.mark.parametrize(
    ("cron", "day", "expected"),
    [
        # Fixed times follow the wall clock (cronsim, as Debian's cron): a time the
        # spring-forward skips runs once, at 03:00 CEST; a time the fall-back repeats runs
        # on its first occurrence only. No day is lost, none runs twice.
        ("0 2 * * *", SPRING, ["03-29 02:00+01:00", "03-30 03:00+02:00", "03-31 02:00+02:00"]),
        ("30 2 * * *", SPRING, ["03-29 02:30+01:00", "03-30 03:00+02:00", "03-31 02:30+02:00"]),
        ("0 2 * * *", FALL, ["10-25 02:00+02:00", "10-26 02:00+02:00", "10-27 02:00+01:00"]),
        ("30 2 * * *", FALL, ["10-25 02:30+02:00", "10-26 02:30+02:00", "10-27 02:30+01:00"]),
        # 03:00 local stays 03:00 local: 01:00 UTC in summer, 02:00 UTC in winter.
        ("0 3 * * *", FALL, ["10-25 03:00+02:00", "10-26 03:00+01:00", "10-27 03:00+01:00"]),
    ],
)
def test_daily_cron_ticks_across_daylight_saving_transitions(cron, day, expected):
    spec = berlin(cron)
    assert ticks_between(spec, day - timedelta(days=1), day + timedelta(days=2)) == expected


def test_an_hourly_cron_follows_real_time_23_hours_in_spring_25_in_autumn():
    spec = berlin("0 * * * *")
    spring = ticks_between(spec, SPRING, SPRING + timedelta(days=1))
    fall = ticks_between(spec, FALL, FALL + timedelta(days=1))
    assert len(spring) == 23 and "03-30 02:00+01:00" not in spring
    assert len(fall) == 25
    assert fall[2:4] == ["10-26 02:00+02:00", "10-26 02:00+01:00"]  # the repeated hour, twice


@pytest.mark.parametrize("cron", ["0 2 * * *", "30 2 * * *", "15,45 1-3 * * *", "*/20 * * * *"])
@pytest.mark.parametrize("day", [SPRING, FALL], ids=["spring", "fall"])
def test_latest_and_next_tick_agree_minute_by_minute_over_a_transition(cron, day):
    """For every instant t: latest(t) <= t < next(t) and no tick lies between them; so a
    firer that starts (catch-up) or wakes at any instant picks the same ticks."""
    spec = berlin(cron)
    start = ms(day) - 2 * HOUR_MS
    for offset in range(0, 8 * HOUR_MS, 30_000):
        at = start + offset
        latest, upcoming = latest_tick_ms(spec, at), next_tick_ms(spec, at)
        assert latest <= at < upcoming, (local(at), local(latest), local(upcoming))
        assert next_tick_ms(spec, latest) == upcoming, local(at)


def test_config_priority_bounds_match_the_task_model():
    assert (MIN_PRIORITY, MAX_PRIORITY) == (task_model.MIN_PRIORITY, task_model.MAX_PRIORITY)


# --- bad input: one line naming the schedule -----------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"cron": "0 3 * *"}, "schedule 'nightly': cron = '0 3 * *': not a cron expression "
                              "(Wrong number of fields)"),
        ({"cron": "61 * * * *"}, "schedule 'nightly': cron = '61 * * * *': not a cron "
                                 "expression (Bad minute)"),
        ({"cron": "0 0 30 2 *"}, "schedule 'nightly': cron = '0 0 30 2 *': not a cron "
                                 "expression (Bad day-of-month)"),
        ({"cron": "0 3 * * *", "timezone": "Mars/Olympus"},
         "schedule 'nightly': timezone = 'Mars/Olympus': unknown time zone (an IANA name like "
         "'Europe/Berlin')"),
        ({"cron": "0 3 * * *", "every_s": 60}, "schedule 'nightly': give cron= or every_s=, "
                                               "not both"),
        ({}, "schedule 'nightly': give cron= or every_s=, one is needed"),
        ({"every_s": 0.5}, "schedule 'nightly': every_s = 0.5: must be between 1 and 31622400"),
        ({"every_s": "60"}, "schedule 'nightly': every_s = '60': must be a number"),
        ({"every_s": 60, "catch_up": "all"},
         "schedule 'nightly': catch_up = 'all': must be one of last, none"),
        ({"every_s": 60, "priority": 5000},
         "schedule 'nightly': priority = 5000: must be between -1000 and 1000"),
        ({"every_s": 60, "payload": {1, 2}}, "schedule 'nightly': payload is not JSON"),
    ],
)  # fmt: skip
def test_a_bad_declaration_fails_with_one_line_naming_the_schedule(fields, message):
    with pytest.raises(ConfigError) as error:
        schedule("nightly", agent="reporter", **fields)
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)


def test_an_unknown_agent_fails_at_load_naming_the_schedule():
    schedule("nightly", agent="reportr", cron="0 3 * * *")
    agents = {"reporter": AgentSpec("reporter", lambda task: None)}
    with pytest.raises(ConfigError) as error:
        declared_schedules(Settings(app="myapp"), agents)
    assert str(error.value) == (
        "schedule 'nightly': agent = 'reportr': not defined in app 'myapp' (defined: reporter)"
    )


def test_schedules_need_a_dedupe_window_longer_than_any_firing():
    schedule("nightly", agent="reporter", cron="0 3 * * *")
    with pytest.raises(ConfigError, match="dedupe_window_s = 10: schedules need at least 300"):
        declared_schedules(Settings(dedupe_window_s=10), None)
    assert MIN_DEDUPE_WINDOW_S == 300


def test_toml_schedules_are_loaded_checked_and_shown_by_config_show(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text(
        '[schedules.nightly-report]\ncron = "0 3 * * *"\nagent = "reporter"\n'
        'timezone = "Europe/Berlin"\npayload = {kind = "daily", n = [1, 2]}\n'
        '[schedules.pulse]\nevery_s = 30\nagent = "reporter"\ncatch_up = "none"\n'
    )
    settings = load_settings(config_file=good, env={})
    nightly, pulse = settings.schedules["nightly-report"], settings.schedules["pulse"]
    assert (nightly.cron, nightly.timezone, nightly.payload) == (
        "0 3 * * *", "Europe/Berlin", {"kind": "daily", "n": [1, 2]}
    )  # fmt: skip
    assert (pulse.every_s, pulse.catch_up, pulse.payload) == (30.0, "none", {})
    from handoff.cli.config_commands import to_toml
    from handoff.config import settings_to_dict

    saved = tmp_path / "saved.toml"
    saved.write_text(to_toml(settings_to_dict(settings)))  # config show's text is a config
    assert load_settings(config_file=saved, env={}).schedules == settings.schedules

    for body, message in [
        ('cron = "0 3 * *"\nagent = "r"', "schedule 'n': cron = '0 3 * *': not a cron"),
        ('cron = "0 3 * * *"\nagent = "r"\ntimezone = "Nowhere/City"',
         "schedule 'n': timezone = 'Nowhere/City': unknown time zone"),
        ('crn = "0 3 * * *"\nagent = "r"', "schedule 'n': unknown key 'crn' (did you mean "
                                           "'cron'?)"),
        ('cron = "0 3 * * *"', "schedule 'n': agent is missing"),
    ]:  # fmt: skip
        bad = tmp_path / "bad.toml"
        bad.write_text(f"[schedules.n]\n{body}\n")
        with pytest.raises(ConfigError) as error:
            load_settings(config_file=bad, env={})
        assert str(error.value).startswith(message)


def test_a_supervisor_with_a_bad_schedule_does_not_start(redis_url, tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('[schedules.nightly]\ncron = "0 3 * * *"\nagent = "nobody"\n')
    result = subprocess.run(
        [sys.executable, "-m", "handoff", "--app", "apps.sched", "--config", str(config),
         "supervise", "--agents", "ticker=1"],
        env=handoff_env(redis_url), cwd=ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("handoff: error: schedule 'nightly': agent = 'nobody': not "
                                "defined in app 'apps.sched'"), result.stderr  # fmt: skip


# --- firing, against a real server and cluster ---------------------------------------------


class VirtualClock:
    def __init__(self, start_ms: int) -> None:
        self.now = start_ms

    def __call__(self) -> int:
        return self.now


def make_queue(url: str, **settings) -> TaskQueue:
    config = Settings(redis=RedisPoolConfig(url=url), **settings)
    return TaskQueue(RedisManager(config.redis, background=False), config)


@pytest.fixture
def queues(redis_url):
    made: list[TaskQueue] = []

    def make(**settings) -> TaskQueue:
        made.append(make_queue(redis_url, **settings))
        return made[-1]

    yield make
    for queue in made:
        queue.manager.close()


def enqueued_ticks(raw_redis, agent: str, name: str) -> list[int]:
    """The tick of every task of `agent` still stored (queued, running or dead)."""
    tasks = [orjson.loads(raw) for raw in raw_redis.hvals(Keys().agent(agent).tasks)]
    keys = [t.get("key") or "" for t in tasks]
    return sorted(int(k.rpartition(":")[2]) for k in keys if k.startswith(f"schedule:{name}:"))


def run_clock(schedulers, clock: VirtualClock, until_ms: int, jitter_ms: int = 0) -> None:
    """Step every scheduler at each instant, moving the clock to the next due time (plus
    up to jitter_ms: a firer wakes a little late), as their threads would."""
    while clock.now < until_ms:
        wait_s = min(s.step() for s in schedulers)
        clock.now += max(1, int(wait_s * 1000)) + random.randint(0, jitter_ms)


BACKENDS = ("server", "cluster")


@pytest.mark.parametrize(
    ("cron", "day", "expected"),
    [
        ("30 2 * * *", SPRING, ["03-30 03:00+02:00", "03-31 02:30+02:00"]),
        ("30 2 * * *", FALL, ["10-26 02:30+02:00", "10-27 02:30+01:00"]),
        ("0 2 * * *", FALL, ["10-26 02:00+02:00", "10-27 02:00+01:00"]),
    ],
)
def test_a_scheduler_on_a_virtual_clock_fires_each_day_once_across_a_transition(
    queues, raw_redis, cron, day, expected
):
    spec = berlin(cron)
    clock = VirtualClock(ms(day - timedelta(hours=12)))
    scheduler = Scheduler(queues(), [spec], clock_ms=clock)
    run_clock([scheduler], clock, ms(day + timedelta(days=1, hours=12)), jitter_ms=300)
    assert [local(t) for t in enqueued_ticks(raw_redis, "reporter", "nightly")] == expected
    assert read_last_ticks(queues(), ["nightly"]) == {"nightly": ms_of(expected[-1], day)}


def ms_of(shown: str, day: datetime) -> int:
    """'03-31 02:30+02:00' (in day's year) -> ms."""
    return ms(datetime.strptime(f"{day.year}-{shown}", "%Y-%m-%d %H:%M%z"))


def test_three_firers_enqueue_each_tick_once_while_one_stops_and_tasks_finish(
    queues, raw_redis, client
):
    """Three schedulers step at the same virtual instants from three threads (their own
    connections), a consumer finishes every task at once (its ack keeps no dedupe window,
    so only the record stops a late firer), and one firer stops halfway."""
    spec = make_schedule("pulse", agent="ticker", every_s=1)
    clock = VirtualClock(1_900_000_000_000)
    firers = [Scheduler(queues(), [spec], clock_ms=clock) for _ in range(3)]
    consumer = queues(dedupe_window_s=0)
    barrier = threading.Barrier(3)
    errors: list[BaseException] = []

    def step(firer: Scheduler) -> None:
        try:
            barrier.wait(10)
            firer.step()
        except BaseException as e:
            errors.append(e)

    start = clock.now
    for second in range(61):
        clock.now = start + second * 1000 + random.randint(0, 900)
        live = firers if second < 30 else firers[1:]  # firers[0] stops halfway
        if second == 30:
            barrier = threading.Barrier(2)
        threads = [threading.Thread(target=step, args=(f,)) for f in live]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        claimed = consumer.claim([ClaimRequest("ticker", 100, 30_000)])["ticker"]
        consumer.ack([Completion(t) for t in claimed])
    assert not errors
    # The stopped firer comes back late, its next tick long past and those tasks finished
    # with no dedupe window: the record says they were fired, so it fires only the latest.
    firers[0].step()
    fired = stat(client, "ticker", "enqueued")
    last = read_last_ticks(consumer, ["pulse"])["pulse"]
    assert last == start + 60_000
    assert fired == 60  # ticks start + 1 s .. start + 60 s, each once
    assert stat(client, "ticker", "done") == 60


def test_catch_up_last_fires_the_latest_missed_tick_once_and_none_skips_it(queues, raw_redis):
    last_spec = make_schedule("pulse-last", agent="ticker", every_s=10)
    none_spec = make_schedule("pulse-none", agent="ticker", every_s=10, catch_up="none")
    new_spec = make_schedule("pulse-new", agent="ticker", every_s=10)
    clock = VirtualClock(1_900_000_000_000)  # a tick: multiples of 10 s
    first = Scheduler(queues(), [last_spec, none_spec], clock_ms=clock)
    first.step()  # starts: nothing recorded, so nothing caught up
    clock.now += 10_000
    first.step()  # fires the tick at start + 10 s, then "stops"
    assert enqueued_ticks(raw_redis, "ticker", "pulse-last") == [clock.now]
    fired_at = clock.now
    clock.now += 57_000  # five ticks pass with no supervisor running
    again = Scheduler(queues(), [last_spec, none_spec, new_spec], clock_ms=clock)
    wait_s = again.step()
    assert enqueued_ticks(raw_redis, "ticker", "pulse-last") == [fired_at, fired_at + 50_000]
    assert enqueued_ticks(raw_redis, "ticker", "pulse-none") == [fired_at]
    assert enqueued_ticks(raw_redis, "ticker", "pulse-new") == []  # a new one: next tick
    assert wait_s == 3.0  # the next tick (at +60 s) is 3 s away
    clock.now += 3_000
    again.step()
    for name in ("pulse-last", "pulse-none", "pulse-new"):
        assert enqueued_ticks(raw_redis, "ticker", name)[-1] == fired_at + 60_000


def test_a_tick_fires_within_milliseconds_of_its_time_not_at_the_next_look(queues):
    spec = make_schedule("pulse", agent="ticker", every_s=3600)
    tick = 3_600_000 * 528_000
    clock = VirtualClock(tick - 50)
    scheduler = Scheduler(queues(), [spec], clock_ms=clock)
    assert scheduler.step() == pytest.approx(0.05)  # sleeps 50 ms, not a whole look
    clock.now = tick + 10
    assert scheduler.step() == 5.0  # fired; the next is an hour away: looks again in 5 s
    assert read_last_ticks(scheduler.queue, ["pulse"]) == {"pulse": tick}


def test_replaced_schedules_keep_their_place_and_new_ones_start_at_their_next_tick(
    queues, raw_redis
):
    """What SIGHUP does with the config file's schedules."""
    kept = make_schedule("kept", agent="ticker", every_s=10)
    clock = VirtualClock(1_900_000_000_000)
    scheduler = Scheduler(queues(), [kept, make_schedule("dropped", agent="ticker", every_s=10)],
                          clock_ms=clock)  # fmt: skip
    scheduler.step()
    clock.now += 10_000
    scheduler.step()
    added = make_schedule("added", agent="ticker", every_s=10)
    scheduler.replace([kept, added])
    clock.now += 15_000  # kept's tick at +20 s is due; added starts after now
    scheduler.step()
    assert scheduler.names == ["kept", "added"]
    assert enqueued_ticks(raw_redis, "ticker", "kept") == [clock.now - 15_000, clock.now - 5_000]
    assert enqueued_ticks(raw_redis, "ticker", "added") == []
    assert enqueued_ticks(raw_redis, "ticker", "dropped") == [clock.now - 15_000]
    clock.now += 5_000
    scheduler.step()
    assert enqueued_ticks(raw_redis, "ticker", "added") == [clock.now]


def test_handoff_schedules_lists_next_fire_and_last_fired_task(redis_url, tmp_path, client):
    config = tmp_path / "h.toml"
    config.write_text(
        '[schedules.nightly-report]\ncron = "0 3 * * *"\nagent = "ticker"\n'
        'timezone = "Europe/Berlin"\n'
    )
    recorded = {"every-second": 1_900_000_000_000, "gone": 1_800_000_000_000}
    client.queue.manager.execute(lambda c: c.zadd(client.queue.keys.schedules, recorded))
    args = [sys.executable, "-m", "handoff", "--app", "apps.sched", "--config", str(config),
            "schedules"]  # fmt: skip
    env = handoff_env(redis_url)
    out = subprocess.run([*args, "--json"], env=env, cwd=ROOT, capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr
    rows = {row["name"]: row for row in orjson.loads(out.stdout)}
    assert set(rows) == {"every-second", "nightly-report", "gone"}
    every = rows["every-second"]
    assert every["last_tick_ms"] == 1_900_000_000_000
    assert every["last_task"] == task_model.derived_task_id(
        "ticker", "key", tick_key("every-second", 1_900_000_000_000)
    )
    nightly = rows["nightly-report"]
    assert nightly["last_task"] is None and nightly["when"] == "cron 0 3 * * * Europe/Berlin"
    assert tick_time(make_schedule("x", agent="a", cron="0 3 * * *", timezone="Europe/Berlin"),
                     nightly["next_ms"]).strftime("%H:%M") == "03:00"  # fmt: skip
    assert nightly["next"].endswith(("+01:00", "+02:00"))
    assert rows["gone"]["declared"] is False
    text = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines()[0].split() == [
        "schedule", "agent", "when", "next", "last", "fired", "last", "task",
    ]  # fmt: skip
    assert every["last_task"] in text.stdout


# --- real supervisors ---------------------------------------------------------------------


def test_three_supervisors_fire_every_tick_exactly_once_while_one_is_sigkilled(
    start, client, raw_redis
):
    """Three `handoff supervise` processes run the app's every_s=1 schedule; one is
    SIGKILLed halfway. Every tick from the first to the last is enqueued once: no gap, no
    duplicate, and each is created within a second of its time."""
    supervisors = [start(["--app", "apps.sched", "supervise", "--agents", "ticker=1"])
                   for _ in range(3)]  # fmt: skip
    for sup in supervisors:
        wait_until(lambda sup=sup: "running schedules every-second" in sup.output(), 30,
                   "each supervisor to run the schedule")  # fmt: skip

    def executed() -> int:
        return raw_redis.llen("ticks")

    first = executed()
    half = int(SOAK_S / 2)
    wait_until(lambda: executed() >= first + half, SOAK_S + 10, f"{half} more ticks")
    supervisors[0].proc.send_signal(signal.SIGKILL)
    supervisors[0].wait(10)
    killed_at = executed()
    wait_until(lambda: executed() >= killed_at + half, SOAK_S + 10, f"{half} ticks after")
    for sup in supervisors[1:]:
        sup.signal(signal.SIGTERM)
    for sup in supervisors[1:]:
        assert sup.wait(15) == 0

    runs = [line.decode().split() for line in raw_redis.lrange("ticks", 0, -1)]
    ran = {int(tick): task_id for tick, task_id, _, _ in runs}
    left = enqueued_ticks(raw_redis, "ticker", "every-second")  # enqueued, not yet run
    ticks = sorted(set(ran) | set(left))
    assert len(ticks) >= 2 * half
    assert ticks == list(range(ticks[0], ticks[-1] + 1000, 1000))  # no gap
    assert stat(client, "ticker", "enqueued") == len(ticks)  # no tick enqueued twice
    assert max(Counter(task_id for _, task_id, _, _ in runs).values()) == 1  # none ran twice
    lateness = sorted(int(late) for _, _, late, _ in runs)
    assert lateness[-1] < 1000, lateness  # each fired before the next tick was due
    print(f"ticks {len(ticks)}, lateness ms: median {lateness[len(lateness) // 2]}, "
          f"max {lateness[-1]}")  # fmt: skip
