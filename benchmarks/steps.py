"""Steps benchmark: what task.step costs, on one local server.

Runs in: `python -m benchmarks.steps [--quick] [--out docs]`, a plain process that starts
a private server (TCP on loopback) and drives protocol/steps.py as a worker would, on a
task it really leased (so every store is token-checked by step.lua):

  1. a direct call of a trivial function (the baseline);
  2. a reused step, its delivery's steps already read (a dict lookup and a JSON decode);
  3. the first step of a delivery, reused (one HGETALL reading the stored steps, then 2);
  4. a step that runs and stores its result (one EVALSHA of step.lua).
Each figure is the median over rounds of the mean per call, in microseconds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from benchmarks.pages import write_generated
from handoff.client import Client
from handoff.config import RedisPoolConfig, Settings
from handoff.connection.embedded_server import spawn_server
from handoff.protocol.queue import ClaimRequest
from handoff.protocol.steps import StepStore
from harness.topologies import free_tcp_port

RESULT = {"answer": "a short model reply", "tokens": 42}


def _value() -> dict:
    return RESULT


def _per_call_us(rounds: int, calls: int, body) -> float:
    """Median over rounds of the mean µs per call of body(i) for i in range(calls)."""
    samples = []
    for _ in range(rounds):
        started = time.perf_counter()
        for i in range(calls):
            body(i)
        samples.append((time.perf_counter() - started) / calls * 1e6)
    return statistics.median(samples)


def measure(client: Client, rounds: int, calls: int) -> dict[str, float]:
    store = StepStore(client.queue, client.settings)
    client.enqueue_many("bench-steps", [{}, {}])
    task, other = client.queue.claim([ClaimRequest("bench-steps", 2, 600_000)])["bench-steps"]
    task.step_store = other.step_store = store
    names = [f"s{i}" for i in range(calls * rounds)]
    figures = {"direct": _per_call_us(rounds, calls, lambda i: _value())}
    stored = iter(names)
    figures["store"] = _per_call_us(rounds, calls, lambda i: task.step(next(stored), _value))
    again = iter(names)

    def reuse(_i: int) -> None:
        task.step(next(again), _value)

    task.step_log = None
    task.step(names[0], _value)  # reads the stored steps once, for this "delivery"
    next(again)
    figures["reused"] = _per_call_us(rounds, calls - 1, reuse) if calls > 1 else 0.0

    other.step(names[0], _value)  # a task with one stored step

    def first_of_delivery(_i: int) -> None:
        other.step_log = None
        other.step(names[0], _value)

    figures["first_reused"] = _per_call_us(rounds, calls, first_of_delivery)
    return figures


def render(figures: dict[str, float], meta: dict) -> str:
    rows = (
        ("direct call of the function (baseline)", "direct"),
        ("reused step, the delivery's steps already read", "reused"),
        ("first step of a delivery, reused (reads the task's one stored step: a round trip)",
         "first_reused"),
        ("step that runs and stores its result (one round trip)", "store"),
    )  # fmt: skip
    lines = [
        f"Steps benchmark ({meta['date']}, {meta['server']}, {meta['calls']:,} calls x "
        f"{meta['rounds']} rounds{', quick' if meta['quick'] else ''}; median of the "
        "rounds' mean per call)",
        "",
        "| call | µs per call |",
        "|---|---|",
        *(f"| {label} | {figures[key]:,.1f} |" for label, key in rows),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.steps", description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="write into DIR/benchmarks.md")
    args = parser.parse_args(argv)
    rounds, calls = (3, 500) if args.quick else (5, 2000)
    port = free_tcp_port()
    server = spawn_server(port=port)
    try:
        settings = Settings(redis=RedisPoolConfig(url=f"redis://127.0.0.1:{port}/0"))
        with Client(settings=settings) as client:
            figures = measure(client, rounds, calls)
    finally:
        server.stop()
    meta = {
        "date": time.strftime("%Y-%m-%d"), "server": "local server over TCP loopback",
        "rounds": rounds, "calls": calls, "quick": args.quick,
    }  # fmt: skip
    page = render(figures, meta)
    print(page)
    if args.out:
        write_generated(args.out / "benchmarks.md", "steps", page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
