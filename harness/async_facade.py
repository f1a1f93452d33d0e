"""An AsyncClient driven from synchronous test code, so one test body checks both clients.

The event loop runs in a thread of the test harness (AsyncClient itself starts none): each
coroutine method is run there and waited for, and stream() becomes a plain iterator.
Blocking waits from several test threads at once are fine: each is its own coroutine.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

from handoff import AsyncClient, Client

CALL_TIMEOUT_S = 120.0


class BlockingAsyncClient:
    """Client's interface over an AsyncClient (for the parametrized behaviour tests)."""

    def __init__(self, client: AsyncClient) -> None:
        self.client = client
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def _wait(self, awaitable) -> Any:
        return asyncio.run_coroutine_threadsafe(awaitable, self.loop).result(CALL_TIMEOUT_S)

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.client, name)
        if name == "stream":
            return lambda *args, **kwargs: self._iterate(attribute(*args, **kwargs))
        if asyncio.iscoroutinefunction(attribute):
            return lambda *args, **kwargs: self._wait(attribute(*args, **kwargs))
        return attribute

    def _iterate(self, events) -> Iterator[Any]:
        async def next_event() -> Any:
            return await anext(events)

        while True:
            try:
                yield self._wait(next_event())
            except StopAsyncIteration:
                return

    def close(self) -> None:
        try:
            self._wait(self.client.close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()

    def __enter__(self) -> BlockingAsyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def either(kind: str, settings) -> Client | BlockingAsyncClient:
    """A Client ("Client"), or an AsyncClient behind this facade, on these settings."""
    if kind == "Client":
        return Client(settings=settings)
    return BlockingAsyncClient(AsyncClient(settings=settings))
