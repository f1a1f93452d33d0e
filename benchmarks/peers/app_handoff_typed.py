"""handoff's benchmark agents with typed payloads (HANDOFF_APP=app_handoff_typed)."""

import asyncio

import bench_probe

from handoff import agent


@agent("noop", max_concurrent=8, payload=tuple[float, int])
def noop(task):
    sent, lat = task.payload
    bench_probe.finished("noop", bench_probe.started(sent, lat))


@agent("io", max_concurrent=16, payload=tuple[float, int])
async def io(task):
    sent, lat = task.payload
    start = bench_probe.started(sent, lat)
    await asyncio.sleep(0.01)
    bench_probe.finished("io", start)
