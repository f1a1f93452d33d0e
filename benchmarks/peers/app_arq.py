"""arq benchmark jobs. Runs in: `python app_arq.py KIND` (arq.run_worker, 1 process each)."""

import asyncio
import logging
import os
import sys

import bench_probe
from arq import run_worker
from arq.connections import RedisSettings


async def noop(ctx, sent, lat):
    bench_probe.finished("noop", bench_probe.started(sent, lat))


async def io(ctx, sent, lat):
    start = bench_probe.started(sent, lat)
    await asyncio.sleep(0.01)
    bench_probe.finished("io", start)


class WorkerSettings:
    functions = [noop, io]
    redis_settings = RedisSettings.from_dsn(
        os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:1/0")
    )
    max_jobs = int(os.environ.get("BENCH_ARQ_MAX_JOBS", "10"))
    poll_delay = float(os.environ.get("BENCH_ARQ_POLL_DELAY_S", "0.5"))
    queue_read_limit = int(os.environ.get("BENCH_ARQ_READ_LIMIT", "0")) or None


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    run_worker(WorkerSettings)
    sys.exit(0)
