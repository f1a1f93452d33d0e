"""The runtime: agent definitions, the runner (capability-limited concurrency), the worker
process, the supervisor that forks them, and the schedules it fires.

May import: handoff.protocol and the layers below it. Nothing above it.
"""
