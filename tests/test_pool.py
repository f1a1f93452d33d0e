"""The Redis pool manager against a real server: sizing, lifecycle, fork safety, ops, secrets.

Every figure that matters is read back from the server (CLIENT LIST, INFO), each test on a
server of its own (other tests in this process may leave clients on the shared one).
Intervals are short and every wait is a condition polled against a monotonic deadline.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis

from handoff.config import RedisPoolConfig
from handoff.connection import operations as ops
from handoff.connection.embedded_server import ServerProcess
from handoff.connection.manager import RedisManager, get_manager, reset_manager
from handoff.errors import (
    AuthenticationFailed,
    PoolExhausted,
    RedisCommandError,
    RedisUnavailable,
    WrongProcess,
)
from harness.faultproxy import FaultProxy
from harness.procs import stop_process, wait_until

QUIET = {"health_check_interval_s": 60.0, "idle_check_freq_s": 60.0}


def our_client_ids(raw: redis.Redis, pid: int | None = None) -> set[int]:
    """Server-side ids of the connections a manager in process pid opened (by client name)."""
    name = f"handoff-{pid or os.getpid()}"
    return {int(c["id"]) for c in raw.client_list() if c["name"] == name}


def round_trips(raw: redis.Redis, fn: Callable[[], object]) -> int:
    """Socket reads the server made while fn ran (one per round trip for small requests)."""
    before = raw.info("stats")["total_reads_processed"]
    fn()
    return raw.info("stats")["total_reads_processed"] - before - 1  # minus our own INFO


MANAGER_DEFAULTS = {**QUIET, "min_idle_conns": 0}


def hammer(raw: redis.Redis, threads: int, ops: int, call: Callable[[], object]) -> list[int]:
    """call() ops times from each of threads threads at once; returns how many connections
    of ours the server saw, sampled all along."""
    done = threading.Event()
    seen: list[int] = []

    def sample() -> None:
        while not done.is_set():
            seen.append(len(our_client_ids(raw)))

    def work() -> None:
        for _ in range(ops):
            call()

    sampler = threading.Thread(target=sample)
    sampler.start()
    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    done.set()
    sampler.join()
    return seen


@pytest.fixture
def server(private_server) -> ServerProcess:
    return private_server


@pytest.fixture
def raw(server) -> Iterator[redis.Redis]:
    """A plain redis-py client on the test's server, for assertions."""
    with server.client() as client:
        yield client


# -- sizing -----------------------------------------------------------------------------------


def test_min_idle_conns_are_open_on_the_server_as_soon_as_the_manager_is_built(
    server, raw, make_manager
):
    manager = make_manager(server.url, pool_size=6, min_idle_conns=3)

    assert len(our_client_ids(raw)) == 3
    stats = manager.get_pool_stats()
    assert (stats["total_conns"], stats["idle_conns"], stats["misses"]) == (3, 3, 0)


def test_a_manager_built_while_the_server_is_down_says_so_and_warms_up_when_it_returns(
    server, raw, make_manager, caplog
):
    server.stop()
    caplog.set_level("INFO", logger="handoff.connection.manager")  # not an error: INFO
    manager = make_manager(
        server.url, min_idle_conns=2, health_check_interval_s=0.05, idle_check_freq_s=0.05
    )

    assert not manager.is_healthy()
    assert "ConnectionError" in manager.get_health().last_error
    assert "could not warm the Redis pool" in caplog.text

    server.start()
    with server.client() as check:
        wait_until(lambda: len(our_client_ids(check)) >= 2, 5.0, "the pool to warm up")
    wait_until(manager.is_healthy, 5.0, "a health ping to succeed")


def test_many_threads_never_open_more_connections_than_pool_size(server, raw, make_manager):
    pool_size, threads, ops = 4, 24, 8
    with FaultProxy(("127.0.0.1", server.port)) as proxy:
        proxy.delay(3)  # every op holds its connection for a while: callers must queue
        manager = make_manager(proxy.url, pool_size=pool_size, pool_timeout_s=10.0)
        seen = hammer(raw, threads, ops, lambda: manager.execute(lambda c: c.incr("hammered")))

    assert raw.get("hammered") == str(threads * ops).encode()
    assert max(seen) <= pool_size
    assert len(manager.pool._connections) == pool_size  # the queue really filled the pool
    metrics = manager.get_detailed_metrics()
    assert metrics.timeouts == 0
    assert metrics.misses == pool_size
    assert metrics.hits == threads * ops - pool_size


