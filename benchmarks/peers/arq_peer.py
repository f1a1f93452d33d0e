"""arq (asyncio, Redis).

Settings: 2 processes of arq.run_worker(WorkerSettings) (what the `arq` command runs, minus
its INFO per-job logging), arq defaults (keep results 1 h, job timeout 5 min) except poll_delay
0.01 s (see POLL_DELAY_S); noop max_jobs=10 (default); I/O max_jobs=16. Bulk enqueue: arq has no
multi-job enqueue; asyncio.gather over enqueue_job, 50 at a time (each job is its own
WATCH/MULTI transaction); single: await enqueue_job.
"""

from __future__ import annotations

import asyncio
from importlib.metadata import version

from benchmarks.peers.base import IO, NOOP, PEERS_DIR, Peer, python_argv

CHUNK = 50  # concurrent enqueue_job calls (each holds a connection for its transaction)
#: arq polls its queue (ZRANGEBYSCORE) every poll_delay. The default, 0.5 s, held 2 workers
#: to ~340 noop tasks/s here (vs ~1,150/s at 0.05 s or 0.01 s) and adds up to 0.5 s of
#: enqueue-to-start latency: we use 0.01 s so that arq is not handicapped by its default.
POLL_DELAY_S = "0.01"


class ArqPeer(Peer):
    name = "arq"
    settings_note = {
        NOOP: "2 x run_worker, max_jobs=10 (default), poll_delay 0.01 s (default 0.5 s)",
        IO: "2 x run_worker, max_jobs=16, poll_delay 0.01 s",
    }
    limits = {
        "poll_delay": "the default 0.5 s held 2 workers to ~340 noop tasks/s in a trial run;"
        " 0.01 s is used"
    }
    bulk_note = "none in the API: asyncio.gather(enqueue_job x50) (one transaction each)"

    @staticmethod
    def versions() -> dict[str, str]:
        return {"arq": version("arq")}

    def connect(self, broker_url: str, stats_url: str) -> None:
        from arq import create_pool
        from arq.connections import RedisSettings

        self.broker_url, self.stats_url = broker_url, stats_url
        self.loop = asyncio.new_event_loop()
        self.pool = self.loop.run_until_complete(create_pool(RedisSettings.from_dsn(broker_url)))

    def close(self) -> None:
        self.loop.run_until_complete(self.pool.aclose())
        self.loop.close()

    def enqueue_bulk(self, kind: str, payloads: list[tuple[float, int]]) -> None:
        async def send() -> None:
            for i in range(0, len(payloads), CHUNK):
                chunk = payloads[i : i + CHUNK]
                await asyncio.gather(*(self.pool.enqueue_job(kind, *p) for p in chunk))

        self.loop.run_until_complete(send())

    def enqueue_one(self, kind: str, payload: tuple[float, int]) -> None:
        self.loop.run_until_complete(self.pool.enqueue_job(kind, *payload))

    def worker_commands(self, kind: str) -> list[list[str]]:
        return [python_argv(str(PEERS_DIR / "app_arq.py")) for _ in range(self.processes)]

    def worker_env(self) -> dict[str, str]:
        env = super().worker_env()
        env["BENCH_ARQ_POLL_DELAY_S"] = POLL_DELAY_S
        env["BENCH_ARQ_MAX_JOBS"] = "16" if self._kind == IO else "10"
        return env

    def start_workers(self, kind: str) -> None:
        self._kind = kind
        super().start_workers(kind)

    def slots(self, kind: str) -> int:
        return 16 if kind == IO else 10
