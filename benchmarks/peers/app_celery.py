"""Celery benchmark tasks. Runs in: `celery -A app_celery worker` processes (and producer)."""

import os
import time

try:
    import bench_probe
except ImportError:  # the producer side, in the benchmark process
    from benchmarks.peers import bench_probe
from celery import Celery


def make_app(url: str) -> Celery:
    app = Celery("bench", broker=url)
    app.conf.update(
        task_ignore_result=True,  # no result backend: fire and forget, like the others' noop
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    return app


app = make_app(os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:1/0"))


@app.task(name="noop")
def noop(sent, lat):
    bench_probe.finished("noop", bench_probe.started(sent, lat))


@app.task(name="io")
def io(sent, lat):
    start = bench_probe.started(sent, lat)
    time.sleep(0.01)  # gevent-patched in the I/O workers
    bench_probe.finished("io", start)