def test_a_caller_waiting_past_pool_timeout_gets_pool_exhausted_and_it_is_counted(
    server, raw, make_manager
):
    manager = make_manager(server.url, pool_size=1, pool_timeout_s=0.2)
    holder = threading.Thread(
        target=lambda: manager.execute(lambda c: c.blpop(["release-me"], timeout=10))
    )
    holder.start()
    wait_until(lambda: raw.info("clients")["blocked_clients"] == 1, 5.0, "the only conn to block")

    with pytest.raises(PoolExhausted, match=r"pool_timeout_s=0\.2 \(pool_size=1\)"):
        manager.execute(lambda c: c.get("anything"))

    metrics = manager.get_detailed_metrics()
    assert metrics.timeouts == 1  # one wait: exhaustion is never retried
    assert metrics.failed_requests == 1
    assert manager.is_healthy() and manager.breaker.state == "closed"  # the server is fine
    raw.rpush("release-me", "x")
    holder.join(timeout=5)
    assert manager.execute(lambda c: c.get("anything")) is None


# -- lifecycle: rotation, reaping, warming ----------------------------------------------------


def test_a_connection_older_than_max_conn_age_is_replaced_after_use(server, raw, make_manager):
    manager = make_manager(server.url, pool_size=1, max_conn_age_s=0.2)
    first = manager.execute(lambda c: c.client_id())

    wait_until(
        lambda: manager.execute(lambda c: c.client_id()) != first, 5.0, "a new connection (new id)"
    )

    ids = our_client_ids(raw)
    assert first not in ids and len(ids) == 1  # closed, not leaked
    assert manager.get_detailed_metrics().stale_conns >= 1


def test_idle_connections_older_than_max_conn_age_are_rotated_by_the_maintenance_thread(
    server, raw, make_manager
):
    manager = make_manager(
        server.url, pool_size=3, min_idle_conns=2, max_conn_age_s=0.5, idle_check_freq_s=0.05
    )
    warm = our_client_ids(raw)
    assert len(warm) == 2

    wait_until(
        lambda: (ids := our_client_ids(raw)).isdisjoint(warm) and len(ids) == 2,
        5.0,
        "two fresh idle connections in place of the old ones",
    )
    assert manager.get_detailed_metrics().stale_conns >= 2


def test_idle_connections_past_idle_timeout_are_closed_down_to_min_idle_conns(
    server, raw, make_manager
):
    manager = make_manager(
        server.url, pool_size=6, min_idle_conns=2, idle_timeout_s=0.2, idle_check_freq_s=0.1
    )
    taken = [manager.pool.get_connection() for _ in range(6)]  # a burst opens all six
    for connection in taken:
        manager.pool.release(connection)
    assert len(our_client_ids(raw)) == 6

    wait_until(lambda: len(our_client_ids(raw)) == 2, 5.0, "the reaper to close four")

    assert manager.pool.reap_idle() == 0  # and never below min_idle_conns
    stats = manager.get_pool_stats()
    assert (stats["total_conns"], stats["idle_conns"], stats["stale_conns"]) == (2, 2, 4)
    assert manager.execute(lambda c: c.ping()) is True


def test_warming_never_waits_for_a_busy_pool_nor_counts_its_own_checkouts(
    server, raw, make_manager
):
    manager = make_manager(server.url, pool_size=2, min_idle_conns=2, pool_timeout_s=5.0)
    busy = [manager.pool.get_connection() for _ in range(2)]
    for connection in busy:
        connection.disconnect()  # as if closed by the server or by rotation

    assert manager.pool.warm() == 0  # every slot is checked out: nothing to do, no wait
    for connection in busy:
        manager.pool.release(connection)
    assert manager.pool.warm() == 2
    assert len(our_client_ids(raw)) == 2
    metrics = manager.get_detailed_metrics()
    assert (metrics.timeouts, metrics.idle_conns) == (0, 2)


# -- fork -------------------------------------------------------------------------------------


