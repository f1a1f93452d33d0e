"""The monitor: truthful counts, health rules, Prometheus, and flat cost."""

from __future__ import annotations

import signal
import socket
import time
import urllib.request

import orjson
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry
from redis.cluster import RedisCluster

from handoff.config import RedisPoolConfig, Settings
from handoff.connection.manager import RedisManager
from handoff.observe.metrics_export import SnapshotCollector
from handoff.observe.monitor import Monitor
from handoff.observe.view import render
from handoff.protocol.queue import TaskQueue
from harness.procs import HandoffProcess, handoff_env, stat, wait_until

# Every test here runs on one server and on a 3-primary cluster (tests/conftest.py).
BACKENDS = ("server", "cluster")

WORKER_FIELDS = {
    "id", "agent", "pid", "host", "state", "in_flight", "processed", "failed",
    "rss_mb", "cpu_percent", "last_heartbeat_s_ago", "healthy", "pool",
}  # fmt: skip


@pytest.fixture
def watcher(redis_url):
    """A Monitor on this test's server (heartbeat interval as the test workers use)."""
    manager = RedisManager(RedisPoolConfig(url=redis_url), background=False)
    monitor = Monitor(TaskQueue(manager, Settings()))
    monitor.interval_s = 0.2
    yield monitor
    manager.close()


def snapshot_json(redis_url, tmp_path) -> dict:
    env = handoff_env(redis_url, app="apps.probe")
    args = ["monitor", "--once", "--json", "--interval-s", "0.1"]
    proc = HandoffProcess(args, env, tmp_path / "snap.json")
    try:
        assert proc.wait(30) == 0
    finally:
        proc.stop()
    return orjson.loads(proc.output())


def health_exit(redis_url, tmp_path) -> tuple[int, str]:
    env = handoff_env(redis_url, app="apps.probe")
    proc = HandoffProcess(["health"], env, tmp_path / "health.out")
    try:
        return proc.wait(30), proc.output()
    finally:
        proc.stop()


def test_snapshot_counts_match_the_truth(start, client, redis_url, tmp_path):
    client.enqueue_many("probe", [{"n": i, "sleep_s": 0} for i in range(500)])
    client.enqueue_many("flaky", [{"n": i} for i in range(3)])
    start(["supervise", "--agents", "probe=2,flaky=1"])
    wait_until(lambda: stat(client, "probe", "done") == 500, 60, "500 done")
    wait_until(lambda: client.queue_stats(["flaky"])["flaky"]["dead"] == 3, 30, "3 dead")
    snap = wait_until(
        lambda: (s := snapshot_json(redis_url, tmp_path)) and len(s["workers"]) == 3 and s,
        15,
        "three workers in the snapshot",
    )
    probe = snap["agents"]["probe"]
    assert (probe["done"], probe["queued"], probe["running"], probe["dead"]) == (500, 0, 0, 0)
    assert probe["workers"] == 2 and probe["max_concurrent"] == 8 and probe["global_limit"] == 6
    flaky = snap["agents"]["flaky"]
    assert (flaky["dead"], flaky["failed"], flaky["retried"], flaky["done"]) == (3, 6, 3, 0)
    probe_workers = [w for w in snap["workers"] if w["agent"] == "probe"]
    wait_until(
        lambda: (
            sum(
                w["processed"]
                for w in snapshot_json(redis_url, tmp_path)["workers"]
                if w["agent"] == "probe"
            )
            == 500
        ),
        10,
        "workers' processed to add up after a heartbeat",
    )
    for worker in probe_workers:
        assert set(worker) >= WORKER_FIELDS
        assert worker["healthy"] and 0 < worker["rss_mb"] < 200
    assert snap["healthy"] is True
    assert health_exit(redis_url, tmp_path)[0] == 0


