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
from pydantic import BaseModel, Field

from handoff import Client, Handoff, RedisUnavailable, agent


class FeatureRequest(BaseModel):
    feature: str = "something"
    steps: int = Field(default=2, ge=1, le=10)


class CodeStep(BaseModel):
    feature: str
    step: int
    round: int = 1
    note: str = ""


class CodeForReview(CodeStep):
    code: str


class Review(BaseModel):
    approved: bool
    step: int
    rounds: int


@agent("planner", max_concurrent=2, payload=FeatureRequest)
def plan(task):
    """Split a feature request into steps and hand each to the coder (fan-out)."""
    time.sleep(random.uniform(0.01, 0.05))
    request = task.payload
    return [
        Handoff("coder", CodeStep(feature=request.feature, step=i)) for i in range(request.steps)
    ]


@agent("coder", max_concurrent=4, timeout_s=10, max_attempts=3, retry_delay_s=0.2, payload=CodeStep)
async def write_code(task):
    """Write the code for one step; fails now and then (retried with backoff)."""
    await asyncio.sleep(random.uniform(0.02, 0.1))
    if random.random() < 0.05:
        raise RuntimeError("compiler crashed (simulated flake)")
    step = task.payload
    code = f"def step_{step.step}(): ...  # {step.feature}"
    return Handoff("reviewer", CodeForReview(**step.model_dump(), code=code))


@agent("reviewer", max_concurrent=2, payload=CodeForReview, result=Review)
def review(task):
    """Approve, or send it back to the coder (at most two rounds)."""
    time.sleep(random.uniform(0.01, 0.04))
    work = task.payload
    if work.round < 3 and random.random() < 0.3:
        again = CodeStep(feature=work.feature, step=work.step, round=work.round + 1)
        return Handoff("coder", again.model_copy(update={"note": "add tests"}))
    return Review(approved=True, step=work.step, rounds=work.round)


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