def _child_report(parent: RedisManager, config: RedisPoolConfig) -> dict:
    """Runs in: the forked child. Everything it learns goes back to the parent as JSON."""
    report: dict = {}
    try:
        parent.execute(lambda c: c.client_id())
        report["parent_manager"] = "worked"
    except WrongProcess as e:
        report["parent_manager"] = f"WrongProcess: {e}"
    try:
        parent.client  # noqa: B018
        report["parent_client"] = "worked"
    except WrongProcess:
        report["parent_client"] = "WrongProcess"
    parent.close()  # must not shut down the parent's sockets
    child = get_manager(config)
    report["new_manager"] = child is not parent and child.pid == os.getpid()
    report["same_again"] = get_manager(config) is child
    report["child_id"] = child.execute(lambda c: c.client_id())
    report["child_ids"] = sorted(
        int(c["id"])
        for c in child.execute(lambda c: c.client_list())
        if c["name"] == f"handoff-{os.getpid()}"
    )
    reset_manager()
    return report


def test_a_forked_child_never_uses_the_parents_sockets_and_the_parents_still_work(server, raw):
    config = RedisPoolConfig(url=server.url, pool_size=3, min_idle_conns=2, **QUIET)
    reset_manager()  # another test in this process may have left one
    parent = get_manager(config)
    try:
        parent_id = parent.execute(lambda c: c.client_id())
        parent_ids = our_client_ids(raw)
        assert parent_id in parent_ids and len(parent_ids) == 2
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child never returns into pytest's stack
            code = 1
            try:
                os.close(read_end)
                os.write(write_end, json.dumps(_child_report(parent, config)).encode())
                code = 0
            finally:
                os._exit(code)
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            report = json.loads(pipe.read() or b"{}")
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0

        assert report["parent_manager"].startswith(
            f"WrongProcess: RedisManager built in pid {os.getpid()}"
        )
        assert report["parent_client"] == "WrongProcess"
        assert report["new_manager"] and report["same_again"]
        assert report["child_id"] not in parent_ids
        assert report["child_ids"] and parent_ids.isdisjoint(report["child_ids"])

        # The parent's sockets survived the child (and the child's close()): same connection.
        misses = parent.get_detailed_metrics().misses
        assert parent.execute(lambda c: c.client_id()) == parent_id
        assert parent.get_detailed_metrics().misses == misses
        assert our_client_ids(raw) == parent_ids
    finally:
        reset_manager()


def test_get_manager_is_one_per_process_and_reset_closes_it(server, raw):
    config = RedisPoolConfig(url=server.url, min_idle_conns=1, **QUIET)
    reset_manager()  # another test in this process may have left one
    try:
        first = get_manager(config)
        assert get_manager() is first  # no config needed once built
        assert len(our_client_ids(raw)) == 1
        reset_manager()
        assert our_client_ids(raw) == set()
        assert get_manager(config) is not first
    finally:
        reset_manager()


# -- the pool manager's operations ------------------------------------------------------------


def test_set_with_expiry_sets_value_and_ttl(server, raw, make_manager):
    manager = make_manager(server.url)

    assert ops.set_with_expiry(manager, "session:1", b"payload", 30) is True
    assert ops.set_with_expiry(manager, "session:2", "short", 0.25) is True

    assert raw.get("session:1") == b"payload"
    assert 29_000 < raw.pttl("session:1") <= 30_000
    assert 0 < raw.pttl("session:2") <= 250


def test_zadd_batch_adds_every_member_in_one_command(server, raw, make_manager):
    manager = make_manager(server.url, min_idle_conns=1)
    members = {f"task-{i}": float(i) for i in range(100)}
    raw.config_resetstat()

    assert round_trips(raw, lambda: ops.zadd_batch(manager, "queue", members)) == 1
    assert ops.zadd_batch(manager, "queue", {"task-0": 5.0}) == 0  # an update adds nothing

    assert raw.info("commandstats")["cmdstat_zadd"]["calls"] == 2
    assert raw.zcard("queue") == 100
    assert raw.zscore("queue", "task-0") == 5.0