def test_killed_worker_turns_unhealthy_then_disappears(start, watcher, redis_url, tmp_path):
    sup = start(["supervise", "--agents", "probe=1"], max_deliveries=10)
    (worker,) = wait_until(lambda: sup.live_children(), 15, "a worker")
    wait_until(lambda: _worker(watcher, worker.pid), 15, "the worker to report")
    sup.signal(signal.SIGSTOP)  # keep the supervisor from replacing it during the check
    try:
        worker.kill()
        bad = wait_until(
            lambda: (w := _worker(watcher, worker.pid)) and not w["healthy"] and w, 5, "unhealthy"
        )
        assert "no heartbeat" in bad["problems"][0]
        code, out = health_exit(redis_url, tmp_path)
        assert code == 1 and "no heartbeat" in out
        wait_until(lambda: _worker(watcher, worker.pid) is None, 10, "the dead worker to vanish")
    finally:
        sup.signal(signal.SIGCONT)


def test_stopped_worker_shows_as_not_making_progress(start, client, watcher):
    sup = start(["supervise", "--agents", "probe=1"])
    (worker,) = wait_until(lambda: sup.live_children(), 15, "a worker")
    wait_until(lambda: _worker(watcher, worker.pid), 15, "the worker to report")
    worker.suspend()
    try:
        client.enqueue_many("probe", [{"n": 1}] * 5)
        bad = wait_until(
            lambda: (w := _worker(watcher, worker.pid)) and not w["healthy"] and w, 5, "stalled"
        )
        assert bad["problems"][0].startswith("not making progress")
    finally:
        worker.resume()
    wait_until(lambda: _worker(watcher, worker.pid)["healthy"], 10, "healthy again")


def _worker(watcher: Monitor, pid: int) -> dict | None:
    for w in watcher.snapshot()["workers"]:
        if w.get("pid") == pid:
            return w
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_prometheus_endpoint_matches_the_json_snapshot(start, client, redis_url, tmp_path):
    client.enqueue_many("probe", [{"n": i, "sleep_s": 0} for i in range(200)])
    for task_id in client.enqueue_many("probe", [{"n": -1}] * 3, delay_s=60):
        client.cancel(task_id)
    late = client.enqueue("probe", {"n": -2}, expires_in_s=0.01)
    expires_at = client.task(late)["task"]["expires_at"]
    wait_until(lambda: time.time() * 1000 > expires_at + 5, 5, "the deadline to pass")
    start(["supervise", "--agents", "probe=1"])
    wait_until(lambda: stat(client, "probe", "done") == 200, 60, "200 done")
    port = _free_port()
    start(["monitor", "--metrics-port", str(port), "--interval-s", "0.2"])

    def scrape() -> dict:
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read()
        except OSError:
            return {}
        values = {}
        for family in text_string_to_metric_families(text.decode()):
            for sample in family.samples:
                values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return values

    values = wait_until(
        lambda: (
            (v := scrape())
            and v.get(("handoff_tasks_done_total", (("agent", "probe"),))) == 200
            and v
        ),
        20,
        "a scrape with the finished tasks",
    )
    snap = snapshot_json(redis_url, tmp_path)
    probe = snap["agents"]["probe"]
    label = (("agent", "probe"),)
    assert values[("handoff_queue_depth", label)] == probe["queued"] == 0
    assert values[("handoff_tasks_running", label)] == probe["running"]
    assert values[("handoff_tasks_waiting", label)] == probe["waiting"] == 0
    assert values[("handoff_tasks_enqueued_total", label)] == probe["enqueued"] == 204
    assert values[("handoff_tasks_cancelled_total", label)] == probe["cancelled"] == 3
    assert values[("handoff_tasks_expired_total", label)] == probe["expired"] == 1
    assert values[("handoff_workers", label)] == probe["workers"] == 1
    assert values[("handoff_healthy", ())] == 1.0
    (worker,) = snap["workers"]
    rss = values[("handoff_worker_rss_bytes", (("agent", "probe"), ("worker", worker["id"])))]
    assert rss > 10 * 1024 * 1024


def _exposed(snapshot: dict) -> dict:
    """The Prometheus text /metrics would serve for this snapshot, parsed."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: snapshot))
    values = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def _waits_shown(watcher: Monitor) -> tuple[dict, list[str], dict]:
    """The `after` agent as the snapshot, the table's row and Prometheus show it."""
    snap = watcher.snapshot()
    table = render(snap).splitlines()
    header = next(line.split() for line in table if line.startswith("agent "))
    row = next(line.split() for line in table if line.startswith("after "))
    label = (("agent", "after"),)
    prom = {
        "waiting": _exposed(snap)[("handoff_tasks_waiting", label)],
        "oldest": _exposed(snap)[("handoff_oldest_wait_age_seconds", label)],
    }
    return snap["agents"]["after"], dict(zip(header, row, strict=False)), prom


