"""The queue protocol: key names, the task model, the Lua scripts (one atomic operation
each, the `.lua` files beside them), the queue operations and read-only inspection.

May import: handoff.connection and the layers below it. Nothing above it.
"""