def test_zpopmin_batch_pops_from_several_queues_in_one_round_trip(server, raw, make_manager):
    manager = make_manager(server.url, min_idle_conns=1)
    raw.zadd("q:a", {"a1": 1, "a2": 2, "a3": 3})
    raw.zadd("q:b", {"b1": 5})
    popped: dict = {}

    trips = round_trips(
        raw, lambda: popped.update(ops.zpopmin_batch(manager, ["q:a", "q:b", "q:empty"], 2))
    )

    assert trips == 1
    assert popped == {"q:a": [(b"a1", 1.0), (b"a2", 2.0)], "q:b": [(b"b1", 5.0)], "q:empty": []}
    assert raw.zrange("q:a", 0, -1) == [b"a3"]
    metrics = manager.get_detailed_metrics()
    assert (metrics.pipeline_hits, metrics.batch_operations) == (1, 3)


def test_execute_batch_runs_many_operations_in_one_round_trip(server, raw, make_manager):
    manager = make_manager(server.url, min_idle_conns=1)
    operations = [lambda p, i=i: p.set(f"k:{i}", i) for i in range(40)]
    operations += [lambda p: p.incrby("counter", 5), lambda p: p.hset("h", "f", "v")]
    replies: list = []
    raw.config_resetstat()

    assert round_trips(raw, lambda: replies.extend(manager.execute_batch(operations))) == 1

    assert replies == [True] * 40 + [5, 1]
    stats = raw.info("commandstats")
    assert stats["cmdstat_set"]["calls"] == 40
    assert "cmdstat_multi" not in stats  # transaction=False: a plain pipeline
    metrics = manager.get_detailed_metrics()
    assert (metrics.pipeline_hits, metrics.batch_operations) == (1, 42)


def test_cleanup_expired_keys_scans_and_unlinks_only_idle_matching_keys(server, raw, make_manager):
    manager = make_manager(server.url)
    raw.set("template", "v")
    dumped = raw.dump("template")
    raw.delete("template")
    for i in range(30):  # RESTORE ... IDLETIME: keys untouched for 1000 s, without waiting
        raw.restore(f"cache:old:{i}", 0, dumped, idletime=1000)
        raw.restore(f"other:old:{i}", 0, dumped, idletime=1000)
        raw.set(f"cache:new:{i}", "v")
    raw.config_resetstat()

    removed = ops.cleanup_expired_keys(manager, ["cache:*"], idle_longer_than_s=500, scan_count=7)

    assert removed == 30
    left = {k.decode() for k in raw.scan_iter("*")}
    assert left == {f"cache:new:{i}" for i in range(30)} | {f"other:old:{i}" for i in range(30)}
    stats = raw.info("commandstats")
    assert "cmdstat_keys" not in stats
    assert stats["cmdstat_scan"]["calls"] > 1  # walked in bounded pages
    assert stats["cmdstat_unlink"]["calls"] >= 1


# -- health and metrics -----------------------------------------------------------------------


def test_health_and_metrics_report_every_field(server, make_manager):
    manager = make_manager(server.url, pool_size=7, min_idle_conns=1)
    assert manager.get_health().last_successful_ping == 0.0

    ops.set_with_expiry(manager, "k", "v", 10)
    manager.execute_batch([lambda p: p.get("k"), lambda p: p.get("k"), lambda p: p.exists("k")])
    with pytest.raises(RedisCommandError, match="unknown command"):
        manager.execute(lambda c: c.execute_command("NO-SUCH-COMMAND"))
    assert manager.ping() is True
    manager.sample_memory()

    health = manager.get_health()
    assert health.is_healthy and manager.is_healthy()
    assert health.last_health_check > 0 and health.last_successful_ping > 0
    assert (health.consecutive_failures, health.last_error) == (0, "")
    assert set(health.as_dict()) == {
        "is_healthy", "last_health_check", "last_successful_ping",
        "consecutive_failures", "last_error",
    }  # fmt: skip
    m = manager.get_detailed_metrics()
    assert (m.total_conns, m.idle_conns, m.stale_conns, m.timeouts) == (1, 1, 0, 0)
    assert (m.hits, m.misses) == (5, 0)
    assert (m.total_requests, m.failed_requests) == (5, 1)
    assert (m.pipeline_hits, m.batch_operations) == (1, 3)
    assert 0 < m.avg_latency_ms <= m.max_latency_ms
    assert m.memory_usage_bytes > 0
    assert manager.get_pool_stats() == {
        "total_conns": 1, "idle_conns": 1, "stale_conns": 0, "hits": 5, "misses": 0,
        "timeouts": 0, "pool_size": 7, "breaker": "closed",
    }  # fmt: skip


