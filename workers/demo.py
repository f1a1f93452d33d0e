"""The demo: a small team of agents that hand work to each other.

planner -> coders -> reviewers -> integrator -> (a person approves) -> merger: the planner
splits a feature into steps and joins them (Join), each step goes coder -> reviewer, and
the reviewer sometimes sends the code back to the coder (at most twice); when every step
has ended the integrator merges the approved ones, then waits (Wait) for the event
approve:<feature>@<run> before the merger publishes the merge, or says it was rejected
or that nobody answered. `./scripts/run` shows real handoffs, retries of a flaky step, a
join, runs waiting for their approval, and runs you can look at with `handoff inspect
tree ID`. The Procfile runs the team with `handoff --app workers.demo supervise ...` and
feeds it with `python -m workers.demo`, which also plays the person who approves (most
merges approved, some rejected, each after 1-5 s) and prints each feature's end as its
run ends (result(follow=True)).
"""

from __future__ import annotations

import asyncio
import random
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import click
from pydantic import BaseModel, Field

from handoff import (
    Client,
    Handoff,
    HandoffError,
    Join,
    RedisUnavailable,
    ResultTimeout,
    Wait,
    agent,
)


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


class Merged(BaseModel):
    feature: str
    approved_steps: list[int]
    review_rounds: int
    failed_steps: list[int]


class Published(BaseModel):
    merged: Merged
    verdict: str  # "approved" | "rejected" | "timed out"
    by: str | None = None  # who answered
    published: bool


APPROVAL_TIMEOUT_S = 30.0  # how long a merge waits for its approval


