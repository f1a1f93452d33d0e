"""RQ.

Settings: `rq worker-pool -n 2` with the default Worker class, which forks a work horse per
job (RQ's production default: isolation over speed), log level WARNING, default result TTL.
RQ runs one job at a time per worker process, so its I/O bound is 2 / 10 ms = 200 tasks/s.
Because each job runs in a fresh fork, the probe writes each job's span itself
(BENCH_PROBE_INLINE=1) instead of batching from a thread. Bulk enqueue:
Queue.enqueue_many (one pipeline per 1,000); single: Queue.enqueue.
"""

from __future__ import annotations

from importlib.metadata import version

from benchmarks.peers.base import IO, NOOP, Peer, python_argv

CHUNK = 1000
QUEUE = "bench"


class RqPeer(Peer):
    name = "rq"
    settings_note = {
        NOOP: "worker-pool -n 2, default Worker (fork per job)",
        IO: "worker-pool -n 2: one job at a time per process (RQ has no in-process concurrency)",
    }
    limits = {
        "I/O concurrency": "one job per process, so its bound is 200 tasks/s, not 3,200",
        "workload size": "fork per job runs ~50-100 tasks/s here: RQ gets 7.5% of the noop"
        " tasks and 40% of the I/O tasks, so that a run fits in its time budget",
    }
    noop_scale = 0.075
    io_scale = 0.4
    bulk_note = "Queue.enqueue_many, 1,000 per pipeline"

    @staticmethod
    def versions() -> dict[str, str]:
        return {"rq": version("rq")}

    def connect(self, broker_url: str, stats_url: str) -> None:
        from redis import Redis
        from rq import Queue

        self.broker_url, self.stats_url = broker_url, stats_url
        self.redis = Redis.from_url(broker_url)
        self.queue = Queue(QUEUE, connection=self.redis)

    def close(self) -> None:
        self.redis.close()

    def enqueue_bulk(self, kind: str, payloads: list[tuple[float, int]]) -> None:
        from rq import Queue

        func = f"app_rq.{kind}"
        for i in range(0, len(payloads), CHUNK):
            chunk = payloads[i : i + CHUNK]
            self.queue.enqueue_many([Queue.prepare_data(func, args=p) for p in chunk])

    def enqueue_one(self, kind: str, payload: tuple[float, int]) -> None:
        self.queue.enqueue(f"app_rq.{kind}", *payload)

    def worker_commands(self, kind: str) -> list[list[str]]:
        return [
            python_argv(
                "-m", "rq.cli", "worker-pool", "-n", str(self.processes),
                "-u", self.broker_url, "-l", "WARNING", QUEUE,
            )
        ]  # fmt: skip

    def worker_env(self) -> dict[str, str]:
        env = super().worker_env()
        env["BENCH_PROBE_INLINE"] = "1"
        return env

    def worker_pids(self, task_pids: set[int]) -> list[int]:
        """The pool's worker processes (the horses are short-lived forks of them)."""
        import psutil

        out = []
        for pid in self.root_pids():
            try:
                out.extend(p.pid for p in psutil.Process(pid).children())
            except psutil.NoSuchProcess:
                continue
        return out
