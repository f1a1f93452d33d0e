"""handoff.testing: run your agents in your tests, for real and at unit-test speed.

The pytest plugin (registered through an entry point, nothing to copy into a conftest)
gives two fixtures:

    handoff_server   the URL of a real server (the embedded one, `handoff[testing]`), one
                     per test session or pytest-xdist worker, emptied before each test
    handoff_app      handoff_app("myapp.agents", agents=[...]) -> InProcessApp

An InProcessApp runs the chosen agents of an app in the test's own process, through the
same protocol as a worker: real claims and leases, the task JSON stored and read back,
payload types checked, results and handoffs settled by the worker's own code. Time is
virtual: retries and delays do not make a test wait.

May import: every layer below (client, runtime, protocol, connection, config).
"""

from __future__ import annotations

import asyncio
import time
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from handoff.client import Client
from handoff.config import RedisPoolConfig, Settings
from handoff.errors import InvalidPayload, RateLimited, ResultTimeout
from handoff.protocol import messages, streams
from handoff.protocol.queue import ClaimRequest, Completion, Failure
from handoff.protocol.runs import run_of, run_state
from handoff.protocol.steps import StepStore
from handoff.protocol.task import Task, agent_of
from handoff.protocol.waits import enqueue_children
from handoff.runtime import tracing
from handoff.runtime.agents import AgentSpec, app_agents
from handoff.runtime.runner import Outcome
from handoff.runtime.settle import check_payload, settle

__all__ = ["Ended", "InProcessApp", "Runs", "VirtualClock"]


class VirtualClock:
    """Milliseconds that move only when told: retries and delays come due at once."""

    def __init__(self, start_ms: int | None = None) -> None:
        self.now_ms = start_ms if start_ms is not None else int(time.time() * 1000)

    def advance(self, seconds: float) -> None:
        self.now_ms += int(seconds * 1000)


@dataclass
class Ended:
    """One task as the in-process run left it."""

    id: str
    agent: str
    status: str  # "done" | "dead" | "retrying"
    result: Any = None  # what the handler returned (a handoff's: the children's ids)
    reason: str = ""  # why it failed, for "dead" and "retrying"
    parent_id: str | None = None
    children: list[str] = field(default_factory=list)
    attempts: int = 0


class Runs(dict[str, Ended]):
    """Every task the agents ran, by id; a run's ends and result are read from the server
    as the client reads them (client.result(root, follow=True)): a join's then-task's
    result, not its branches'."""

    def __init__(self, client: Client) -> None:
        super().__init__()
        self.client = client

    def ends(self, task_id: str) -> list[Ended]:
        """The ends of the run task_id belongs to, in the order they ended. ResultTimeout
        while it has not ended (a task waits for an agent not run here, say)."""
        queue = self.client.queue
        root = queue.run(run_of(queue.keys, task_id))
        state = queue.run(run_state(queue.keys, root, 1000))
        if state.kind in ("single", "dead"):
            status = "done" if state.kind == "single" else "dead"
            return [self.get(root) or Ended(root, agent_of(root), status, reason=state.reason)]
        if state.kind == "ended":
            return [self._end(end) for end in state.ends]
        raise ResultTimeout(f"run {root} has not ended ({state.kind})")

    def result(self, task_id: str) -> Any:
        """The run's result, as client.result(task_id, follow=True) gives it: the single
        end's, or the ends' in order (TaskDead, TaskCancelled for a failed run)."""
        return self.client.result(task_id, 0, follow=True)

    def _end(self, end: dict) -> Ended:
        known = self.get(end.get("id", ""))
        if known is not None:
            return known
        return Ended(end.get("id", ""), end.get("agent", ""), end.get("status", ""),
                     end.get("result"), str(end.get("reason", "")))  # fmt: skip


