"""Huey benchmark tasks. Runs in: `huey_consumer app_huey.huey` (and the producer)."""

import os
import time

try:
    import bench_probe
except ImportError:  # the producer side, in the benchmark process
    from benchmarks.peers import bench_probe
from huey import RedisHuey


def build(url: str) -> tuple[RedisHuey, dict]:
    huey = RedisHuey("bench", url=url)

    @huey.task(name="noop")
    def noop(sent, lat):
        bench_probe.finished("noop", bench_probe.started(sent, lat))

    @huey.task(name="io")
    def io(sent, lat):
        start = bench_probe.started(sent, lat)
        time.sleep(0.01)
        bench_probe.finished("io", start)

    return huey, {"noop": noop, "io": io}


huey, TASKS = build(os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:1/0"))
