"""Prometheus text exposition of the monitor's latest snapshot (prometheus-client).

Runs in: `handoff monitor --metrics-port N`. A custom collector turns the snapshot the
monitor loop already built into metric families at scrape time: a scrape costs no Redis
call. Names follow Prometheus conventions: `handoff_` prefix, `_total` for counters,
units in names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

AGENT_GAUGES = (
    ("queued", "handoff_queue_depth", "Tasks ready to run."),
    ("running", "handoff_tasks_running", "Tasks leased by a worker."),
    ("delayed", "handoff_tasks_delayed", "Tasks waiting for their time (retries, delays)."),
    ("dead", "handoff_dead_letters", "Tasks in the dead-letter queue."),
    (
        "waiting",
        "handoff_tasks_waiting",
        "Then-tasks of Waits parked until their event is signalled or they time out.",
    ),
    ("oldest_queued_age_s", "handoff_oldest_queued_age_seconds", "Age of the queue's head."),
    (
        "oldest_wait_age_s",
        "handoff_oldest_wait_age_seconds",
        "How long the oldest parked wait has waited (0: none waiting).",
    ),
    ("throughput_per_s", "handoff_throughput_tasks_per_second", "Tasks done per second."),
    ("workers", "handoff_workers", "Live worker processes."),
    ("max_concurrent", "handoff_capacity_slots", "Handler slots across live workers."),
    ("paused_s", "handoff_paused_seconds", "Time left in a pause a handler's RateLimited began."),
    (
        "rate_ahead_s",
        "handoff_rate_limit_ahead_seconds",
        "How far the start-rate limiter's schedule runs ahead of now (0: not limiting).",
    ),
    (
        "cost_ahead_s",
        "handoff_cost_limit_ahead_seconds",
        "How far the cost limiter's schedule runs ahead of now (the window spent ahead).",
    ),
    ("groups_ready", "handoff_groups_ready", "Groups with ready tasks in the rotation."),
    (
        "groups_waiting",
        "handoff_groups_waiting",
        "Groups waiting for their start rate or a RateLimited pause.",
    ),
)
AGENT_COUNTERS = (
    ("enqueued", "handoff_tasks_enqueued", "Tasks enqueued."),
    ("done", "handoff_tasks_done", "Tasks finished."),
    ("failed", "handoff_tasks_failed", "Handler failures."),
    ("expired", "handoff_tasks_expired", "Tasks not started by their deadline (never run)."),
    ("cancelled", "handoff_tasks_cancelled", "Tasks cancelled (queued, delayed or running)."),
    ("retried", "handoff_tasks_retried", "Failures scheduled for a retry."),
    ("handed_off", "handoff_handoffs", "Child tasks handed to other agents."),
)
WORKER_GAUGES = (
    ("rss_mb", "handoff_worker_rss_bytes", "Resident memory.", 1024 * 1024),
    ("cpu_percent", "handoff_worker_cpu_percent", "CPU use since the last heartbeat.", 1),
    ("in_flight", "handoff_worker_in_flight", "Tasks held (running or prefetched).", 1),
    ("healthy", "handoff_worker_healthy", "1 when healthy.", 1),
)
GROUP_GAUGES = (  # per agent, its busiest groups (inspect.BUSIEST_GROUPS)
    ("ready", "handoff_group_ready", "Ready tasks of one of the agent's busiest groups."),
    ("running", "handoff_group_running", "Running tasks of that group."),
    ("waiting_s", "handoff_group_waiting_seconds", "How long that group waits (rate, pause)."),
)
POOL_GAUGES = (
    ("total_conns", "handoff_pool_connections", "Open connections in the pool."),
    ("idle_conns", "handoff_pool_idle_connections", "Idle connections in the pool."),
)
POOL_COUNTERS = (
    ("hits", "handoff_pool_hits", "Connections reused from the pool."),
    ("misses", "handoff_pool_misses", "Connections that had to be opened."),
    ("timeouts", "handoff_pool_timeouts", "Waits for a connection past pool_timeout_s."),
)


class SnapshotCollector(Collector):
    def __init__(self, latest: Callable[[], dict[str, Any] | None]) -> None:
        self.latest = latest

    def collect(self) -> Iterator:
        snapshot = self.latest() or {"healthy": False, "agents": {}, "workers": []}
        up = GaugeMetricFamily("handoff_healthy", "1 when Redis and every worker are healthy.")
        up.add_metric([], 1.0 if snapshot.get("healthy") else 0.0)
        yield up
        agents = snapshot.get("agents", {})
        for field, name, doc in AGENT_GAUGES:
            family = GaugeMetricFamily(name, doc, labels=["agent"])
            for agent, values in agents.items():
                family.add_metric([agent], float(values.get(field) or 0))
            yield family
        for field, name, doc in AGENT_COUNTERS:
            family = CounterMetricFamily(name, doc, labels=["agent"])
            for agent, values in agents.items():
                family.add_metric([agent], float(values.get(field) or 0))
            yield family
        latency = GaugeMetricFamily(
            "handoff_task_latency_seconds", "Handler run time.", labels=["agent", "quantile"]
        )
        for agent, values in agents.items():
            latency.add_metric([agent, "0.5"], values.get("latency_p50_ms", 0) / 1000.0)
            latency.add_metric([agent, "0.95"], values.get("latency_p95_ms", 0) / 1000.0)
        yield latency
        for field, name, doc in GROUP_GAUGES:
            family = GaugeMetricFamily(name, doc, labels=["agent", "group"])
            for agent, values in agents.items():
                for group in values.get("busiest_groups") or []:
                    family.add_metric([agent, group["group"]], float(group.get(field) or 0))
            yield family
        yield from self._workers(snapshot.get("workers", []))

    def _workers(self, workers: list[dict[str, Any]]) -> Iterator:
        labels = ["worker", "agent"]
        for field, name, doc, scale in WORKER_GAUGES:
            family = GaugeMetricFamily(name, doc, labels=labels)
            for w in workers:
                family.add_metric([w["id"], w["agent"]], float(w.get(field) or 0) * scale)
            yield family
        processed = CounterMetricFamily(
            "handoff_worker_processed", "Tasks finished by this worker.", labels=labels
        )
        for w in workers:
            processed.add_metric([w["id"], w["agent"]], float(w.get("processed") or 0))
        yield processed
        for field, name, doc in POOL_GAUGES:
            family = GaugeMetricFamily(name, doc, labels=labels)
            for w in workers:
                family.add_metric([w["id"], w["agent"]], float(w.get("pool", {}).get(field, 0)))
            yield family
        for field, name, doc in POOL_COUNTERS:
            family = CounterMetricFamily(name, doc, labels=labels)
            for w in workers:
                family.add_metric([w["id"], w["agent"]], float(w.get("pool", {}).get(field, 0)))
            yield family


def serve(port: int, latest: Callable[[], dict[str, Any] | None], addr: str = "0.0.0.0"):
    """Serve /metrics on port in a daemon thread; returns (server, thread)."""
    from prometheus_client import start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(latest))
    return start_http_server(port, addr=addr, registry=registry)
