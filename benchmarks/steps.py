"""Steps benchmark: what task.step costs, on one local server.

Runs in: `python -m benchmarks steps [--quick] [--out docs]`, a plain process that starts
a private server (TCP on loopback) and drives protocol/steps.py as a worker would, on a
task it really leased (so every store is token-checked by step.lua):

  1. a direct call of a trivial function (the baseline);
  2. a reused step, its delivery's steps already read (a dict lookup and a JSON decode);
  3. the first step of a delivery, reused (one HGETALL reading the stored steps, then 2);
  4. a step that runs and stores its result (one EVALSHA of step.lua).
Each figure is the median over rounds of the mean per call, in microseconds.

Then (issue 31's other figures):
  5. noop drain with and without steps used by another agent, interleaved pairs
     (benchmarks/drains.py): 20,000 noop tasks (--quick 5,000) drained by 2 worker
     processes, a third serving the agent "stepper" in both arms; "with": 10,000 of its
     tasks (--quick 1,000) ran first, in this process with the workers' code, each storing
     three steps (kept with their records);
  6. enqueue rate, one call per task, on that server: plain, with a new key each call
     (on_conflict="skip", the default), on_conflict="debounce" with a new key each call
     (the conflict script finds nothing, then the enqueue: two round trips), and with one
     hot key (each call moves the one waiting task); the four alternate round by round,
     the server emptied before each; medians over the rounds and the ratio to plain round
     by round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import benchmarks.common as common
from benchmarks import drains
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


# -- a repeated key: debounce beside a plain enqueue --------------------------------------

ENQUEUE_AGENT = "bench-keys"
DEBOUNCE_S = 60.0  # beyond the measurement: no debounced task comes due meanwhile


def enqueue_debounced(client: Client, key: str) -> str:
    """The debounced enqueue measured: a window of DEBOUNCE_S after the last enqueue."""
    return client.enqueue(ENQUEUE_AGENT, {}, key=key, on_conflict="debounce", debounce_s=DEBOUNCE_S)


ENQUEUE_ARMS = {
    "plain": lambda client, i: client.enqueue(ENQUEUE_AGENT, {}),
    "key_skip": lambda client, i: client.enqueue(ENQUEUE_AGENT, {}, key=f"k{i}"),
    "debounce_new_key": lambda client, i: enqueue_debounced(client, f"k{i}"),
    "debounce_hot_key": lambda client, i: enqueue_debounced(client, "hot"),
}


def enqueue_rates(client: Client, flush, rounds: int, calls: int) -> dict:
    """Tasks/s of each arm, rounds interleaved (the order rotating), the server emptied
    before each arm: {"per_s": {arm: spread}, "ratio": {arm: spread of arm / plain}}."""
    rates: dict[str, list[float]] = {name: [] for name in ENQUEUE_ARMS}
    names = list(ENQUEUE_ARMS)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            flush()
            call = ENQUEUE_ARMS[name]
            started = time.perf_counter()
            for i in range(calls):
                call(client, i)
            rates[name].append(calls / (time.perf_counter() - started))
        shown = ", ".join(f"{n} {rates[n][-1]:,.0f}/s" for n in names)
        print(f"enqueue round {r + 1}/{rounds}: {shown}", file=sys.stderr)
    ratios = {
        name: drains.spread([a / b for a, b in zip(v, rates["plain"], strict=True)], 3)
        for name, v in rates.items()
    }
    return {"per_s": {n: drains.spread(v) for n, v in rates.items()}, "ratio": ratios}


# -- drains beside steps ---------------------------------------------------------------------


def store_steps(url: str, tasks: int) -> None:
    """Run `tasks` stepper tasks with the workers' code in this process: 3 steps stored each."""
    from handoff.testing import InProcessApp

    app = InProcessApp("benchmarks.wait_agents", url, agents=["stepper"])
    try:
        for start in range(0, tasks, 1000):
            app.client.enqueue_many("stepper", [{}] * min(1000, tasks - start))
            app.run_until_idle(timeout_s=300, batch=100)
            app.runs.clear()
    finally:
        app.close()


