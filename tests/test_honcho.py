"""The Procfile under the real honcho: the demo chain runs, Ctrl-C loses nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import orjson
import psutil
import pytest
import redis

from handoff.client import Client
from handoff.config import RedisPoolConfig, Settings
from harness.procs import ROOT, free_tcp_port, wait_until

HONCHO = Path(sys.executable).with_name("honcho")


def _honcho(tmp_path: Path, env: dict[str, str]) -> subprocess.Popen:
    log = open(tmp_path / "honcho.log", "wb")  # noqa: SIM115 - the process owns it
    return subprocess.Popen(
        [str(HONCHO), "-f", str(ROOT / "Procfile"), "-d", str(ROOT), "start"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HANDOFF_")}
    env.pop("REDIS_URL", None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["HANDOFF_RUN_DIR"] = str(tmp_path / "run")
    # The Procfile's monitor serves the dashboard: on a free port, not the default 8321.
    env["HANDOFF_MONITOR_WEB"] = f"127.0.0.1:{free_tcp_port()}"
    env.update(extra)
    return env


def _ctrl_c(proc: subprocess.Popen) -> int:
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal does: the whole foreground group
    try:
        return proc.wait(timeout=15)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _follow_chain(client: Client) -> list[str]:
    """A planner task whose coder branch handed off to a reviewer that finished."""
    keys = client.queue.manager.execute(
        lambda c: list(c.scan_iter(match="handoff:{planner}:result:*", count=1000))
    )
    for key in keys:
        planner_id = key.decode().rsplit(":", 1)[1]
        for coder_id in client.result(planner_id, wait_s=0)["join"]["branches"]:
            if client.status(coder_id) != "done":
                continue
            coder_result = client.result(coder_id, wait_s=0)
            for reviewer_id in coder_result.get("handoff", []):
                if client.status(reviewer_id) == "done":
                    return [planner_id, coder_id, reviewer_id]
    return []


def _waiting_merge(client: Client) -> tuple[str, str] | None:
    """A demo run whose merge is waiting for its approval now: (root, merger task id)."""
    keys = client.queue.manager.execute(
        lambda c: list(c.scan_iter(match="handoff:{integrator}:result:*", count=1000))
    )
    for key in keys:
        asked = client.result(key.decode().rsplit(":", 1)[1], wait_s=0)["wait"]
        if client.status(asked["then"]) == "waiting":
            return asked["event"].rsplit("@", 1)[1], asked["then"]  # approve:<feature>@<run>
    return None


@pytest.mark.slow
def test_honcho_start_runs_the_demo_chain_on_the_embedded_server(tmp_path):
    env = _env(tmp_path)
    proc = _honcho(tmp_path, env)
    try:
        url = f"unix://{tmp_path / 'run' / 'redis.sock'}"
        with Client(settings=Settings(redis=RedisPoolConfig(url=url, max_retries=0))) as client:
            chain = wait_until(lambda: _try(lambda: _follow_chain(client)), 60, "a full chain")
            reviewer = client.task(chain[2])["result"]["result"]
            assert reviewer.get("approved") is True or "handoff" in reviewer
            # The run ends with the merger's word on the integrator's merge of its steps.
            merged = client.result(chain[0], wait_s=60, follow=True)["merged"]
            steps = client.task(chain[0])["result"]["result"]["join"]["branches"]
            assert sorted(merged["approved_steps"] + merged["failed_steps"]) == list(
                range(len(steps))
            )
            integrator = client.tree(chain[0])["then"]
            assert integrator["agent"] == "integrator"
            assert integrator["wait"].endswith(f"@{chain[0]}")  # approve:<feature>@<run>
            # A run passes through waiting (its merge parked until the producer approves
            # or rejects it, 1-5 s later) to merged, published or not.
            root, merger = wait_until(lambda: _try(lambda: _waiting_merge(client)), 60, "a wait")
            end = client.result(root, wait_s=30, follow=True)
            assert end["verdict"] in ("approved", "rejected"), end
            assert end["published"] is (end["verdict"] == "approved") and end["by"]
            assert client.status(merger) == "done"
            printed = f"demo: feature {end['merged']['feature']!r} ({root}): merged step(s) "
            wait_until(lambda: printed in _log(tmp_path), 30, "the run's end printed")
            assert f"; {end['verdict']} by {end['by']}" in _log(tmp_path).split(printed)[1]
            # The monitor serves the dashboard; its first page may come before its first
            # snapshot ("Collecting samples"): wait for one that lists the integrator.
            home = f"http://{env['HANDOFF_MONITOR_WEB']}/"
            link = 'href="/agents/integrator"'
            wait_until(lambda: _try(lambda: link in _get(home)), 30, "the dashboard's integrator")
        assert _ctrl_c(proc) in (0, 130)  # honcho exits 130 after SIGINT
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = (tmp_path / "honcho.log").read_text()
    assert "supervisor" in log and "stopped (ok)" in log
    assert "Traceback" not in log and "rc=-" not in log  # every process stopped cleanly


@pytest.mark.slow
def test_ctrl_c_under_honcho_leaves_nothing_running(tmp_path, redis_url):
    proc = _honcho(tmp_path, _env(tmp_path, REDIS_URL=redis_url))
    with Client(settings=Settings(redis=RedisPoolConfig(url=redis_url))) as client:
        wait_until(
            lambda: client.queue_stats().get("coder", {}).get("done", 0) >= 5, 60, "coder work"
        )
        assert _ctrl_c(proc) in (0, 130)  # honcho exits 130 after SIGINT
        stats = client.queue_stats()
        assert all(s["running"] == 0 for s in stats.values()), orjson.dumps(stats)
        log = (tmp_path / "honcho.log").read_text()
        assert "Traceback" not in log and "rc=-" not in log


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


def _log(tmp_path: Path) -> str:
    return (tmp_path / "honcho.log").read_text(errors="replace")


def _try(fn):
    try:
        return fn()
    except Exception:
        return None


def _dev_server(tmp_path: Path, *flags: str, log: Path | None = None) -> subprocess.Popen:
    """`handoff redis FLAGS` in a session of its own; its output in `log` (or dropped)."""
    with open(log or os.devnull, "wb") as out:
        return subprocess.Popen(
            [str(Path(sys.executable).parent / "handoff"), "redis", *flags],
            env=_env(tmp_path),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@pytest.mark.parametrize(("flags", "kept"), [((), 100), (("--no-persist",), 0)])
def test_the_development_server_keeps_queued_tasks_across_a_restart(tmp_path, flags, kept):
    url = f"unix://{tmp_path / 'run' / 'redis.sock'}"
    pool = RedisPoolConfig(url=url, max_retries=0, breaker_cooldown_s=0.05)
    settings = Settings(redis=pool)
    for run in range(2):
        server = _dev_server(tmp_path, *flags)
        try:
            with Client(settings=settings) as client:
                wait_until(lambda c=client: _try(c.agents) is not None, 15, "the server")
                if run == 0:
                    client.enqueue_many("probe", [{"n": i} for i in range(100)])
                else:
                    assert client.queue_stats(["probe"])["probe"]["queued"] == kept
        finally:
            os.killpg(server.pid, signal.SIGTERM)  # a clean stop, as Ctrl-C under honcho
            assert server.wait(15) == 0


def _logged_dev_server(tmp_path: Path) -> tuple[subprocess.Popen, Path, redis.Redis]:
    """`handoff redis --no-persist`, its output in a file, and a client once it answers."""
    log = tmp_path / "server.log"
    server = _dev_server(tmp_path, "--no-persist", log=log)
    client = redis.Redis(unix_socket_path=str(tmp_path / "run" / "redis.sock"), socket_timeout=2)
    wait_until(lambda: _try(client.ping), 15, "the server")
    return server, log, client


def test_the_development_server_stops_once_its_clients_have_left(tmp_path):
    """Stopped as honcho stops it (SIGTERM to its group) while a client is connected: it
    goes on serving that client, and stops (exit 0) once the client has left."""
    server, log, client = _logged_dev_server(tmp_path)
    try:
        os.killpg(server.pid, signal.SIGTERM)
        wait_until(lambda: "once its 1 client(s) have left" in log.read_text(), 10, "the wait")
        assert client.set("still", "served") and server.poll() is None
        client.close()
        assert server.wait(10) == 0
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    assert "stopping anyway" not in log.read_text()


def test_a_second_stop_signal_stops_the_development_server_at_once(tmp_path):
    server, log, client = _logged_dev_server(tmp_path)
    try:
        os.killpg(server.pid, signal.SIGTERM)
        wait_until(lambda: "have left" in log.read_text(), 10, "the wait for its client")
        os.killpg(server.pid, signal.SIGINT)  # a second Ctrl-C
        assert server.wait(3) == 0  # well inside the wait for its client
        assert "stopping now" in log.read_text()
        assert _try(client.ping) is None
    finally:
        client.close()
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)


def test_the_development_server_goes_when_its_handoff_process_is_killed(tmp_path):
    """The server runs as a child in a session of its own: killed with SIGKILL (honcho's
    last resort), the handoff process takes it along, so no server outlives the stack."""
    server, _, client = _logged_dev_server(tmp_path)
    (child,) = psutil.Process(server.pid).children()
    try:
        os.kill(server.pid, signal.SIGKILL)
        server.wait(10)
        wait_until(lambda: not child.is_running() or child.status() == "zombie", 10, "it to go")
        assert _try(client.ping) is None
    finally:
        client.close()
        if child.is_running():
            child.kill()
