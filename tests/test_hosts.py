"""Faults between hosts: each host a network namespace (harness/hosts.py), Redis on a host of
its own, one supervisor per worker host. A cut pulls a host's cable (its packets go nowhere,
nothing is reset); healing puts it back. Leases are 1.5 s (tests/apps/hostsapp.py).

The figures each test measures are recorded as properties (pytest --junitxml shows them) and
quoted in docs/reliability-rows-hosts.md.
"""

from __future__ import annotations

import sys
import time
from collections import Counter

import pytest

from harness import hosts as hostlib
from harness.procs import handoff_env, wait_until

APP = "apps.hostsapp"
WORKERS = ("a", "b", "c")


@pytest.fixture
def net(tmp_path, request):
    """Hosts redis, a, b, c and a server on `redis`; everything is torn down at the end,
    also when the test fails (the finalizer, and atexit behind it)."""
    reason = hostlib.need_root()
    if reason:
        pytest.skip(reason)
    made = hostlib.Hosts(["redis", *WORKERS], tmp_path / "hosts")
    request.addfinalizer(made.stop)
    made.server = made.redis("redis")
    yield made
    made.stop()
    assert made.leftovers() == [], "namespaces or links left behind"


@pytest.fixture
def hclient(net):
    from handoff.client import Client
    from handoff.config import RedisPoolConfig, Settings

    with Client(settings=Settings(redis=RedisPoolConfig(url=net.server.url))) as c:
        yield c


def supervise(net, host: str, agents: str, url: str | None = None, **settings):
    env = handoff_env(net.server.url, app=APP, **settings)
    env["HOST_NAME"] = host
    if url:
        env["HANDOFF_REDIS_URL"] = url
    return net.handoff(host, ["supervise", "--agents", agents], env, label="supervise")


def records(raw, key: str) -> list[tuple[str, int, str]]:
    out = []
    for line in raw.lrange(key, 0, -1):
        host, pid, what = line.decode().split(" ", 2)
        out.append((host, int(pid), what))
    return out


def done_count(client, agent: str) -> int:
    return client.queue_stats([agent])[agent]["done"]


def worker_health(raw) -> dict[int, dict[str, str]]:
    """pid -> the fields of its health hash (handoff:worker:<id>), as the monitor reads."""
    out = {}
    for key in raw.scan_iter("handoff:worker:*"):
        fields = {k.decode(): v.decode() for k, v in raw.hgetall(key).items()}
        if "pid" in fields:
            out[int(fields["pid"])] = fields
    return out


def workers_idle_and_back(raw, pids: set[int], since_s: float) -> bool:
    """Every worker of pids has written its health since since_s (epoch seconds), holding
    nothing: back in touch, its late acks sent."""
    health = worker_health(raw)
    for pid in pids:
        fields = health.get(pid)
        if fields is None or float(fields.get("heartbeat_at", 0)) < since_s:
            return False
        if int(fields.get("in_flight", 1)):
            return False
    return True


def test_a_host_cut_off_past_its_leases_loses_nothing_and_duplicates_only_what_it_held(
    net, hclient, record_property
):
    raw = net.server.client()
    sups = {h: supervise(net, h, "hwork=1") for h in WORKERS}
    wait_until(lambda: all(s.live_children() for s in sups.values()), 20, "three workers")
    ids = hclient.enqueue_many("hwork", [{"sleep_s": 0.3} for _ in range(90)])
    wait_until(
        lambda: {h for h, _, _ in records(raw, "executed")} == set(WORKERS) and
        done_count(hclient, "hwork") >= 20,
        20, "every host working, 20 done",
    )  # fmt: skip
    net.cut("c")
    cut_at = time.monotonic()
    held = {i.decode() for i in raw.zrange("handoff:{hwork}:leases", 0, -1)}
    wait_until(lambda: done_count(hclient, "hwork") >= len(ids), 30, "a and b to finish all")
    took_over_s = time.monotonic() - cut_at
    assert time.monotonic() - cut_at > 1.5  # longer than lease_s: its leases expired
    c_pids = {p.pid for p in sups["c"].live_children()}
    net.heal("c")
    healed_at = time.time()
    wait_until(lambda: workers_idle_and_back(raw, c_pids, healed_at), 30,
               "c's workers back in touch, holding nothing")  # fmt: skip
    runs = records(raw, "executed")
    on_c = {task for host, _, task in runs if host == "c"}
    held_by_c = held & on_c
    counts = Counter(task for _, _, task in runs)
    dups = {task for task, n in counts.items() if n > 1}
    assert set(counts) == set(ids)  # nothing lost
    assert dups <= held_by_c, dups - held_by_c  # duplicates only among what c held at the cut
    assert max(counts.values()) <= 2
    assert done_count(hclient, "hwork") == len(ids)  # c's late acks counted nothing
    for task in dups:  # and wrote nothing: the result is the re-claimer's
        assert hclient.result(task, wait_s=1)["host"] in ("a", "b")
    # healed, c claims again
    more = hclient.enqueue_many("hwork", [{"sleep_s": 0.3} for _ in range(24)])
    wait_until(lambda: done_count(hclient, "hwork") >= len(ids) + len(more), 30, "the second batch")
    after = {task for host, _, task in records(raw, "executed") if host == "c"} & set(more)
    assert after, "c took none of the second batch"
    record_property("held_by_c", len(held_by_c))
    record_property("duplicates", len(dups))
    record_property("took_over_s", round(took_over_s, 2))
    print(
        f"c held {len(held_by_c)} at the cut; duplicates {len(dups)} of {len(ids)}; "
        f"a and b done {took_over_s:.2f}s after the cut; c ran {len(after)} of {len(more)}"
    )


