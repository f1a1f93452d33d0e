"""The runtime: agent definitions, the runner (capability-limited concurrency), the worker
process and the supervisor that forks them.

May import: handoff.protocol and the layers below it. Nothing above it.
"""
