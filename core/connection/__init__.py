"""The Redis connection layer: the per-process pool manager, retry, circuit breaker,
topology (one server, Sentinel, Cluster), script calls grouped per cluster node, the
outage log, server checks and the embedded development server.

May import: handoff.config, handoff.errors, handoff.backoff. Nothing above it.
"""
