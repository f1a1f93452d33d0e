"""Agents for the stream tests: they emit as they work.

payloads: talker {"n": chunks, "sleep_s": between chunks, "die_at": on its first delivery,
SIGKILL its own worker after this many chunks}; relay {"n", "sleep_s"}: progress, then a
handoff to talker.
"""

from __future__ import annotations

import os
import signal
import time

from handoff import Handoff, agent


@agent("talker", max_concurrent=4)
def talker(task):
    p = task.payload
    for i in range(p["n"]):
        if task.deliveries == 1 and i == p.get("die_at", -1):
            os.kill(os.getpid(), signal.SIGKILL)  # the worker dies mid-stream
        task.emit({"i": i, "at_ms": time.time() * 1000})
        time.sleep(p.get("sleep_s", 0))
    return {"chunks": p["n"]}


@agent("relay", max_concurrent=4)
def relay(task):
    for step in range(3):
        task.progress(step / 3, note=f"planning step {step}")
    task.progress(1.0, note="handing off")
    return Handoff("talker", {"n": task.payload["n"], "sleep_s": task.payload["sleep_s"]})


@agent("chatty", max_concurrent=2)
async def chatty(task):
    """An async handler: emit from a coroutine; a bad emit is the handler's to catch."""
    errors = []
    for bad in (object(), "x" * (task.payload.get("too_big", 0))):
        try:
            task.emit(bad)
        except ValueError as e:
            errors.append(str(e))
    task.emit({"errors": errors})
    return len(errors)