class InProcessApp:
    """Chosen agents of an app, run in this process against a real server."""

    def __init__(
        self,
        app: str,
        redis_url: str,
        agents: Iterable[str] | None = None,
        *,
        clock: VirtualClock | None = None,
        **settings: Any,
    ) -> None:
        defined = app_agents(app)
        names = list(agents) if agents is not None else sorted(defined)
        unknown = [n for n in names if n not in defined]
        if unknown:
            raise ValueError(f"app {app!r} does not define {', '.join(unknown)}")
        self.specs: dict[str, AgentSpec] = {name: defined[name] for name in names}
        self.settings = Settings(redis=RedisPoolConfig(url=redis_url), app=app, **settings)
        self.client = Client(settings=self.settings)
        self.queue = self.client.queue
        self.steps = StepStore(self.queue, self.settings)  # task.step
        messages.install(self.queue)  # task.receive() in handlers run here
        self.clock = clock or VirtualClock()
        self.runs = Runs(self.client)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._registered = False

    def enqueue(self, agent: str, payload: Any, **options: Any) -> str:
        """Client.enqueue (payload types checked as a producer's would be)."""
        return self.client.enqueue(agent, payload, **options)

    def run_until_idle(self, timeout_s: float = 10.0, batch: int = 100) -> Runs:
        """Run the app's agents until none of them has a task left to run, the virtual
        clock jumping over retry delays. Tasks for agents not chosen stay queued.
        Returns every task run so far (this call and earlier ones)."""
        deadline = time.monotonic() + timeout_s
        if not self._registered:  # as a worker registers its agent (a run cancel marks it)
            self.queue.manager.execute(lambda c: c.sadd(self.queue.keys.agents, *self.specs))
            self._registered = True
        while True:
            ran, next_due = 0, -1
            for name in self.specs:
                count, due = self._run_batch(name, batch, deadline)
                ran += count
                if due >= 0 and (next_due < 0 or due < next_due):
                    next_due = due
            if ran:
                continue
            if next_due < 0:
                return self.runs
            # Nothing ran, something comes due: a retry or delay, or the limiter's next
            # admission (rate, cost, pause, a group's turn), as the claim itself said.
            self.clock.now_ms = max(self.clock.now_ms + 1, next_due)
            if time.monotonic() > deadline:
                raise TimeoutError(f"agents still busy after {timeout_s}s (a handoff loop?)")

    def close(self) -> None:
        if self._loop is not None:
            self._loop.close()
        self.client.close()

    # -- one batch, as a worker would --------------------------------------------------

    def _run_batch(self, name: str, batch: int, deadline: float) -> tuple[int, int]:
        """(tasks run, when the claim said to claim again: ms, -1 for nothing pending)."""
        if time.monotonic() > deadline:
            raise TimeoutError(f"agents still busy after the deadline (agent {name!r})")
        spec = self.specs[name]
        lease_ms = int((spec.lease_s or self.settings.lease_s) * 1000)
        now = self.clock.now_ms
        request = ClaimRequest(
            name, batch, lease_ms, rate=spec.rate, burst=spec.burst,
            group_rate=spec.group_rate, group_concurrency=spec.group_concurrency,
            cost_limit=spec.cost_limit,
        )  # fmt: skip
        claimed = self.queue.claim([request], now_ms=now)
        tasks = claimed[name]
        completions: list[Completion] = []
        failures: list[Failure] = []
        children: list[Task] = []
        for task in tasks:
            if task.max_attempts is None:
                task.max_attempts = spec.max_attempts
            task.emitter = self._emit
            task.step_store = self.steps
            refused = check_payload(spec, task)
            if refused is not None:
                failures.append(refused)
                continue
            outcome = self._call(spec, task)
            if outcome.pause_s is not None:  # RateLimited: back to its place, agent paused
                self.queue.release([task], pause_s=outcome.pause_s)
                continue
            completion, failure, made = settle(outcome, spec, self.settings)
            if failure is not None:
                failures.append(failure)
            else:
                completions.append(completion)
                children.extend(made)
        if children:
            enqueue_children(self.queue, children, now_ms=now)
        if completions:
            self.queue.ack(completions, now_ms=now)
            self.steps.acked(completions)
        if failures:
            self.queue.nack(failures, now_ms=now)
        self._record(completions, failures, children)
        return len(tasks), claimed.next_due_ms.get(name, -1)

    def _call(self, spec: AgentSpec, task: Task) -> Outcome:
        """Run the handler as a worker's runner would: timed, and in a span when
        OpenTelemetry is on."""
        started = time.perf_counter()
        span = None
        try:
            if tracing.active():
                with tracing.task_span(task) as span:
                    outcome = Outcome(task, self._invoke(spec, task))
            else:
                outcome = Outcome(task, self._invoke(spec, task))
        except RateLimited as e:
            outcome = Outcome(task, error=str(e), pause_s=e.retry_after_s)
        except Exception as e:  # the handler's failure is the task's, as in a worker
            error = f"{type(e).__name__}: {e}"
            outcome = Outcome(task, error=error, traceback=traceback.format_exc())
        outcome.elapsed_s = time.perf_counter() - started
        if span is not None:
            outcome.traceparent = span.traceparent
        return outcome

    def _emit(self, task: Task, kind: str, seq: int, blob: bytes) -> None:
        """task.progress / task.emit: straight to the run's stream, as a worker sends them."""
        limit = self.settings.max_event_bytes
        if len(blob) > limit:
            raise InvalidPayload(f"task.{kind}: {len(blob)} bytes, over max_event_bytes ({limit})")
        event = (task.run_id, task.id, task.agent, task.attempt, task.deliveries, kind, seq, blob)
        keep_ms = int(max(60.0, self.settings.result_ttl_s, self.settings.run_ttl_s) * 1000)
        self.queue.manager.execute(
            lambda c: streams.append(
                c, self.queue.keys, [event], self.settings.stream_max_len, keep_ms
            )
        )

    def _invoke(self, spec: AgentSpec, task: Task) -> Any:
        if spec.is_async:
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
            return self._loop.run_until_complete(spec.handler(task))
        return spec.handler(task)

    def _record(self, completions, failures, children: list[Task]) -> None:
        by_parent: dict[str, list[str]] = {}
        for child in children:
            by_parent.setdefault(child.parent_id or "", []).append(child.id)
        for done in completions:
            task = done.task
            ended = self._ended(task)
            ended.status, ended.reason = "done", ""
            ended.children = by_parent.get(task.id, [])
            ended.result = ended.children or orjson.loads(done.result_json)
        for failure in failures:
            task = failure.task
            ended = self._ended(task)
            last = failure.dead_now or task.attempt >= (task.max_attempts or 3)
            ended.status, ended.reason = ("dead" if last else "retrying"), failure.error

    def _ended(self, task: Task) -> Ended:
        ended = self.runs.get(task.id)
        if ended is None:
            ended = self.runs[task.id] = Ended(task.id, task.agent, "", parent_id=task.parent_id)
        ended.attempts += 1
        return ended