# -- the page --------------------------------------------------------------------------------

ENQUEUE_ROWS = (
    ("plain", "plain enqueue, no key (the reference)"),
    ("key_skip", 'a new key each call, on_conflict="skip" (the default)'),
    ("debounce_new_key", 'on_conflict="debounce", a new key each call'),
    ("debounce_hot_key", 'on_conflict="debounce", one hot key (each call moves its task)'),
)


def render(figures: dict[str, float], meta: dict, enqueue: dict | None = None,
           drain: dict | None = None) -> str:  # fmt: skip
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
        "rounds' mean per call; load average at the start "
        f"{meta['load_avg_at_start']:.2f}; {meta.get('elapsed_s', 0):.0f} s in all)",
        "",
        "| call | µs per call |",
        "|---|---|",
        *(f"| {label} | {figures[key]:,.1f} |" for label, key in rows),
    ]
    if enqueue is not None:
        lines += [
            "",
            f"| enqueue, one call per task ({meta['enqueue_calls']:,} calls x "
            f"{meta['enqueue_rounds']} rounds) | tasks/s p50 | min | max | ÷ plain, round by "
            "round |",
            "|---|---|---|---|---|",
        ]
        for key, label in ENQUEUE_ROWS:
            f, r = enqueue["per_s"][key], enqueue["ratio"][key]
            lines.append(
                f"| {label} | {f['p50']:,.0f} | {f['min']:,.0f} | {f['max']:,.0f} | "
                f"{r['p50']:.2f} ({r['min']:.2f}-{r['max']:.2f}) |"
            )
    if drain is not None:
        lines += [
            "",
            f"| noop drain, 2 worker processes ({meta['drain_tasks']:,} tasks; a third serves "
            "the stepper agent) | tasks/s p50 | min | max |",
            "|---|---|---|---|",
            *drains.drain_rows(
                drain,
                f"{meta['stepper_tasks']:,} stepper tasks ran first (3 steps stored each)",
                "no steps stored",
            ),
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks steps", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, under a minute")
    parser.add_argument("--out", type=Path, default=None, help="write into DIR/benchmarks.md")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = parser.parse_args(argv)
    rounds, calls = (3, 500) if args.quick else (5, 2000)
    meta = {
        "date": time.strftime("%Y-%m-%d"), "server": "local server over TCP loopback",
        "rounds": rounds, "calls": calls, "quick": args.quick,
        "load_avg_at_start": os.getloadavg()[0],
        "enqueue_rounds": 2 if args.quick else 5, "enqueue_calls": 500 if args.quick else 3000,
        "drain_pairs": 1 if args.quick else 5, "drain_tasks": 5_000 if args.quick else 20_000,
        "stepper_tasks": 1_000 if args.quick else 10_000,
    }  # fmt: skip
    started = time.monotonic()
    port = free_tcp_port()
    server = spawn_server(port=port)
    try:
        settings = Settings(redis=RedisPoolConfig(url=f"redis://127.0.0.1:{port}/0"))
        with Client(settings=settings) as client, server.client() as raw:
            figures = measure(client, rounds, calls)
            enqueue = enqueue_rates(
                client, raw.flushall, meta["enqueue_rounds"], meta["enqueue_calls"]
            )
    finally:
        server.stop()
    with common.scratch("handoff-bench-steps-") as tmp:
        drain = drains.drain_pairs(
            tmp, meta["drain_pairs"], meta["drain_tasks"], {"bulk": 2, "stepper": 1},
            {"with": lambda url: store_steps(url, meta["stepper_tasks"]), "without": None},
        )  # fmt: skip
    meta["elapsed_s"] = round(time.monotonic() - started, 1)
    page = render(figures, meta, enqueue, drain)
    print(page)
    if args.out:
        write_generated(args.out / "benchmarks.md", "steps", page)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        everything = {"meta": meta, "step_us": figures, "enqueue": enqueue, "drain": drain}
        args.json.write_text(json.dumps(everything, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
