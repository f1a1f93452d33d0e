"""Dramatiq benchmark actors. Runs in: `dramatiq app_dramatiq` worker processes."""

import os
import time

import bench_probe
import dramatiq
from dramatiq.brokers.redis import RedisBroker

dramatiq.set_broker(RedisBroker(url=os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:1/0")))


@dramatiq.actor(actor_name="noop")
def noop(sent, lat):
    bench_probe.finished("noop", bench_probe.started(sent, lat))


@dramatiq.actor(actor_name="io")
def io(sent, lat):
    start = bench_probe.started(sent, lat)
    time.sleep(0.01)
    bench_probe.finished("io", start)