def test_the_health_checker_samples_memory_in_the_background(server, make_manager):
    manager = make_manager(server.url, health_check_interval_s=0.05)

    wait_until(
        lambda: manager.get_detailed_metrics().memory_usage_bytes > 0, 5.0, "a memory sample"
    )
    assert manager.get_health().last_successful_ping > 0


def test_a_failed_health_ping_counts_one_failure(server, make_manager):
    manager = make_manager(server.url, breaker_failure_threshold=100)
    server.stop()

    assert manager.ping() is False
    assert manager.ping() is False

    health = manager.get_health()
    assert not health.is_healthy
    assert health.consecutive_failures == 2
    assert "ConnectionError" in health.last_error


# -- configuration and secrets ----------------------------------------------------------------


def test_the_configs_password_and_db_override_the_urls(server, make_manager):
    secret = f"pw-{uuid.uuid4().hex}"
    with server.client() as admin:
        admin.config_set("requirepass", secret)
    url = f"redis://:not-the-password@127.0.0.1:{server.port}/0"
    manager = make_manager(url, password=secret, db=2)

    ops.set_with_expiry(manager, "where", "db2", 30)

    with redis.Redis(port=server.port, password=secret, db=2) as check:
        assert check.get("where") == b"db2"


def test_a_password_in_the_url_never_reaches_logs_errors_or_reprs(server, make_manager, caplog):
    caplog.set_level(logging.DEBUG)
    secret = f"pw-{uuid.uuid4().hex}"
    with server.client() as admin:
        admin.config_set("requirepass", secret)
    base = f"127.0.0.1:{server.port}/0"
    manager = make_manager(
        f"redis://:{secret}@{base}",
        max_retries=1,
        min_retry_backoff_ms=1,
        max_retry_backoff_ms=2,
        health_check_interval_s=0.05,
    )
    assert ops.set_with_expiry(manager, "k", "v", 30) is True
    texts = [
        repr(manager), str(manager), repr(manager.config), str(manager.config),
        repr(manager.client), repr(manager.pool), str(manager.get_pool_stats()),
    ]  # fmt: skip
    assert "***" in repr(manager) and "***" in repr(manager.config)

    wrong = make_manager(f"redis://:{secret}-wrong@{base}", min_idle_conns=1)  # warm-up logs
    with pytest.raises(AuthenticationFailed) as bad_auth:
        wrong.execute(lambda c: c.ping())
    texts.append("".join(traceback.format_exception(bad_auth.value)))

    server.stop()
    with pytest.raises(RedisUnavailable) as down:
        manager.execute(lambda c: c.get("k"))
    texts.append("".join(traceback.format_exception(down.value)))
    wait_until(lambda: manager.get_health().consecutive_failures >= 4, 5.0, "health pings to fail")
    texts += [str(manager.get_health()), str(wrong.get_health()), repr(manager)]

    assert any(r.levelno == logging.WARNING for r in caplog.records)  # the warm-up failure
    texts += [caplog.text] + [r.getMessage() for r in caplog.records]
    for text in texts:
        assert secret not in text


def test_single_commands_use_a_few_lane_connections_and_the_pool_for_the_rest(
    server, raw, make_manager
):
    """The lane (lane.py) keeps a quarter of the pool for one-command calls; callers that
    find it busy use the pool. Together they never exceed pool_size, and nothing is lost."""
    pool_size, threads, ops = 8, 12, 8
    with FaultProxy(("127.0.0.1", server.port)) as proxy:
        proxy.delay(3)  # calls overlap: some find the lane busy
        manager = make_manager(proxy.url, pool_size=pool_size, pool_timeout_s=10.0)
        seen = hammer(
            raw, threads, ops, lambda: manager.execute(lambda c: manager.send(c, "INCR", "laned"))
        )
    assert raw.get("laned") == str(threads * ops).encode()
    assert max(seen) <= pool_size
    assert manager._lane._taken == pool_size // 4  # both lane connections were needed
    assert manager.get_detailed_metrics().hits > 0  # and the pool served the overflow


def test_a_lane_connection_reconnects_after_the_server_restarts(server, make_manager):
    manager = make_manager(server.url, pool_size=4, max_retries=5)
    assert manager.execute(lambda c: manager.send(c, "SET", "k", "1")) == b"OK"
    server.stop()
    server.start()
    assert manager.execute(lambda c: manager.send(c, "GET", "k")) in (b"1", None)
    assert manager.execute(lambda c: manager.send(c, "SET", "k", "2")) == b"OK"


