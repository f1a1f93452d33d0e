"""Typed agents for the typed-payload tests (pydantic models as payload= and result=).

Each records what its handler saw in the test's server (TEST_REDIS_URL): `seen` gets
"<agent> <type of task.payload> <task id>".
"""

from __future__ import annotations

import os
from datetime import datetime
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field

from handoff import Handoff, agent
from harness.procs import plain_client


class Step(BaseModel):
    feature: str
    step: int = Field(ge=0, le=100)


class Review(BaseModel):
    approved: bool
    step: int


def _seen(task) -> None:
    plain_client(os.environ["TEST_REDIS_URL"]).rpush(
        "seen", f"{task.agent} {type(task.payload).__name__} {task.id}"
    )


@agent("tcoder", payload=Step, max_attempts=1)
def tcoder(task):
    """Hands its step to the reviewer as a model; payload 'bad_handoff' sends a wrong one."""
    _seen(task)
    if task.payload.feature == "bad_handoff":
        return Handoff("treviewer", {"feature": "x", "step": "not a number"})
    return Handoff("treviewer", Step(feature=task.payload.feature, step=task.payload.step))


@agent("treviewer", payload=Step, result=Review, max_attempts=2, retry_delay_s=0.01)
def treviewer(task):
    """Returns a Review (as a model, or as a dict); feature 'bad_result' returns junk."""
    _seen(task)
    if task.payload.feature == "bad_result":
        return {"approved": "maybe", "step": task.payload.step}
    if task.payload.step % 2:
        return Review(approved=True, step=task.payload.step)
    return {"approved": False, "step": task.payload.step}


class Stamped(BaseModel):
    """Strict: in Python mode a str is no datetime; in JSON mode (as it travels) it is."""

    model_config = ConfigDict(strict=True)
    at: datetime
    ref: UUID


@agent("tstrict", payload=Stamped, max_attempts=1)
def tstrict(task):
    _seen(task)
    return {"at": task.payload.at.isoformat(), "ref": str(task.payload.ref)}