def test_a_join_and_a_run_cancel_in_flight_across_a_cut(net, hclient, record_property):
    from handoff.protocol.task import agent_of

    raw = net.server.client()
    agents = "hwork=1,hsplit=1,hthen=1,hlong=1,hfan=1"
    sups = {h: supervise(net, h, agents) for h in WORKERS}
    wait_until(lambda: all(len(s.live_children()) == 5 for s in sups.values()), 30, "workers")
    doomed = hclient.enqueue("hfan", {"fan": 9})  # 9 hlong tasks, each runs until cancelled
    joined = hclient.enqueue("hsplit", {"fan": 20, "sleep_s": 0.6})  # more than a+b hold

    def hosts_of(agent: str) -> set[str]:
        return {h for h, _, t in records(raw, "executed") if agent_of(t) == agent}

    wait_until(lambda: hosts_of("hlong") == set(WORKERS) and "c" in hosts_of("hwork"), 20,
               "the run's tasks and the join's branches running on every host")  # fmt: skip
    net.cut("c")
    cut_at = time.monotonic()
    report = hclient.cancel(doomed, run=True)
    cancelled_at = len(raw.lrange("executed", 0, -1))
    assert report.cancelled >= 9, report.line()
    then = lambda: [r for r in raw.lrange("then", 0, -1) if r.decode().endswith(joined)]  # noqa: E731
    wait_until(then, 30, "the then-task, with c cut off")
    then_s = time.monotonic() - cut_at
    started = [(h, t) for h, _, t in records(raw, "executed") if agent_of(t) == "hlong"]
    on_ab = {t for h, t in started if h != "c"}
    stopped = lambda: {t for _, _, t in records(raw, "stopped")}  # noqa: E731
    wait_until(lambda: on_ab <= stopped(), 10, "the cancel to stop the run's tasks on a and b")
    c_pids = {p.pid for p in sups["c"].live_children()}
    net.heal("c")
    healed = time.monotonic()
    healed_at = time.time()
    on_c = {t for h, t in started if h == "c"}
    wait_until(lambda: {t for h, t in started if h == "c"} <= stopped(), 30,
               "the cancel to reach c's tasks once healed")  # fmt: skip
    reach_s = time.monotonic() - healed
    wait_until(lambda: workers_idle_and_back(raw, c_pids, healed_at), 30, "c's workers idle")
    runs = records(raw, "executed")
    hlong_ids = {t for _, _, t in runs if agent_of(t) == "hlong"}
    late = [(h, t) for h, _, t in runs[cancelled_at:] if agent_of(t) == "hlong"]
    assert all(h == "c" for h, _ in late), late  # after the cancel only the cut host started any
    assert {hclient.status(t) for t in hlong_ids} == {"cancelled"}
    assert len(then()) == 1  # the join's then-task ran once
    assert hclient.result(joined, wait_s=5, follow=True) == 20  # all 20 branches ended
    assert len(on_c) > 0
    branch_runs = Counter(t for _, _, t in runs if agent_of(t) == "hwork")
    twice = [t for t, n in branch_runs.items() if n > 1]
    first_host = {}
    for h, _, t in runs:
        first_host.setdefault(t, h)
    assert len(branch_runs) == 20 and max(branch_runs.values()) <= 2
    assert all(first_host[t] == "c" for t in twice)  # run again only what c held at the cut
    record_property("branches_run_twice", len(twice))
    record_property("then_after_cut_s", round(then_s, 2))
    record_property("cancel_reached_c_after_heal_s", round(reach_s, 2))
    print(
        f"then-task once, {then_s:.2f}s after the cut ({len(twice)} of 20 branches ran "
        f"twice); cancel reached c {reach_s:.2f}s after the heal; {len(late)} hlong started "
        f"on c after the cancel (held at the cut)"
    )


