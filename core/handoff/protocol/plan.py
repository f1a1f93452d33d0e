"""Protocol operations written once, run by a blocking or an asyncio driver (sans-I/O).

Runs in: producers (Client, AsyncClient) and anything else that calls the operations
below. An operation that talks to Redis more than once (a result wait, a run's cancel, a
tree walk, a stream read) is a generator, a *plan*: it yields requests and is sent each
reply; a failed request's error is thrown into it at the yield, so a plan handles errors
where they happen. TaskQueue.run / AsyncTaskQueue.run perform the requests, blocking or
awaiting: the protocol's logic exists once, and each client only says how to wait.

Requests:
  Scripts  script calls in one round trip (TaskQueue.run_scripts: NOSCRIPT, cluster, WAIT)
  Call     fn(client) -> reply: redis-py commands that work on either client (on an asyncio
           client they return awaitables; pipelines buffer alike and execute() awaits)
  Pause    wait that long (nothing to block on in Redis)
A plan may also yield anything else: an iterating driver passes it on to its caller (the
events of a stream).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Scripts:
    """Script calls (name, KEYS, ARGV), plus extra pipeline operations, one round trip."""

    calls: Sequence[tuple[str, list[str], list[Any]]]
    extra: Sequence[Callable[[Any], Any]] = ()
    wait_replicas: int = 0


@dataclass(frozen=True, slots=True)
class Call:
    """fn(client): one command or pipeline. blocking: a wait in Redis (BLMOVE, XREAD
    BLOCK), sent on the connections kept for waiting and never retried."""

    fn: Callable[[Any], Any]
    blocking: bool = False
    n_operations: int = 0  # for the pool's metrics: commands in fn's pipeline


@dataclass(frozen=True, slots=True)
class Pause:
    seconds: float


REQUESTS = (Scripts, Call, Pause)
Plan = Generator[Any, Any, T]


def run(perform: Callable[[Any], Any], plan: Plan[T]) -> T:
    """Drive a plan to its return value, performing each request with perform()."""
    reply: Any = None
    error: BaseException | None = None
    while True:
        try:
            request = plan.send(reply) if error is None else plan.throw(error)
        except StopIteration as stop:
            return stop.value
        reply, error = None, None
        try:
            reply = perform(request)
        except Exception as e:  # thrown into the plan, which may handle it
            error = e


def iterate(perform: Callable[[Any], Any], plan: Plan[None]) -> Iterator[Any]:
    """Drive a plan that also yields items (not requests): yield those to the caller."""
    reply: Any = None
    error: BaseException | None = None
    while True:
        try:
            item = plan.send(reply) if error is None else plan.throw(error)
        except StopIteration:
            return
        reply, error = None, None
        if not isinstance(item, REQUESTS):
            yield item
            continue
        try:
            reply = perform(item)
        except Exception as e:
            error = e


async def arun(perform: Callable[[Any], Awaitable[Any]], plan: Plan[T]) -> T:
    """run(), awaiting each request."""
    reply: Any = None
    error: BaseException | None = None
    while True:
        try:
            request = plan.send(reply) if error is None else plan.throw(error)
        except StopIteration as stop:
            return stop.value
        reply, error = None, None
        try:
            reply = await perform(request)
        except Exception as e:
            error = e


async def aiterate(perform: Callable[[Any], Awaitable[Any]], plan: Plan[None]) -> AsyncIterator:
    """iterate(), awaiting each request."""
    reply: Any = None
    error: BaseException | None = None
    while True:
        try:
            item = plan.send(reply) if error is None else plan.throw(error)
        except StopIteration:
            return
        reply, error = None, None
        if not isinstance(item, REQUESTS):
            yield item
            continue
        try:
            reply = await perform(item)
        except Exception as e:
            error = e