def approval_event(feature: str, run_id: str) -> str:
    """The event a feature's merge waits for: approve:<feature>@<run id>. The run id makes
    it unique (the same feature is asked for again and again, and a signal is kept for
    signal_ttl_s); the feature is cut to the characters an event name allows."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", feature).strip("-")[:40] or "feature"
    return f"approve:{slug}@{run_id}"


@agent("planner", max_concurrent=2, payload=FeatureRequest)
def plan(task):
    """Split a feature request into steps, one branch each, joined by the integrator."""
    time.sleep(random.uniform(0.01, 0.05))
    request = task.payload
    task.progress(1.0, note=f"{request.feature}: {request.steps} step(s)")  # `handoff watch`
    steps = [
        Handoff("coder", CodeStep(feature=request.feature, step=i)) for i in range(request.steps)
    ]
    then = Handoff("integrator", FeatureRequest(feature=request.feature, steps=request.steps))
    return Join(steps, then=then, on_dead="continue")


@agent("coder", max_concurrent=4, timeout_s=10, max_attempts=3, retry_delay_s=0.2, payload=CodeStep)
async def write_code(task):
    """Write the code for one step; fails now and then (retried with backoff)."""
    await asyncio.sleep(random.uniform(0.02, 0.1))
    if random.random() < 0.05:
        raise RuntimeError("compiler crashed (simulated flake)")
    step = task.payload
    code = f"def step_{step.step}(): ...  # {step.feature}"
    task.emit({"step": step.step, "round": step.round, "code": code})  # partial output
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


@agent("integrator", max_concurrent=2, payload=FeatureRequest)
def integrate(task):
    """Merge the approved steps once every step has ended (task.branches: one list of
    ends per step, in order; a step whose coder kept failing ended dead), then wait for
    a person to approve the merge: no process is held meanwhile. Nobody answering within
    APPROVAL_TIMEOUT_S is an answer too (on_timeout="continue"): the merger runs and
    says so, and the dead-letter list stays for tasks that broke."""
    approved, failed, rounds = [], [], 0
    for index, ends in enumerate(task.branches):
        reviews = [end["result"] for end in ends if end["status"] == "done"]
        if reviews and all(r["approved"] for r in reviews):
            approved.append(index)
            rounds += sum(r["rounds"] for r in reviews)
        else:
            failed.append(index)
    merged = Merged(
        feature=task.payload.feature,
        approved_steps=approved,
        review_rounds=rounds,
        failed_steps=failed,
    )
    return Wait(
        approval_event(task.payload.feature, task.run_id),
        then=Handoff("merger", merged),
        timeout_s=APPROVAL_TIMEOUT_S,
        on_timeout="continue",
    )


@agent("merger", max_concurrent=4, payload=Merged, result=Published)
def publish(task):
    """Publish the merge if it was approved. task.event is the signal's data:
    {"approved": false, "by": ...} rejects, anything else approves (`handoff signal
    approve:... ` with no data too); task.timed_out: nobody answered in time."""
    answer = task.event if isinstance(task.event, dict) else {}
    if task.timed_out:
        verdict = "timed out"
    elif answer.get("approved", True) is False:
        verdict = "rejected"
    else:
        verdict = "approved"
    by = answer.get("by")
    return Published(
        merged=task.payload,
        verdict=verdict,
        by=None if by is None else str(by),
        published=verdict == "approved",
    )


WAITERS = 32  # runs followed at once by the producer (each blocks in Redis, no polling)
FOLLOW_S = 120.0  # how long the producer waits for one feature's run
FEATURES = ["login page", "search", "billing", "export to CSV", "dark mode", "audit log"]
APPROVERS = ["ann", "bob", "chen"]
APPROVE_SHARE = 0.8  # the rest are rejected
THINK_S = (1.0, 5.0)  # how long the approver takes to answer


def produce(client, *, rate_per_s: float, count: int | None = None, report=None) -> int:
    """Feed the planner: `rate_per_s` feature requests a second (forever unless count).
    report(root_id) is called after each enqueue (the CLI waits for the run there)."""
    sent = 0
    interval = 1.0 / rate_per_s
    next_at = time.monotonic()
    while count is None or sent < count:
        root = client.enqueue(
            "planner", {"feature": random.choice(FEATURES), "steps": random.randint(1, 3)}
        )
        if report is not None:
            report(root)
        sent += 1
        next_at += interval
        pause = next_at - time.monotonic()
        if pause > 0:
            time.sleep(pause)
    return sent


def describe_end(root: str, end: dict) -> str:
    """One line per finished feature: what the integrator merged, and its approval."""
    merged = end["merged"]
    approved = ", ".join(str(i) for i in merged["approved_steps"]) or "none"
    line = f"{merged['feature']!r} ({root}): merged step(s) {approved}"
    line += f" after {merged['review_rounds']} review round(s)"
    if merged["failed_steps"]:
        line += f"; failed: {', '.join(str(i) for i in merged['failed_steps'])}"
    if end["verdict"] == "timed out":
        return line + f"; approval timed out after {APPROVAL_TIMEOUT_S:.0f}s: not published"
    line += f"; {end['verdict']} by {end['by'] or 'someone'}"
    return line + ("" if end["published"] else ": not published")


class Stopped(Exception):
    """The producer is stopping: leave the run alone."""


class Follower:
    """What the producer does for each run it started, in a thread of its pool: play the
    person who approves (answer the integrator's question after a moment's thought),
    then wait for the run's end and print it. Every wait blocks in Redis, a second at a
    time, so a stop is seen within a second."""

    def __init__(self, client: Client, stopping: threading.Event) -> None:
        self.client = client
        self.stopping = stopping

    def __call__(self, root: str) -> None:
        try:
            self.approve(root)
            end = self.result(root, follow=True)
        except Stopped:
            return
        except ResultTimeout:
            click.echo(f"demo: {root}: not done after {FOLLOW_S:.0f}s", err=True)
            return
        except HandoffError as e:
            if not self.stopping.is_set():  # a stop may take the server down first
                click.echo(f"demo: {root}: {e}", err=True)
            return
        click.echo(f"demo: feature {describe_end(root, end)}")

    def approve(self, root: str) -> None:
        """Wait for the integrator to ask (its result names the event its merge waits
        for), think THINK_S, then approve (APPROVE_SHARE of the time) or reject."""
        join = self.result(root)["join"]  # the planner's own result: its join
        asked = self.result(join["then"])  # the integrator's: {"wait": {"event", "then"}}
        if self.stopping.wait(random.uniform(*THINK_S)):
            raise Stopped
        answer = {"approved": random.random() < APPROVE_SHARE, "by": random.choice(APPROVERS)}
        self.client.signal(asked["wait"]["event"], answer)

    def result(self, task_id: str, *, follow: bool = False):
        """client.result in blocking calls of a second, up to FOLLOW_S in all."""
        deadline = time.monotonic() + FOLLOW_S
        while not self.stopping.is_set():
            try:
                return self.client.result(task_id, 1.0, follow=follow)
            except ResultTimeout:
                if time.monotonic() >= deadline:
                    raise
        raise Stopped


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
    """Feed the demo planner with feature requests (REDIS_URL, or the embedded server),
    approve or reject each merge, and print each feature's end."""
    stopping = threading.Event()
    pool = ThreadPoolExecutor(WAITERS, thread_name_prefix="follow")
    with Client() as client:
        _wait_for_server(client)
        click.echo(f"demo producer: {rate:g} feature request(s)/s to planner", err=True)
        signal.signal(signal.SIGTERM, _stop)
        follow = Follower(client, stopping)
        try:
            sent = produce(
                client, rate_per_s=rate, count=count, report=lambda r: pool.submit(follow, r)
            )
            pool.shutdown(wait=True)  # --count: print every run's end before exiting
        except KeyboardInterrupt:
            sent = None
        finally:
            stopping.set()
            pool.shutdown(wait=True, cancel_futures=True)
    click.echo(
        "demo producer: stopped" if sent is None else f"demo producer: sent {sent}", err=True
    )


if __name__ == "__main__":
    main()
