"""The demo: a small team of agents that hand work to each other.

planner -> coder -> reviewer, and the reviewer sometimes sends the code back to the coder
(at most twice), so `./scripts/run` shows real handoffs, retries of a flaky step, and a
chain you can follow with `handoff inspect task ID`. The Procfile runs the team with
`handoff --app workers.demo supervise ...` and feeds it with `python -m workers.demo`.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time

import click

from handoff import Client, Handoff, RedisUnavailable, agent


@agent("planner", max_concurrent=2)
def plan(task):
    """Split a feature request into steps and hand each to the coder (fan-out)."""
    time.sleep(random.uniform(0.01, 0.05))
    feature = task.payload.get("feature", "something")
    steps = task.payload.get("steps", 2)
    return [Handoff("coder", {"feature": feature, "step": i, "round": 1}) for i in range(steps)]


@agent("coder", max_concurrent=4, timeout_s=10, max_attempts=3, retry_delay_s=0.2)
async def write_code(task):
    """Write the code for one step; fails now and then (retried with backoff)."""
    await asyncio.sleep(random.uniform(0.02, 0.1))
    if random.random() < 0.05:
        raise RuntimeError("compiler crashed (simulated flake)")
    code = f"def step_{task.payload['step']}(): ...  # {task.payload['feature']}"
    return Handoff("reviewer", {**task.payload, "code": code})


@agent("reviewer", max_concurrent=2)
def review(task):
    """Approve, or send it back to the coder (at most two rounds)."""
    time.sleep(random.uniform(0.01, 0.04))
    rounds = task.payload.get("round", 1)
    if rounds < 3 and random.random() < 0.3:
        return Handoff("coder", {**task.payload, "round": rounds + 1, "note": "add tests"})
    return {"approved": True, "step": task.payload["step"], "rounds": rounds}


FEATURES = ["login page", "search", "billing", "export to CSV", "dark mode", "audit log"]


def produce(client, *, rate_per_s: float, count: int | None = None) -> int:
    """Feed the planner: `rate_per_s` feature requests a second (forever unless count)."""
    sent = 0
    interval = 1.0 / rate_per_s
    next_at = time.monotonic()
    while count is None or sent < count:
        client.enqueue(
            "planner", {"feature": random.choice(FEATURES), "steps": random.randint(1, 3)}
        )
        sent += 1
        next_at += interval
        pause = next_at - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    return sent


def _wait_for_server(client: Client, timeout_s: float = 30.0) -> None:
    """The producer may start before the server (honcho starts everything at once)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.agents()
            return
        except RedisUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _stop(_signum, _frame) -> None:
    raise KeyboardInterrupt


@click.command()
@click.option("--rate", type=click.FloatRange(0.01, 100_000), default=2.0, help="Tasks a second.")
@click.option("--count", type=click.IntRange(1), default=None, help="Stop after this many.")
def main(rate: float, count: int | None) -> None:
    """Feed the demo planner with feature requests (REDIS_URL, or the embedded server)."""
    with Client() as client:
        _wait_for_server(client)
        click.echo(f"demo producer: {rate:g} feature request(s)/s to planner", err=True)
        signal.signal(signal.SIGTERM, _stop)
        try:
            sent = produce(client, rate_per_s=rate, count=count)
        except KeyboardInterrupt:
            sent = None
    click.echo(
        "demo producer: stopped" if sent is None else f"demo producer: sent {sent}", err=True
    )


if __name__ == "__main__":
    main()
