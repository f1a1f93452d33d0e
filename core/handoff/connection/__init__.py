"""The Redis connection layer: the per-process pool manager, retry, circuit breaker,
topology (one server, Sentinel, Cluster), script calls grouped per cluster node, the
outage log, server checks, the embedded development server, kernel-kept socket timeouts
for plain TCP (kernel_timeouts.py) and the pid kept across fork (process.py).

May import: handoff.config, handoff.errors, handoff.backoff. Nothing above it.
"""
