"""The list of commands, in the order `handoff --help` shows them."""

from __future__ import annotations

from core.cli.bench_cmd import bench
from core.cli.config_cmd import config_group
from core.cli.demo_cmd import demo
from core.cli.monitor_cmds import health, inspect_workers_command, monitor
from core.cli.ops_cmds import scale
from core.cli.run_cmds import redis, supervise, worker
from core.cli.task_cmds import dead, enqueue, inspect

inspect_workers_command(inspect)

ALL: list = [
    supervise,
    worker,
    enqueue,
    inspect,
    dead,
    scale,
    monitor,
    health,
    redis,
    demo,
    bench,
    config_group,
]
