"""A server that is starting (not listening yet, or loading its append-only file) is
waited for and said once at INFO by the supervisor and its workers, not logged as errors.

`./scripts/run` starts every process at once, and a second start loads the file the first
left: both used to print error lines for seconds.
"""

from __future__ import annotations

import re
import subprocess

import redis

from handoff import Client
from handoff.connection.embedded_server import find_server_binary, server_args
from harness.procs import free_tcp_port, wait_until

BAD_LEVELS = re.compile(r" (ERROR|WARNING|CRITICAL) ")


def _server(port: int, folder, *extra: str) -> subprocess.Popen:
    """A server started without waiting for it (the test is about what happens meanwhile)."""
    args = server_args(
        find_server_binary(), port=port, data_dir=str(folder), appendonly=True, extra=list(extra)
    )
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop(server: subprocess.Popen) -> None:
    server.terminate()
    server.wait(timeout=10)


def _runs_a_task(url: str) -> None:
    client = Client(url)
    try:
        task_id = client.enqueue("probe", {"n": 7})
        assert client.result(task_id, wait_s=20) == {"n": 7}
    finally:
        client.close()


def test_a_server_not_listening_yet_is_waited_for_in_one_info_line(start, tmp_path):
    port = free_tcp_port()
    url = f"redis://127.0.0.1:{port}/0"
    supervisor = start(["supervise", "--agents", "probe=1"], url=url)
    wait_until(lambda: "waiting for Redis" in supervisor.output(), 15, "the supervisor's wait")
    server = _server(port, tmp_path)
    try:
        _runs_a_task(url)
        out = supervisor.output()
        assert out.count("supervisor: waiting for Redis") == 1, out
        assert "(not listening yet)" in out and "supervisor: Redis ready after" in out
        assert not BAD_LEVELS.search(out), out
    finally:
        supervisor.stop()
        _stop(server)


def test_a_server_loading_its_data_set_is_waited_for_in_one_info_line(start, tmp_path):
    port = free_tcp_port()
    url = f"redis://127.0.0.1:{port}/0"
    server = _server(port, tmp_path, "--enable-debug-command", "yes")
    raw = redis.Redis(port=port)
    wait_until(raw.ping, 10, "the first start", not_yet=(redis.ConnectionError,))
    raw.execute_command("DEBUG", "POPULATE", 3000)
    raw.bgrewriteaof()
    wait_until(lambda: raw.info("persistence")["aof_rewrite_in_progress"] == 0, 10, "rewrite")
    _stop(server)
    # Loading 3,000 keys at 1 ms each holds the second start in LOADING for about 3 s.
    server = _server(
        port,
        tmp_path,
        "--key-load-delay",
        "1000",
        "--loading-process-events-interval-bytes",
        "1024",
    )
    try:
        wait_until(lambda: _loading(raw), 10, "the server to be loading")
        supervisor = start(["supervise", "--agents", "probe=1"], url=url)
        wait_until(lambda: "waiting for Redis" in supervisor.output(), 15, "the wait")
        wait_until(lambda: not _loading(raw), 15, "the load to end")
        _runs_a_task(url)
        out = supervisor.output()
        assert "supervisor: waiting for Redis" in out and "(loading its data set)" in out, out
        assert out.count("supervisor: waiting for Redis") == 1, out
        assert not BAD_LEVELS.search(out), out
    finally:
        _stop(server)


def _loading(raw: redis.Redis) -> bool:
    """INFO answers while the server loads (PING does too; other commands say LOADING)."""
    try:
        return bool(raw.info("persistence")["loading"])
    except redis.ConnectionError:
        return False
