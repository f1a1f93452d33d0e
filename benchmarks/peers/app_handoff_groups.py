"""handoff's benchmark agents with a start rate far above the drain rate (the agent's
limiter, at every claim); the peer puts every task in one of 100 groups. Runs in: handoff
worker processes (HANDOFF_APP=app_handoff_groups)."""

import asyncio

import bench_probe

from handoff import agent


@agent("noop", max_concurrent=8, rate="100000/s")
def noop(task):
    sent, lat = task.payload
    bench_probe.finished("noop", bench_probe.started(sent, lat))


@agent("io", max_concurrent=16, rate="100000/s")
async def io(task):
    sent, lat = task.payload
    start = bench_probe.started(sent, lat)
    await asyncio.sleep(0.01)
    bench_probe.finished("io", start)
