"""What only a cluster can do to handoff: agents on different nodes, slots that move.

The protocol, kill-9, bad-input, client, CLI and monitor tests run on a cluster too
(BACKENDS in those modules); these are the cluster's own scenarios, with real worker
processes against this xdist worker's 3-primary cluster (harness/topologies.py).
"""

from __future__ import annotations

import signal
import threading

import pytest
from redis.crc import key_slot

from handoff.errors import RedisUnavailable
from handoff.protocol.keys import Keys
from handoff.protocol.task import derived_task_id
from harness.failover import kill_a_primary_under_load, record
from harness.procs import executions, stat, wait_until
from harness.topologies import free_tcp_port, start_cluster

BACKENDS = ("cluster",)
KEYS = Keys()


def slot_of(agent: str) -> int:
    return key_slot(KEYS.agent(agent).queue.encode())


def owner(cluster, agent: str) -> int:
    return cluster.owner_port(slot_of(agent))


def redirections(cluster) -> int:
    """MOVED, ASK and TRYAGAIN replies the primaries have sent so far."""
    total = 0
    for primary in cluster.primaries:
        node = cluster.node_client(primary.port)
        stats = node.info("errorstats")
        node.close()
        total += sum(stats.get(f"errorstat_{e}", {}).get("count", 0) for e in REDIRECTS)
    return total


REDIRECTS = ("MOVED", "ASK", "TRYAGAIN")


def put_on_another_node(cluster, agent: str, other: str) -> int:
    """Move agent's slot off other's node when they share one; returns agent's node port."""
    if owner(cluster, agent) == owner(cluster, other):
        target = next(p.port for p in cluster.primaries if p.port != owner(cluster, other))
        cluster.migrate_slot(slot_of(agent), target)
    assert owner(cluster, agent) != owner(cluster, other)
    return owner(cluster, agent)


def test_a_worker_dying_between_the_childs_enqueue_and_the_parents_ack_repeats_nothing(
    backend, redis_cluster, raw_redis, client, start
):
    """relay and probe live on different nodes, so the child's enqueue and the parent's
    ack are two calls on two servers. Freeze writes on the parent's node once the
    handler runs: the child lands, the ack cannot, and the worker is killed right then."""
    relay_port = put_on_another_node(redis_cluster, "relay", "probe")
    parent_id = client.enqueue("relay", {"sleep_s": 1.0})
    child_id = derived_task_id("probe", parent_id, "0")
    # The paused node fails the worker's own writes to it (lease renewals, its inbox): the
    # breaker, which would then refuse the child's enqueue too, is not what this tests.
    first = start(["worker", "relay"], lease_s=2, redis_breaker_failure_threshold=10_000)
    wait_until(lambda: len(executions(raw_redis)) == 1, 15, "the relay handler to start")
    relay_node = redis_cluster.node_client(relay_port)
    # Pause once the main thread has claimed all there is and the waker waits in Redis:
    # paused sooner, the main thread's next claim (a write on this node) blocked it, and
    # the handler's outcome, its child with it, was never sent (seen on a loaded machine).
    wait_until(lambda: _waker_blocked(relay_node), 15, "the waker to wait for work")
    relay_node.execute_command("CLIENT", "PAUSE", 30_000, "WRITE")
    try:
        wait_until(lambda: raw_redis.zcard(KEYS.agent("probe").queue) == 1, 15, "the child")
        first.signal(signal.SIGKILL)
        first.wait(10)
    finally:
        relay_node.execute_command("CLIENT", "UNPAUSE")
        relay_node.close()
    assert client.status(parent_id) == "running"  # leased by the dead worker, not acked

    start(["supervise", "--agents", "relay=1,probe=1"], lease_s=2)
    wait_until(lambda: client.status(child_id) == "done", 30, "the child to run")
    wait_until(lambda: client.status(parent_id) == "done", 30, "the parent to be redone")
    ran = [task_id for _, task_id in executions(raw_redis)]
    assert ran.count(parent_id) == 2  # the parent ran again after the crash ...
    assert ran.count(child_id) == 1  # ... and its child, deduplicated by id, once
    assert stat(client, "probe", "enqueued") == 1
    assert stat(client, "probe", "done") == 1
    assert stat(client, "relay", "done") == 1


