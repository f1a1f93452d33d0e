"""The interface every benchmarked system implements, and the process plumbing they share.

Runs in: the benchmark process. A Peer drives one system against one server it is given:
it builds the producer side (connect), enqueues (bulk and single), starts and stops that
system's own worker command as child processes (N=2 task-running processes), and lists
their pids. Draining is observed through the probe's stats server, the same way for all.

Every child is started in its own session (so its whole process group can be killed) with
PR_SET_PDEATHSIG, so even a benchmark killed with SIGKILL takes its workers along.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from handoff.connection.embedded_server import die_with_parent

PEERS_DIR = Path(__file__).resolve().parent
PROJECT_DIR = PEERS_DIR.parents[1]
NOOP, IO = "noop", "io"
IO_SLEEP_S = 0.010
STOP_GRACE_S = 5.0
RSS_SAMPLE_S = 0.05


@dataclass
class WorkerGroup:
    """Child processes of one worker start; each leads its own process group."""

    procs: list[subprocess.Popen] = field(default_factory=list)
    log_paths: list[Path] = field(default_factory=list)

    def spawn(self, argv: Sequence[str], env: dict[str, str], log_path: Path) -> None:
        log = open(log_path, "ab")  # noqa: SIM115 - the child owns it; closed right after
        try:
            proc = subprocess.Popen(
                list(argv),
                env=env,
                cwd=PROJECT_DIR,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
        finally:
            log.close()
        self.procs.append(proc)
        self.log_paths.append(log_path)

    def root_pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def crashed(self) -> str | None:
        """A one-line reason when a root process has exited (for a clear error)."""
        for proc, path in zip(self.procs, self.log_paths, strict=True):
            if proc.poll() is not None:
                tail = path.read_text(errors="replace")[-800:] if path.exists() else ""
                return f"{proc.args[:3]} exited with {proc.returncode}: {tail}"
        return None

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """SIGTERM each group, wait up to grace_s, then SIGKILL whatever is left."""
        for proc in self.procs:
            _killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.procs:
            _killpg(proc.pid, signal.SIGKILL)  # also any grandchild left in the group
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.procs.clear()
        self.log_paths.clear()


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class Peer(ABC):
    """One benchmarked system. Subclasses say which settings they use in their docstring."""

    name: str = ""
    processes: int = 2
    #: what the table says about this system's settings, per workload kind
    settings_note: dict[str, str] = {}
    #: a workload this system cannot run the way the others do -> why (shown in the table)
    limits: dict[str, str] = {}
    bulk_note: str = ""
    #: workload size relative to the others' (a much slower system gets fewer tasks so
    #: that the run stays within its time budget; the table says so)
    noop_scale: float = 1.0
    io_scale: float = 1.0

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.group = WorkerGroup()
        #: words run before each worker command: `ip netns exec NAME` puts the workers on a
        #: host of their own (benchmarks/rtt.py); empty: this machine's network
        self.prefix: tuple[str, ...] = ()
        self.broker_url = ""
        self.stats_url = ""

    # -- what each system implements -------------------------------------------------------

    @staticmethod
    @abstractmethod
    def versions() -> dict[str, str]:
        """Package name -> version of what this peer runs."""

    @abstractmethod
    def connect(self, broker_url: str, stats_url: str) -> None:
        """Build the producer side against a fresh server."""

    @abstractmethod
    def enqueue_bulk(self, kind: str, payloads: list[tuple[float, int]]) -> None:
        """The system's fastest documented way to enqueue many tasks."""

    @abstractmethod
    def enqueue_one(self, kind: str, payload: tuple[float, int]) -> None:
        """One task, one call: what a web request handler does."""

    @abstractmethod
    def worker_commands(self, kind: str) -> list[list[str]]:
        """The command line(s) that start this system's workers for one workload kind."""

    def slots(self, kind: str) -> int:
        """Tasks one worker process runs at once for this workload kind."""
        return 1

    def close(self) -> None:  # noqa: B027 - optional hook
        """Drop the producer side (before the server stops)."""

    # -- shared ----------------------------------------------------------------------------

    def worker_env(self) -> dict[str, str]:
        path = [str(PEERS_DIR), str(PROJECT_DIR)]
        if os.environ.get("PYTHONPATH"):
            path.append(os.environ["PYTHONPATH"])
        env = dict(os.environ)
        env.update(
            PYTHONPATH=os.pathsep.join(path),
            BENCH_BROKER_URL=self.broker_url,
            BENCH_STATS_URL=self.stats_url,
            PYTHONUNBUFFERED="1",
        )
        return env

    def start_workers(self, kind: str) -> None:
        env = self.worker_env()
        for i, argv in enumerate(self.worker_commands(kind)):
            self.group.spawn(
                [*self.prefix, *argv], env, self.log_dir / f"{self.name}-{kind}-{i}.log"
            )

    def stop_workers(self) -> None:
        self.group.stop()

    def root_pids(self) -> list[int]:
        return self.group.root_pids()

    def worker_pids(self, task_pids: set[int]) -> list[int]:
        """The long-lived processes that run tasks (the ones whose RSS is reported)."""
        import psutil

        out = []
        for pid in self.root_pids():
            try:
                tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            out.extend(p.pid for p in tree if p.pid in task_pids)
        return out

    def crashed(self) -> str | None:
        return self.group.crashed()


def python_argv(*args: str) -> list[str]:
    """Run a console script's module with the same interpreter as the benchmark."""
    return [sys.executable, *args]


class RssSampler:
    """Peak RSS per process of a worker tree, sampled from a thread (no forks meanwhile)."""

    def __init__(self, root_pids: list[int]) -> None:
        self.root_pids = root_pids
        self.peak: dict[int, int] = {}
        self.peak_total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        import psutil

        while True:
            total = 0
            for root in self.root_pids:
                try:
                    proc = psutil.Process(root)
                    tree = [proc, *proc.children(recursive=True)]
                except psutil.NoSuchProcess:
                    continue
                for p in tree:
                    try:
                        rss = p.memory_info().rss
                    except psutil.NoSuchProcess:
                        continue
                    total += rss
                    self.peak[p.pid] = max(self.peak.get(p.pid, 0), rss)
            self.peak_total = max(self.peak_total, total)
            if self._stop.wait(RSS_SAMPLE_S):
                return
