"""Celery's side of the rate-limit benchmark: rate_limit="10/s" (Celery's per-worker-node
token bucket). Runs in: `celery -A app_rate_celery worker` processes."""

import os
import time

import redis
from celery import Celery

app = Celery("rates", broker=os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:1/0"))
app.conf.update(task_ignore_result=True, worker_hijack_root_logger=False)
_stats = redis.Redis.from_url(os.environ.get("BENCH_STATS_URL", "redis://127.0.0.1:1/1"))


@app.task(name="limited", rate_limit="10/s")
def limited(n):
    _stats.rpush("starts", time.time() * 1000)
