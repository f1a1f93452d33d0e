"""OpenTelemetry traces across handoffs: each task a span, a run one trace.

Runs in: producers (the current span becomes the parent of the run it enqueues; with
none current, a producer span "handoff enqueue AGENT" of its own does) and
workers (a span around each handler, current while it runs, so the handler's own spans
nest under it). Only with the `otel` extra installed and tracing configured: a tracer
provider set by the application, or the standard OTEL_* environment (OTEL_TRACES_EXPORTER,
OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT), from which handoff sets up the SDK itself. Without
the extra nothing is imported (one find_spec per process); installed but not configured,
a handoff process makes no span.

The context travels in the task as a W3C traceparent (task.traceparent, "tp" in its JSON):
a child, a fan-out's tasks, a join's branches and its then-task carry the span of the task
that created them, so the run tree and the trace have the same shape. A span lasts the
handler's run (the tree's ran_ms); the time queued is its attribute
handoff.queue_wait_ms and the event "enqueued" at the enqueue time.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_installed: bool | None = None
_configured_from_env = False
_env_says = "nothing"  # off (OTEL_SDK_DISABLED) | exporter (OTEL_* names one) | nothing
_provider: Any = None  # set_provider(): this one instead of the global tracer provider
_ENV_SWITCHES = (
    "OTEL_TRACES_EXPORTER",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
)


def active() -> bool:
    """Whether spans are made in this process (cheap after the first call: a producer
    asks on every enqueue). The OTEL_* environment is read once per process; a tracer
    provider the application sets up later is seen at once."""
    global _installed, _env_says
    if _provider is not None:
        return True
    if _installed is None:
        try:
            _installed = importlib.util.find_spec("opentelemetry") is not None
        except (ImportError, ValueError):
            _installed = False
        disabled = os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true"
        exporter = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
        named = exporter != "none" and any(os.environ.get(name) for name in _ENV_SWITCHES)
        _env_says = "off" if disabled else "exporter" if named else "nothing"
    if not _installed or _env_says == "off":
        return False
    if _global_provider_set():
        return True  # the application set one up
    return _env_says == "exporter" and _configure_from_env()


_trace_api: Any = None  # opentelemetry.trace, once imported
_env_provider = False  # OTEL_PYTHON_TRACER_PROVIDER names one (read once, on first use)
_MISSING = object()


def _global_provider_set() -> bool:
    """Whether a global tracer provider is set. Asked on every enqueue of a process that
    has the extra installed: otel's getter reads the environment each time (10 us of a
    250 us enqueue, cold), so its module variable is read when it has one."""
    global _trace_api, _env_provider
    if _trace_api is None:
        from opentelemetry import trace

        _env_provider = "OTEL_PYTHON_TRACER_PROVIDER" in os.environ
        _trace_api = trace
    trace = _trace_api
    if getattr(trace, "_TRACER_PROVIDER", _MISSING) is None and not _env_provider:
        return False  # nothing set, and the getter would make nothing
    return not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)


def _configure_from_env() -> bool:
    """The standard environment names an exporter: set the SDK up with it, once."""
    global _configured_from_env
    if _configured_from_env:
        return True
    exporter_name = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter_name == "none" or not any(os.environ.get(name) for name in _ENV_SWITCHES):
        return False
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    if exporter_name == "console":
        exporter: Any = ConsoleSpanExporter()
    else:  # otlp, the default
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter()
    service = os.environ.get("OTEL_SERVICE_NAME", "handoff")
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _configured_from_env = True
    return True


def set_provider(provider: Any) -> None:
    """Make spans with this tracer provider rather than the global one (None: back to
    the global): for a process that keeps its own, and for tests, which cannot unset a
    global provider once set."""
    global _provider
    _provider = provider


def current_traceparent(agent: str = "") -> str | None:
    """The parent span of the run a producer starts, as a traceparent: its current span,
    or, when none is current (a script configured by the OTEL_* environment alone), a
    producer span of its own, so a producer records the same as a worker. None when
    tracing is off."""
    if not active():
        return None
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    propagator = TraceContextTextMapPropagator()
    carrier: dict[str, str] = {}
    propagator.inject(carrier)
    if "traceparent" in carrier:
        return carrier["traceparent"]
    tracer = trace.get_tracer("handoff", tracer_provider=_provider)
    name = f"handoff enqueue {agent}" if agent else "handoff enqueue"
    span = tracer.start_span(
        name, kind=trace.SpanKind.PRODUCER, attributes={"handoff.agent": agent}
    )
    span.end()
    propagator.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent")


class SpanHandle:
    """The running task's span: its traceparent goes to the tasks it creates."""

    __slots__ = ("traceparent",)

    def __init__(self) -> None:
        self.traceparent: str | None = None


@contextmanager
def task_span(task) -> Iterator[SpanHandle]:
    """A span around one run of a task's handler, current while it runs; an exception
    passing through marks it failed (and goes on)."""
    from opentelemetry import trace
    from opentelemetry.trace import Status, StatusCode
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    propagator = TraceContextTextMapPropagator()
    parent = propagator.extract({"traceparent": task.traceparent}) if task.traceparent else None
    tracer = trace.get_tracer("handoff", tracer_provider=_provider)
    started_ns = time.time_ns()
    wait_ms = max(0, started_ns // 1_000_000 - task.enqueued_at) if task.enqueued_at else 0
    attributes = {
        "handoff.task_id": task.id,
        "handoff.agent": task.agent,
        "handoff.run_id": task.run_id,
        "handoff.attempt": task.attempt,
        "handoff.queue_wait_ms": wait_ms,
    }
    if task.parent_id:
        attributes["handoff.parent_id"] = task.parent_id
    span = tracer.start_span(
        f"handoff {task.agent}", context=parent, kind=trace.SpanKind.CONSUMER,
        attributes=attributes, start_time=started_ns,
    )  # fmt: skip
    if task.enqueued_at:
        span.add_event("enqueued", timestamp=task.enqueued_at * 1_000_000)
    handle = SpanHandle()
    carrier: dict[str, str] = {}
    propagator.inject(carrier, context=trace.set_span_in_context(span))
    handle.traceparent = carrier.get("traceparent")
    try:
        with trace.use_span(span, end_on_exit=False, record_exception=False):
            yield handle
    except BaseException as e:
        span.record_exception(e)
        span.set_status(Status(StatusCode.ERROR, f"{type(e).__name__}: {e}"[:200]))
        raise
    finally:
        span.end()


def flush() -> None:
    """Export what is buffered (a worker about to exit: its process ends with os._exit)."""
    if _installed and active():
        from opentelemetry import trace

        provider = _provider or trace.get_tracer_provider()
        force_flush = getattr(provider, "force_flush", None)
        if force_flush is not None:
            force_flush(2000)
