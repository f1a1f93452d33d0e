"""Agents for scripts/bench-scaling and scripts/bench-failover (HANDOFF_APP=benchmarks.agents).

Runs in: handoff worker processes started by those benchmarks (the project root on PYTHONPATH).
Every agent here is a no-op; two optional helpers are switched on by environment variables:

    BENCH_GATE_DIR  each worker process's first task writes <dir>/ready-<pid>, then every
                    handler thread waits until <dir>/open exists (checked once per thread
                    until seen; afterwards one global flag). The scaling benchmark opens the
                    gate once all worker processes are booted and hold tasks, so worker boot
                    time is not part of the measured drain.
    BENCH_EXEC_DIR  each execution appends its task id to <dir>/exec-<pid> (line buffered),
                    a record of what ran that does not live in the Redis being failed over.

Agent names: "noop", "blip" and the candidates n0..n63 (the scaling benchmark picks three of
those whose hash tags land on three different cluster primaries).
"""

from __future__ import annotations

import os
import threading
import time

from handoff import agent

GATE_DIR = os.environ.get("BENCH_GATE_DIR") or None
EXEC_DIR = os.environ.get("BENCH_EXEC_DIR") or None
CANDIDATES = tuple(f"n{i}" for i in range(64))
GATE_POLL_S = 0.002

_gate_open = GATE_DIR is None
_ready_written = False
_exec_file = None
_exec_pid = 0
_exec_lock = threading.Lock()


def _wait_gate() -> None:
    global _gate_open, _ready_written
    if not _ready_written:
        _ready_written = True
        with open(os.path.join(GATE_DIR, f"ready-{os.getpid()}"), "w"):
            pass
    opened = os.path.join(GATE_DIR, "open")
    while not os.path.exists(opened):
        time.sleep(GATE_POLL_S)
    _gate_open = True


def _record(task_id: str) -> None:
    global _exec_file, _exec_pid
    with _exec_lock:
        if _exec_file is None or _exec_pid != os.getpid():
            _exec_pid = os.getpid()
            path = os.path.join(EXEC_DIR, f"exec-{_exec_pid}")
            _exec_file = open(path, "a", buffering=1)  # noqa: SIM115 - kept for the process
        _exec_file.write(task_id + "\n")


def noop(task):
    if not _gate_open:
        _wait_gate()
    if EXEC_DIR is not None:
        _record(task.id)


for _name in ("noop", "blip", *CANDIDATES):
    agent(_name, max_concurrent=8)(noop)