@pytest.mark.parametrize("pool_size", [1, 8], ids=["pool", "lane"])
def test_commands_sent_in_one_packet_raise_an_error_reply_after_reading_every_reply(
    server, raw, make_manager, pool_size
):
    """send_all (an idle worker's pop and the claim behind it), on a pooled connection (no
    lane in a pool of 1) or a lane one: replies in order; an error reply is raised once
    all are read, so the connection is left clean for the next call."""
    manager = make_manager(server.url, pool_size=pool_size)
    raw.rpush("tokens", "t")
    replies = manager.execute(
        lambda c: manager.send_all(c, [("BLPOP", "tokens", 1), ("INCR", "after")])
    )
    assert replies == [[b"tokens", b"t"], 1]
    raw.set("text", "not a number")
    with pytest.raises(RedisCommandError, match="not an integer"):
        manager.execute(
            lambda c: manager.send_all(c, [("INCR", "text"), ("INCR", "after")]), retry=False
        )
    assert raw.get("after") == b"2"  # the command behind the error ran
    assert manager.execute(lambda c: manager.send_all(c, [("GET", "after")])) == [b"2"]


# -- kernel-kept socket timeouts ------------------------------------------------------------


def test_tcp_connections_block_and_the_kernel_times_out_a_read_that_never_answers(
    server, make_manager
):
    """No poll before each send and receive (kernel_timeouts.py): the socket blocks, and a
    reply that never comes still ends after read_timeout_s as a timeout, the connection
    dropped; once the path heals, the next call works on a new one."""
    with FaultProxy(("127.0.0.1", server.port)) as proxy:
        manager = make_manager(
            proxy.url, pool_size=4, read_timeout_s=0.4, write_timeout_s=0.4, max_retries=0
        )
        assert manager.execute(lambda c: manager.send(c, "SET", "k", "1")) == b"OK"
        (connection,) = manager._lane._idle
        assert connection._sock.gettimeout() is None  # blocking: no poll per call
        proxy.blackhole()
        started = time.monotonic()
        with pytest.raises(RedisUnavailable, match="Timeout reading from socket"):
            manager.execute(lambda c: manager.send(c, "GET", "k"))
        assert 0.35 <= time.monotonic() - started < 3
        assert connection._sock is None  # dropped: it may hold half a reply
        proxy.heal()
        assert manager.execute(lambda c: manager.send(c, "GET", "k")) == b"1"


def test_a_send_the_server_never_reads_times_out_as_a_write_timeout(server, make_manager):
    """The server stopped (SIGSTOP): a large value fills the socket buffers, and the send
    ends after write_timeout_s as a timeout rather than blocking for ever."""
    manager = make_manager(
        server.url, pool_size=4, read_timeout_s=0.4, write_timeout_s=0.4, max_retries=0
    )
    assert manager.execute(lambda c: manager.send(c, "SET", "k", "1")) == b"OK"
    big = b"x" * (64 << 20)  # more than the kernel buffers on both sides hold
    stop_process(server.proc.pid)
    try:
        started = time.monotonic()
        with pytest.raises(RedisUnavailable, match="Timeout writing to socket"):
            manager.execute(lambda c: manager.send(c, "SET", "big", big))
        assert time.monotonic() - started < 5
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    assert manager.execute(lambda c: manager.send(c, "GET", "k")) == b"1"


def test_only_a_plain_tcp_connection_with_a_timeout_changes_class():
    """A unix socket, or a connection without a socket timeout, keeps redis-py's settings."""
    from handoff.connection.kernel_timeouts import KernelTimedConnection, kernel_timed

    tcp = kernel_timed({"host": "h", "port": 1, "socket_timeout": 2.0})
    assert tcp["connection_class"] is KernelTimedConnection
    assert tcp["io_timeout_s"] == 2.0
    unix = {"path": "/tmp/x.sock", "socket_timeout": 2.0,
            "connection_class": redis.UnixDomainSocketConnection}  # fmt: skip
    assert kernel_timed(unix) == unix
    no_timeout = {"host": "h", "port": 1, "socket_timeout": None}
    assert kernel_timed(no_timeout) == no_timeout
