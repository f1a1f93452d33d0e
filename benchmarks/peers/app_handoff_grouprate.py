"""handoff's benchmark agents with a per-group start rate far above the drain rate (each
group's own limiter runs at every start). Runs in: handoff worker processes
(HANDOFF_APP=app_handoff_grouprate)."""

import asyncio

import bench_probe

from handoff import agent


@agent("noop", max_concurrent=8, group_rate="100000/s")
def noop(task):
    sent, lat = task.payload
    bench_probe.finished("noop", bench_probe.started(sent, lat))


@agent("io", max_concurrent=16, group_rate="100000/s")
async def io(task):
    sent, lat = task.payload
    start = bench_probe.started(sent, lat)
    await asyncio.sleep(0.01)
    bench_probe.finished("io", start)
