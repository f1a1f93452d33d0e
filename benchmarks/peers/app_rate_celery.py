"""Celery's side of the rate-limit benchmark: rate_limit="10/s" (Celery's per-worker-node
token bucket). Runs in: `celery -A app_rate_celery worker` processes (and the producer,
which makes an app per run with make_app)."""

import os
import time

import redis
from celery import Celery


def make_app(url: str) -> Celery:
    made = Celery("rates", broker=url)
    made.conf.update(task_ignore_result=True, worker_hijack_root_logger=False)
    return made


app = make_app(os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:1/0"))
_stats = redis.Redis.from_url(os.environ.get("BENCH_STATS_URL", "redis://127.0.0.1:1/1"))


@app.task(name="limited", rate_limit="10/s")
def limited(n):
    _stats.rpush("starts", time.time() * 1000)
