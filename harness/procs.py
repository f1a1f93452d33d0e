"""Helpers for tests that run real handoff processes (supervisor, workers, honcho)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import redis

ROOT = Path(__file__).resolve().parent.parent


def free_tcp_port() -> int:
    """A port the kernel just handed out on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(
    condition: Callable[[], object],
    timeout_s: float,
    what: str,
    step_s: float = 0.02,
    not_yet: tuple[type[BaseException], ...] = (),
):
    """Poll condition until truthy (returned) or fail after timeout_s naming what we waited
    for. Errors of the `not_yet` types count as "not yet"; the last is quoted at the end."""
    deadline = time.monotonic() + timeout_s
    last_error: BaseException | None = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except not_yet as e:
            last_error = e
        if time.monotonic() > deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}{detail}")
        time.sleep(step_s)


def stop_process(pid: int, timeout_s: float = 10) -> None:
    """SIGSTOP pid and return once every one of its threads is stopped. kill() returns
    before that: one thread takes the signal and only then stops the others, so on a busy
    machine another thread (a worker's inbox, say) can still run for milliseconds."""
    os.kill(pid, signal.SIGSTOP)

    def all_stopped() -> bool:
        states = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                stat = (task / "stat").read_text()
            except FileNotFoundError:  # a thread that just ended
                continue
            states.append(stat.rpartition(")")[2].split()[0])
        return bool(states) and all(state in ("T", "t") for state in states)

    wait_until(all_stopped, timeout_s, f"every thread of {pid} to stop", step_s=0.002)


def handoff_env(redis_url: str, **settings: object) -> dict[str, str]:
    """Environment for a handoff subprocess: the test's server, test apps importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HANDOFF_")}
    env.pop("REDIS_URL", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "core"), str(ROOT), str(ROOT / "tests")])
    env["TEST_REDIS_URL"] = redis_url
    env["HANDOFF_REDIS_URL"] = redis_url
    env["HANDOFF_HEARTBEAT_INTERVAL_S"] = "0.2"
    env["HANDOFF_REAPER_INTERVAL_S"] = "0.2"
    for name, value in settings.items():
        env[f"HANDOFF_{name.upper()}"] = str(value)
    return env


class HandoffProcess:
    """A `handoff ...` subprocess in its own session, with its output in a file."""

    def __init__(
        self,
        args: list[str],
        env: dict[str, str],
        log_path: Path,
        nofile: int | None = None,
        prefix: tuple[str, ...] = (),
    ) -> None:
        """nofile: the process's file limit (RLIMIT_NOFILE), when a test lowers it; prefix:
        words run before the command (`ip netns exec NAME`, see harness/hosts.py)."""
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "handoff", *args],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=None if nofile is None else lambda: _limit_files(nofile),
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            return []

    def live_children(self) -> list[psutil.Process]:
        alive = []
        for child in self.children():
            try:
                if child.status() != psutil.STATUS_ZOMBIE:
                    alive.append(child)
            except psutil.NoSuchProcess:
                pass
        return alive

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout_s: float) -> int:
        return self.proc.wait(timeout=timeout_s)

    def stop(self) -> None:
        """Make sure nothing outlives the test: the whole session is killed."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)
        else:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._log.close()


def _limit_files(count: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_NOFILE, (count, count))


def plain_client(url: str):
    """redis-py's own client for a test URL: a RedisCluster for redis+cluster://."""
    if url.startswith("redis+cluster://"):
        from redis.cluster import RedisCluster

        host, _, port = url.removeprefix("redis+cluster://").split(",")[0].partition(":")
        return RedisCluster(host=host, port=int(port))
    return redis.Redis.from_url(url)


def executions(raw_redis) -> list[tuple[int, str]]:
    """(pid, task id) of every handler start the test agents recorded."""
    out = []
    for line in raw_redis.lrange("executed", 0, -1):
        pid, task_id = line.decode().split(" ", 1)
        out.append((int(pid), task_id))
    return out


def stat(client, agent: str, name: str) -> int:
    return client.queue_stats([agent])[agent][name]


def command_calls(raw_redis) -> dict[str, int]:
    """Calls per command so far (INFO commandstats), summed over a cluster's primaries:
    what a test compares before and after to count what a client sent."""
    nodes = raw_redis.get_primaries() if hasattr(raw_redis, "get_primaries") else [None]
    totals: dict[str, int] = {}
    for node in nodes:
        if node is None:
            info = raw_redis.info("commandstats")
        else:
            info = raw_redis.info("commandstats", target_nodes=node)
        for name, stats in info.items():
            if name.startswith("cmdstat_"):
                totals[name[8:]] = totals.get(name[8:], 0) + stats["calls"]
    return totals
