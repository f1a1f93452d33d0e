"""The list of commands, in the order `handoff --help` shows them."""

from __future__ import annotations

from core.cli.config_cmd import config_group
from core.cli.demo_cmd import demo
from core.cli.ops_cmds import scale
from core.cli.run_cmds import redis, supervise, worker
from core.cli.task_cmds import dead, enqueue, inspect

ALL: list = [supervise, worker, enqueue, inspect, dead, scale, redis, demo, config_group]
