"""OpenTelemetry (issue 18): a run is one trace whose spans have the run tree's shape, with
the SDK's in-memory exporter; and a process without tracing makes no span."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("opentelemetry.sdk", reason="the otel extra: pip install 'handoff[otel]'")

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)

from handoff.runtime import tracing
from handoff.testing import InProcessApp
from workers.demo import approval_event

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def exporter():
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    tracing.set_provider(provider)
    yield spans, provider
    tracing.set_provider(None)


def _nodes(node: dict, parent: dict | None = None):
    """(node, its parent in the tree) for every task: children, and a join's then-task
    under the task that joined."""
    yield node, parent
    for child in node.get("children", []):
        yield from _nodes(child, node)
    if node.get("then"):
        yield from _nodes(node["then"], node)


def test_a_demo_run_is_one_trace_shaped_like_its_tree(exporter, redis_url):
    spans, provider = exporter
    random.seed(18)  # the demo's reviewers send some work back: a deeper tree
    app = InProcessApp("workers.demo", redis_url)
    try:
        with provider.get_tracer("test").start_as_current_span("http request") as request:
            root = app.enqueue("planner", {"feature": "search", "steps": 3})
        # approved before the merge asks (a signal is kept): the run goes through at once
        app.client.signal(approval_event("search", root), {"approved": True, "by": "ann"})
        app.run_until_idle()
        tree = app.client.tree(root)
    finally:
        app.close()
    finished = spans.get_finished_spans()
    (outer,) = [s for s in finished if s.name == "http request"]
    by_task: dict[str, object] = {}
    for span in finished:
        if span is outer:
            continue
        assert span.context.trace_id == request.get_span_context().trace_id  # one trace
        task_id = span.attributes["handoff.task_id"]
        kept = by_task.get(task_id)
        if kept is None or span.attributes["handoff.attempt"] > kept.attributes["handoff.attempt"]:
            by_task[task_id] = span  # a retried coder: its last attempt is the tree's
    pairs = list(_nodes(tree))
    assert {node["id"] for node, _ in pairs} == set(by_task)
    agents = {node["agent"] for node, _ in pairs}
    assert agents == {"planner", "coder", "reviewer", "integrator", "merger"}
    for node, parent in pairs:
        span = by_task[node["id"]]
        assert span.name == f"handoff {node['agent']}"
        expected_parent = outer if parent is None else by_task[parent["id"]]
        assert span.parent.span_id == expected_parent.context.span_id, node["id"]
        duration_ms = (span.end_time - span.start_time) / 1e6
        assert abs(duration_ms - node["ran_ms"]) < 5, (node["id"], duration_ms, node["ran_ms"])
        assert span.attributes["handoff.run_id"] == root
        assert span.attributes["handoff.queue_wait_ms"] >= 0


_BLOCK_OTEL = """
import importlib.abc, sys
class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "opentelemetry":
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, NotInstalled())
"""

_RUN = """
from handoff.runtime import tracing
from handoff.testing import InProcessApp
from workers.demo import approval_event
app = InProcessApp("apps.flows", URL, agents=["echo"])
root = app.enqueue("echo", {"next": "echo", "i": 1})
runs = app.run_until_idle()
assert tracing.active() is False and tracing.current_traceparent() is None
assert len(runs) == 2 and all(r.status == "done" for r in runs.values())
stored = app.client.task(root)
app.close()
print(sorted(m for m in sys.modules if m.startswith("opentelemetry")), end=" ")
"""


@pytest.mark.parametrize("installed", [False, True])
def test_without_tracing_configured_handoff_makes_no_span(installed, redis_url, tmp_path):
    """Not installed (its import refused): handoff runs and imports none of it. Installed
    but not configured (no provider, no OTEL_* exporter): no provider is set up, no span."""
    code = "import sys\n" + ("" if installed else _BLOCK_OTEL) + f"URL = {redis_url!r}\n" + _RUN
    if installed:
        code += (
            "\nfrom opentelemetry import trace\n"
            "print(isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider))"
        )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": "core:tests", "TEST_REDIS_URL": redis_url}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-2000:]
    proxy = out.stdout.strip().rpartition("] ")[2]
    if installed:
        assert proxy == "True"  # (redis-py imports some of it by itself when installed)
    else:
        assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_workers_runner_runs_each_handler_inside_its_span(kind, exporter):
    """The worker's runners (handler threads, the event loop): the handler's own spans
    nest under the task's span, which is a child of the task's traceparent; the outcome
    carries the task's span for its children; a failure marks the span."""
    import queue

    from handoff.protocol.task import Task
    from handoff.runtime.agents import AgentSpec
    from handoff.runtime.runner import make_runner

    spans, provider = exporter
    inner = provider.get_tracer("user code")

    def handler(task):
        with inner.start_as_current_span("llm call"):
            if task.payload == "fail":
                raise RuntimeError("boom")
        return "ok"

    async def async_handler(task):
        return handler(task)

    with provider.get_tracer("test").start_as_current_span("producer") as producer:
        traceparent = tracing.current_traceparent()
    spec = AgentSpec(f"{kind}-agent", handler if kind == "sync" else async_handler, 2)
    outcomes: queue.SimpleQueue = queue.SimpleQueue()
    runner = make_runner(spec, outcomes.put)
    tasks = [
        Task(f"{kind}-agent.{i}", f"{kind}-agent", payload, traceparent=traceparent)
        for i, payload in enumerate(["ok", "fail"])
    ]
    runner.submit(tasks)
    got = []
    while len(got) < 2:
        item = outcomes.get(timeout=10)
        got += getattr(item, "outcomes", [item])
    runner.stop()
    finished = {s.name: s for s in spans.get_finished_spans() if s.name != "producer"}
    task_spans = [s for s in spans.get_finished_spans() if s.name == f"handoff {kind}-agent"]
    assert len(task_spans) == 2 and len(finished) >= 2
    for span in task_spans:
        assert span.parent.span_id == producer.get_span_context().span_id
    llm_calls = [s for s in spans.get_finished_spans() if s.name == "llm call"]
    assert {c.parent.span_id for c in llm_calls} == {s.context.span_id for s in task_spans}
    failed = next(s for s in task_spans if s.attributes["handoff.task_id"].endswith(".1"))
    assert failed.status.status_code.name == "ERROR" and "boom" in failed.status.description
    by_id = {o.task.id: o for o in got}
    ok_span = next(s for s in task_spans if s.attributes["handoff.task_id"].endswith(".0"))
    assert by_id[f"{kind}-agent.0"].traceparent.split("-")[2] == f"{ok_span.context.span_id:016x}"


_PRODUCER = """
from handoff import Client
client = Client(URL)
task_id = client.enqueue("echo", {"i": 1})
print("TP", client.task(task_id)["task"]["tp"])
client.close()
"""


def test_a_producer_configured_by_the_environment_alone_records_the_runs_parent(redis_url):
    """OTEL_* variables and no code: the producer makes a span of its own for the enqueue
    (no span is current in a plain script) and the run's root carries it as its parent,
    as a worker configured the same way records its tasks' spans."""
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": "core:tests",
        "OTEL_TRACES_EXPORTER": "console",
        "OTEL_SERVICE_NAME": "producer-under-test",
    }
    code = f"URL = {redis_url!r}\n" + _PRODUCER
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-2000:]
    traceparent = next(line for line in out.stdout.splitlines() if line.startswith("TP "))[3:]
    _version, trace_id, span_id, _flags = traceparent.split("-")
    assert int(trace_id, 16) != 0
    exported = out.stdout[out.stdout.index("{") :]
    assert '"name": "handoff enqueue echo"' in exported
    assert f'"trace_id": "0x{trace_id}"' in exported and f'"span_id": "0x{span_id}"' in exported
    assert '"kind": "SpanKind.PRODUCER"' in exported