R1_PRODUCER = """
import sys
from handoff.client import Client
from handoff.config import RedisPoolConfig, Settings
from handoff.errors import HandoffError
settings = Settings(redis=RedisPoolConfig(url=sys.argv[1], max_retries=0),
                    enqueue_wait_replicas=1, enqueue_wait_timeout_ms=300)
ok = refused = 0
with Client(settings=settings) as c:
    for _ in range(5):
        try:
            c.enqueue_many("hlong", [{"from": "r1"}] * 10)
            ok += 1
        except HandoffError:
            refused += 1
print(ok, refused)
"""


@pytest.fixture
def sentinel_net(tmp_path, request):
    reason = hostlib.need_root()
    if reason:
        pytest.skip(reason)
    made = hostlib.Hosts(["r1", "r2", "a", "b", "rec"], tmp_path / "hosts")
    request.addfinalizer(made.stop)
    made.server = made.redis("rec")  # what the agents record to: no cut touches it
    made.servers, made.trio = hostlib.sentinel_trio(
        made, ("r1", "r2"), ("r1", "r2", "a"), failover_timeout_ms=1500
    )
    yield made
    made.stop()
    assert made.leftovers() == [], "namespaces or links left behind"


def test_sentinel_primary_cut_off_fails_over_and_wait_1_loses_nothing(
    sentinel_net, record_property
):
    import threading

    from handoff.client import Client
    from handoff.config import RedisPoolConfig, Settings
    from handoff.errors import HandoffError

    net = sentinel_net
    raw = net.server.client()
    url = hostlib.sentinel_url(net.trio)
    old_primary, replica = net.servers
    sups = {h: supervise(net, h, "hwork=1", url=url) for h in ("a", "b")}
    wait_until(lambda: all(s.live_children() for s in sups.values()), 20, "the workers")
    settings = Settings(redis=RedisPoolConfig(url=url), enqueue_wait_replicas=1,
                        enqueue_wait_timeout_ms=500)  # fmt: skip
    acknowledged: list[str] = []
    refused = [0]
    stop = threading.Event()

    def produce() -> None:
        with Client(settings=settings) as producer:
            while not stop.is_set():
                try:
                    acknowledged.extend(producer.enqueue_many("hwork", [{"sleep_s": 0.02}] * 5))
                except HandoffError:
                    refused[0] += 1
                stop.wait(0.05)

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        wait_until(lambda: len(records(raw, "executed")) >= 30, 20, "work on both hosts")
        before_cut = len(acknowledged)
        net.cut("r1")
        cut_at = time.monotonic()
        env = handoff_env(net.server.url)
        r1_run: list = []
        r1_thread = threading.Thread(
            target=lambda: r1_run.append(
                net.run("r1", [sys.executable, "-c", R1_PRODUCER, old_primary.url], 60, env)
            )
        )
        r1_thread.start()
        new = f"{replica.host.addr}:{replica.port}"
        wait_until(lambda: hostlib.primary_by_majority(net.trio) == new, 30, "the failover")
        failover_s = time.monotonic() - cut_at
        mark = len(records(raw, "executed"))
        wait_until(lambda: {h for h, _, _ in records(raw, "executed")[mark:]} == {"a", "b"},
                   30, "workers on both hosts running tasks from the new primary")  # fmt: skip
        follow_s = time.monotonic() - cut_at
        acked_alone = len(acknowledged)  # with its only replica cut off, WAIT 1 refuses
        r1_thread.join(60)
        net.heal("r1")
        with old_primary.client() as c:
            wait_until(lambda: c.info("replication").get("master_link_status") == "up", 30,
                       "the old primary back, as the new one's replica, synced")  # fmt: skip
        resynced = len(acknowledged)
        wait_until(lambda: len(acknowledged) >= resynced + 20, 30, "acknowledgements again")
    finally:
        stop.set()
        producer.join(30)
    (on_r1,) = r1_run
    new_client = Client(settings=Settings(redis=RedisPoolConfig(url=url)))
    try:
        wait_until(lambda: all(new_client.status(t) == "done" for t in acknowledged[-50:]), 30,
                   "the last acknowledged tasks done")  # fmt: skip
        done = {t for _, _, t in records(raw, "executed")}
        lost = [t for t in acknowledged if t not in done]
        assert lost == [], f"{len(lost)} acknowledged tasks never ran"
        ok, r1_refused = (int(x) for x in on_r1.stdout.split())
        assert (ok, r1_refused) == (0, 5), on_r1.stdout + on_r1.stderr[-500:]
        for server in (replica, old_primary):  # what the old primary took after the cut
            with server.client() as c:  # is nowhere: not promoted, and dropped at resync
                assert c.hlen("handoff:{hlong}:tasks") == 0
    finally:
        new_client.close()
    record_property("failover_s", round(failover_s, 2))
    record_property("workers_following_s", round(follow_s, 2))
    record_property("acknowledged", len(acknowledged))
    record_property("refused_batches", refused[0])
    record_property("acknowledged_while_alone", acked_alone - before_cut)
    print(
        f"failover {failover_s:.2f}s after the cut, both hosts' workers on the new primary "
        f"{follow_s:.2f}s after; {len(acknowledged)} acknowledged, 0 lost, {refused[0]} "
        f"batches refused ({acked_alone - before_cut} acknowledged between the cut and the "
        f"heal); the old primary's 5 batches after the cut all refused"
    )


