"""The list of commands, in the order `handoff --help` shows them."""

from __future__ import annotations

from handoff.cli.bench_cmd import bench
from handoff.cli.config_cmd import config_group
from handoff.cli.monitor_cmds import health, inspect_workers_command, monitor
from handoff.cli.ops_cmds import limits, scale
from handoff.cli.run_cmds import redis, supervise, worker
from handoff.cli.schedule_cmds import schedules
from handoff.cli.task_cmds import cancel, dead, enqueue, inspect
from handoff.cli.watch_cmd import watch

inspect_workers_command(inspect)

ALL: list = [
    supervise,
    worker,
    enqueue,
    cancel,
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
