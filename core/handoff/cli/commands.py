"""The list of commands, in the order `handoff --help` shows them."""

from __future__ import annotations

from handoff.cli.bench_commands import bench
from handoff.cli.config_commands import config_group
from handoff.cli.monitor_commands import health, inspect_workers_command, monitor
from handoff.cli.ops_commands import limits, scale
from handoff.cli.rerun_commands import rerun
from handoff.cli.run_commands import redis, supervise, worker
from handoff.cli.schedule_commands import schedules
from handoff.cli.signal_commands import signal
from handoff.cli.task_commands import cancel, dead, enqueue, inspect
from handoff.cli.watch_commands import watch

inspect_workers_command(inspect)

ALL: list = [
    supervise,
    worker,
    enqueue,
    cancel,
    rerun,
    signal,
    watch,
    inspect,
    dead,
    schedules,
    scale,
    limits,
    monitor,
    health,
    redis,
    bench,
    config_group,
]