def test_autoscaling_on_three_hosts_hands_a_cut_hosts_share_over_and_back(
    net, hclient, record_property
):
    import threading

    import orjson

    raw = net.server.client()
    key = "handoff:{hwork}:autoscalers"
    lean = {"autoscale_target_wait_s": 0.5, "autoscale_cooldown_s": 2.0}
    sups = {}
    for h in WORKERS:
        env = handoff_env(net.server.url, app=APP, **lean)
        env["HOST_NAME"] = h
        sups[h] = net.handoff(h, ["supervise", "--autoscale", "hwork=0:4"], env, "autoscale")
    maximum = 4 * len(WORKERS)  # the three hosts' MAX together
    sent: list[str] = []
    counts: list[tuple[float, int, int, int]] = []  # (t, a, b, c) every 100 ms, from outside
    stop = threading.Event()

    def produce() -> None:  # 30 tasks/s of 0.2 s: about 3 processes of 4 slots
        while not stop.is_set():
            sent.extend(hclient.enqueue_many("hwork", [{"sleep_s": 0.2}] * 3))
            stop.wait(0.1)

    def sample() -> None:
        while not stop.is_set():
            n = [len(sups[h].live_children()) for h in WORKERS]
            counts.append((time.monotonic(), *n))
            stop.wait(0.1)

    def parts() -> dict[str, dict]:
        return {k.decode(): orjson.loads(v) for k, v in raw.hgetall(key).items()}

    threads = [threading.Thread(target=produce), threading.Thread(target=sample)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(parts()) == 3 and all(counts[-1][1:]) if counts else False,
                   30, "three supervisors with a part and a process each")  # fmt: skip
        settle = time.monotonic() + 3
        totals: list[int] = []  # all three's processes as their parts say, the last second

        def steady() -> bool:
            totals[:] = [*totals[-9:], sum(p["current"] for p in parts().values())]
            return time.monotonic() > settle and len(totals) == 10 and len(set(totals)) == 1

        wait_until(steady, 30, "the three supervisors' counts steady for 1 s", step_s=0.1)
        c_id = next(k for k in parts() if k.endswith(f"-{sups['c'].pid}"))
        before = totals[-1]
        net.cut("c")
        cut_at = time.monotonic()
        wait_until(lambda: c_id not in parts(), 15, "c's part to expire")
        expired_s = time.monotonic() - cut_at

        def carried() -> bool:  # a and b alone keep the queue within the target wait
            stats = hclient.queue_stats(["hwork"])["hwork"]
            return stats["oldest_queued_age_s"] < 0.5 and set(parts()) == live_ab

        live_ab = set(parts())
        wait_until(carried, 15, "a and b to carry c's share of the load")
        handover_s = time.monotonic() - cut_at
        during = max(a + b for t, a, b, _ in counts if t > cut_at)
        mark = len(records(raw, "executed"))
        net.heal("c")
        healed = time.monotonic()
        wait_until(lambda: c_id in parts() and parts()[c_id]["current"] > 0, 15, "c's part back")
        back_s = time.monotonic() - healed
        wait_until(lambda: "c" in {h for h, _, _ in records(raw, "executed")[mark:]}, 15,
                   "c running tasks again")  # fmt: skip
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    wait_until(lambda: done_count(hclient, "hwork") >= len(set(sent)), 60, "the load drained")
    peak = max(a + b + c for _, a, b, c in counts)
    assert peak <= maximum, peak
    assert set(sent) <= {t for _, _, t in records(raw, "executed")}  # nothing lost
    record_property("part_expired_s", round(expired_s, 2))
    record_property("handover_s", round(handover_s, 2))
    record_property("back_s", round(back_s, 2))
    record_property("peak_processes", peak)
    record_property("before_cut", before)
    record_property("a_and_b_during_cut", during)
    assert len(live_ab) == 2
    print(
        f"c's part gone {expired_s:.2f}s after the cut; a and b alone carry the load at "
        f"{handover_s:.2f}s (all three ran {before}, a and b up to {during}); healed, c's "
        f"part back in {back_s:.2f}s; peak {peak} of {maximum} processes ({len(counts)} samples)"
    )