def test_waiting_runs_and_the_oldest_wait_show_in_json_table_and_prometheus(
    start, client, watcher, redis_url, tmp_path
):
    """Two waits parked by a real worker (tests/apps/waits.py), half a second apart; each
    signal takes its wait off every view, and the oldest age falls to the next one's."""
    start(["supervise", "--agents", "asker=1,after=1"], app="apps.waits")

    def park(event: str) -> int:
        root = client.enqueue("asker", {"i": 1, "event": event, "timeout_s": 600})
        wait_until(lambda: client.status(root) == "done", 20, "the asker's Wait")
        then = client.result(root)["wait"]["then"]
        wait_until(lambda: client.status(then) == "waiting", 20, "the wait to park")
        return client.task(then)["task"]["wait"]["since"]

    first = park("mon.1")
    wait_until(lambda: _waits_shown(watcher)[0]["oldest_wait_age_s"] >= 0.5, 10, "an old wait")
    second = park("mon.2")
    agent, row, prom = _waits_shown(watcher)
    now_s = time.time()
    assert agent["waiting"] == 2 and row["wait"] == "2" and prom["waiting"] == 2
    assert now_s - first / 1000 - 0.5 < agent["oldest_wait_age_s"] <= now_s - first / 1000
    assert prom["oldest"] == agent["oldest_wait_age_s"] and row["wait_s"].endswith("s")
    assert snapshot_json(redis_url, tmp_path)["agents"]["after"]["waiting"] == 2  # the CLI's

    assert client.signal("mon.1") == 1  # the oldest goes: the age is the second's
    agent, row, prom = _waits_shown(watcher)
    assert agent["waiting"] == 1 and row["wait"] == "1" and prom["waiting"] == 1
    assert agent["oldest_wait_age_s"] <= time.time() - second / 1000
    assert agent["oldest_wait_age_s"] < time.time() - first / 1000 - 0.4
    assert client.signal("mon.2") == 1
    agent, row, prom = _waits_shown(watcher)
    assert agent["waiting"] == 0 and agent["oldest_wait_age_s"] == 0.0
    assert (row["wait"], row["wait_s"], prom["waiting"], prom["oldest"]) == ("0", "-", 0, 0)


def commands_processed(raw_redis) -> tuple[int, int]:
    """Commands the server (every cluster primary) has run, and how many nodes were asked."""
    if isinstance(raw_redis, RedisCluster):
        nodes = [node.redis_connection for node in raw_redis.get_primaries()]
    else:
        nodes = [raw_redis]
    return sum(n.info("stats")["total_commands_processed"] for n in nodes), len(nodes)