def _waker_blocked(node) -> bool:
    """Two clients of the node are blocked in BLPOP: the worker's inbox (always) and its
    waker (once the main thread has claimed all there is and handed the wait over)."""
    blocked = [c for c in node.client_list() if c.get("cmd") == "blpop" and "b" in c["flags"]]
    return len(blocked) >= 2


@pytest.mark.timeout(120)
def test_resharding_a_busy_agents_slot_loses_nothing_and_shows_no_cluster_errors(
    backend, redis_cluster, raw_redis, client, start, record_property
):
    """Move probe's slot to another primary (MIGRATING/IMPORTING, MIGRATE in batches,
    SETSLOT NODE) while producers enqueue and workers claim and ack on it."""
    total, batch = 4000, 50
    sup = start(["supervise", "--agents", "probe=2"])
    produced: list[str] = []
    errors: list[BaseException] = []

    def produce() -> None:
        try:
            for _ in range(total // batch):
                produced.extend(client.enqueue_many("probe", [{"sleep_s": 0}] * batch))
        except BaseException as e:
            errors.append(e)

    producer = threading.Thread(target=produce)
    producer.start()
    wait_until(lambda: stat(client, "probe", "done") >= 500, 30, "the workers to get going")
    source = owner(redis_cluster, "probe")
    target = next(p.port for p in redis_cluster.primaries if p.port != source)
    redirects_before = redirections(redis_cluster)
    moved = redis_cluster.migrate_slot(slot_of("probe"), target)
    producer.join(60)
    assert moved > 0 and owner(redis_cluster, "probe") == target
    # The servers did turn calls away while the slot moved: the path under test was taken.
    redirected = redirections(redis_cluster) - redirects_before
    assert redirected > 0
    record_property("keys_moved", moved)
    record_property("calls_redirected", redirected)
    assert errors == []
    wait_until(lambda: stat(client, "probe", "done") == total, 60, "every task to finish")
    assert len(produced) == total
    assert stat(client, "probe", "enqueued") == total
    log = sup.output()
    for sign in ("CROSSSLOT", "TRYAGAIN", "MOVED", "ASK", "undeclared", "ERROR"):
        assert sign not in log, log[-3000:]


@pytest.fixture
def replicated_cluster(tmp_path):
    """A cluster of its own, 3 primaries each with a replica: this test kills one."""
    cluster = start_cluster(tmp_path / "replicated", replicas_per_primary=1)
    yield cluster
    cluster.stop()


@pytest.mark.timeout(180)
def test_killing_the_primary_of_a_busy_agent_loses_no_enqueue_acknowledged_with_wait_1(
    backend, replicated_cluster, start, record_property
):
    """The cluster promotes the dead primary's replica; workers and producers follow the
    slot to it on their own, and every enqueue WAIT 1 confirmed is done in the end."""
    cluster = replicated_cluster
    victim = cluster.owner_port(slot_of("probe"))
    run = kill_a_primary_under_load(
        cluster.url,
        start,
        kill=lambda: next(n for n in cluster.nodes if n.port == victim).stop(sig_kill=True),
        promoted=lambda: wait_until(
            lambda: cluster.owner_port(slot_of("probe")) != victim, 30, "a promotion"
        ),
    )
    assert run.acknowledged >= 300
    record(run, record_property)


def test_a_manager_built_before_its_cluster_is_up_says_so_in_one_line(make_manager):
    """No node answers yet: building the manager still works (a worker starts and waits),
    and each call fails as a retriable RedisUnavailable naming the seeds, not a trace."""
    url = f"redis+cluster://:hunter2@127.0.0.1:{free_tcp_port()}"
    manager = make_manager(url, max_retries=1, min_idle_conns=0)
    with pytest.raises(RedisUnavailable) as caught:
        manager.execute(lambda c: c.ping())
    message = str(caught.value)
    assert "\n" not in message and "hunter2" not in message
    assert "no cluster node reachable" in message