@pytest.mark.parametrize("queued", [1, 1_000_000])
def test_snapshot_cost_does_not_grow_with_queued_tasks(watcher, raw_redis, queued):
    # Fill the queue, and parked waits (a fifth as many, in both sets: keys.py), directly in
    # the server: the monitor only ever looks at their sizes and heads, never scans them.
    # In steps of 50,000: one script of a million ZADDs blocks its node past the cluster's
    # node timeout (2 s) on a busy machine, and the cluster calls itself down.
    fill = """for i = ARGV[1], ARGV[2] do
      redis.call('ZADD', KEYS[1], i, 'probe.' .. i)
      if i % 5 == 1 then
        redis.call('ZADD', KEYS[2], '+inf', 'probe.w' .. i)
        redis.call('ZADD', KEYS[3], ARGV[3] + i, 'probe.w' .. i)
      end
    end"""
    keys = ["handoff:{probe}:queue", "handoff:{probe}:waiting", "handoff:{probe}:waiting_since"]
    parked_at = int(time.time() * 1000) - 60_000
    for first in range(1, queued + 1, 50_000):
        last = min(queued, first + 49_999)
        raw_redis.eval(fill, 3, *keys, first, last, parked_at)
    raw_redis.sadd("handoff:agents", "probe")
    watcher.snapshot()  # warm: scripts, connections
    before, nodes = commands_processed(raw_redis)
    snap = watcher.snapshot()
    commands = commands_processed(raw_redis)[0] - before - nodes  # minus our INFOs
    assert "probe" in snap["agents"], snap  # else the snapshot says what failed
    probe = snap["agents"]["probe"]
    assert probe["queued"] == queued and probe["waiting"] == max(1, queued // 5)
    assert 60 <= probe["oldest_wait_age_s"] < 120
    # 2 registry reads + 12 per agent (6 queue figures, its limits, its groups ready and
    # waiting, its waits' count and oldest, the autoscalers), and the server's memory (one
    # INFO; on a cluster one per primary): the same for 1 and 1,000,000.
    assert commands == 14 + (nodes if isinstance(raw_redis, RedisCluster) else 1)


def test_the_snapshot_names_the_deployment_and_on_a_cluster_each_agents_node(
    watcher, raw_redis, backend
):
    raw_redis.sadd("handoff:agents", "probe")
    snap = watcher.snapshot()
    assert snap["redis"]["ok"], snap
    assert snap["redis"]["mode"] == backend
    view = render(snap)
    if backend == "cluster":
        owner = raw_redis.get_node_from_key("handoff:{probe}:queue").name
        assert snap["agents"]["probe"]["node"] == owner
        assert view.startswith("handoff monitor - healthy (cluster)") and owner in view
        nodes = snap["redis"]["nodes"]
        assert len(nodes) == 3 and all(n["ok"] and n["used_memory_mb"] > 0 for n in nodes)
        assert [n["agents"] for n in nodes if n["node"] == owner] == [["probe"]]
        assert sum(len(n["agents"]) for n in nodes) == 1
        assert "primary" in view and "mem_mb" in view
    else:
        assert "node" not in snap["agents"]["probe"] and "nodes" not in snap["redis"]
        assert view.startswith("handoff monitor - healthy\n") and " node" not in view


def test_the_monitor_logs_each_change_once_not_each_tick(caplog):
    from handoff.observe.monitor_loop import ChangeLog

    def snap(redis_ok=True, workers=(), nodes=None):
        redis_view = {"ok": redis_ok, "error": "refused"}
        if nodes is not None:
            redis_view["nodes"] = [
                {"node": name, "ok": ok, "error": "refused"} for name, ok in nodes.items()
            ]
        views = [{"id": w, "healthy": True, "problems": []} for w in workers]
        return {"redis": redis_view, "workers": views}

    changes = ChangeLog()
    ticks = [
        snap(workers=["w1"], nodes={"n1": True, "n2": True}),
        snap(redis_ok=False),
        snap(redis_ok=False),  # still down: nothing new to say
        snap(workers=["w1"], nodes={"n1": True, "n2": False}),
        snap(workers=["w1"], nodes={"n1": True, "n2": False}),
        snap(workers=["w1"], nodes={"n1": True, "n2": True}),
    ]
    with caplog.at_level("INFO", logger="handoff.observe.monitor"):
        for tick in ticks:
            changes.note(tick)
    said = [r.getMessage() for r in caplog.records]
    assert said == [
        "worker w1 is gone",
        "Redis unreachable: refused",
        "Redis reachable again",
        "cluster primary n2 unreachable: refused",
        "cluster primary n2 reachable again",
    ]


def test_monitor_once_measures_the_rate_between_two_snapshots(start, client, redis_url, tmp_path):
    """`monitor --once` used to print 0.0 tasks/s (one sample has no rate): it takes two
    snapshots --interval-s apart and says what was done between them."""
    start(["supervise", "--agents", "probe=1"])
    ids = client.enqueue_many("probe", [{"n": i, "sleep_s": 0.005} for i in range(3000)])
    wait_until(lambda: client.status(ids[0]) == "done", 10, "the first task done")
    env = handoff_env(redis_url, app="apps.probe")
    proc = HandoffProcess(["monitor", "--once", "--json"], env, tmp_path / "rate.json")
    try:
        assert proc.wait(30) == 0
    finally:
        proc.stop()
    assert orjson.loads(proc.output())["agents"]["probe"]["throughput_per_s"] > 0
