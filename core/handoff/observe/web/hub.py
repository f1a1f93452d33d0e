"""The broadcaster: one build per watched page per tick, whatever the number of viewers.

Runs in: the dashboard's event loop (a thread of `handoff monitor --web`), fed from the
monitor loop's thread. The monitor loop takes its one aggregate snapshot per tick anyway;
feed() hands it over, and the tick that follows builds every page someone is watching
(a topic with at least one subscriber) exactly once, in a worker thread, then sends the
same bytes to each of that page's viewers. The overview and the workers page read
nothing more; an agent's, a task's or a run's page does its bounded read once a tick.
So twenty viewers of one page cost what one does; twenty viewers of twenty different
runs cost twenty reads a tick, and MAX_TOPICS bounds that.

A page loaded (not watched) is served from the same cache when it was built this tick.
A viewer that cannot keep up gets the latest state only: nothing queues up per viewer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import orjson

from handoff.observe.web.pages import View

log = logging.getLogger("handoff.observe.web")

MAX_TOPICS = 64  # different pages watched at once (each costs a read a tick)
FINAL_REBUILD_S = 10.0  # an ended run is read again this seldom (a requeue may reopen it)
MAX_VIEWERS = 256  # open live connections
KEEPALIVE_S = 15.0  # a comment line this often keeps proxies from closing a quiet stream


class TooManyViewers(Exception):
    """Over MAX_VIEWERS or MAX_TOPICS: the caller answers 503."""


class Subscriber:
    """One open live connection: holds the latest message not yet sent, nothing more."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self._pending: bytes | None = None
        self._ready = asyncio.Event()
        self.closed = False

    def offer(self, message: bytes) -> None:
        self._pending = message  # a newer state replaces one the viewer has not read
        self._ready.set()

    def close(self) -> None:
        self.closed = True
        self._ready.set()

    async def next(self, timeout_s: float = KEEPALIVE_S) -> bytes | None:
        """The next message; None after timeout_s (send a keep-alive); b"" once closed."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._ready.wait(), timeout_s)
        self._ready.clear()
        if self.closed:
            return b""
        message, self._pending = self._pending, None
        return message


def sse_message(view: View) -> bytes:
    """A server-sent event carrying the view's regions (id -> HTML) as one JSON line."""
    if view.status != 200:
        data = {"_error": f"{view.status}: {view.message}"}
    else:
        data = {name: str(html) for name, html in view.regions.items()}
    return b"event: regions\ndata: " + orjson.dumps(data) + b"\n\n"


class Hub:
    """Topics, their subscribers, and the last view built for each."""

    def __init__(self, build: Callable[[str, dict[str, Any] | None], View]) -> None:
        self._build = build  # (topic, snapshot) -> View; blocking: run in a thread
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subscribers: dict[str, set[Subscriber]] = {}
        self._views: dict[str, tuple[int, View, bytes]] = {}  # topic -> (tick, view, message)
        self._sent: dict[str, bytes] = {}  # topic -> the message its viewers last got
        self._building: dict[str, asyncio.Future] = {}
        self.snapshot: dict[str, Any] | None = None
        self.tick = 0
        self._ticking = False
        self._again = False

    # -- the monitor loop's side (any thread) ----------------------------------------------

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def feed(self, snapshot: dict[str, Any]) -> None:
        """A new snapshot from the monitor loop: schedule a tick on the event loop."""
        loop = self._loop
        if loop is None or loop.is_closed():
            self.snapshot = snapshot
            return
        with contextlib.suppress(RuntimeError):  # the loop is shutting down
            loop.call_soon_threadsafe(self._on_snapshot, snapshot)

    # -- the event loop's side -------------------------------------------------------------

    def _on_snapshot(self, snapshot: dict[str, Any]) -> None:
        self.snapshot = snapshot
        self.tick += 1
        if self._ticking:  # a slow tick still runs: one more after it, not a pile-up
            self._again = True
            return
        self._ticking = True
        asyncio.get_running_loop().create_task(self._run_ticks())

    async def _run_ticks(self) -> None:
        try:
            while True:
                self._again = False
                for topic in list(self._subscribers):
                    await self._refresh(topic)
                if not self._again:
                    return
        finally:
            self._ticking = False

    async def _refresh(self, topic: str) -> None:
        try:
            await self.view(topic)
        except Exception:  # a bug in one page must not stop the others' updates
            log.exception("dashboard: building %s failed", topic)
            return
        entry = self._views.get(topic)
        if entry is None:  # its last viewer left meanwhile, and it was forgotten
            return
        message = entry[2]
        if self._sent.get(topic) == message:
            return  # nothing changed: nothing sent
        self._sent[topic] = message
        for subscriber in self._subscribers.get(topic, ()):
            subscriber.offer(message)

    async def view(self, topic: str) -> View:
        """The topic's view as of this tick: built at most once per tick, however many
        page loads and viewers ask at the same time."""
        cached = self._views.get(topic)
        if cached is not None and (cached[0] == self.tick or self._still_final(cached[1])):
            return cached[1]
        pending = self._building.get(topic)
        if pending is None:
            pending = asyncio.ensure_future(self._build_now(topic))
            self._building[topic] = pending
            pending.add_done_callback(lambda _f: self._building.pop(topic, None))
        return await asyncio.shield(pending)

    @staticmethod
    def _still_final(view: View) -> bool:
        return view.final and time.monotonic() - view.built_at < FINAL_REBUILD_S

    async def _build_now(self, topic: str) -> View:
        tick = self.tick
        view = await asyncio.to_thread(self._build, topic, self.snapshot)
        self._views[topic] = (tick, view, sse_message(view))
        self._forget_unwatched()
        return view

    def _forget_unwatched(self) -> None:
        """Keep cached views of watched topics, and a few others (page loads)."""
        extra = [t for t in self._views if t not in self._subscribers]
        for topic in extra[: max(0, len(extra) - MAX_TOPICS)]:
            del self._views[topic]
            self._sent.pop(topic, None)

    async def subscribe(self, topic: str) -> Subscriber:
        """A new live connection on topic; its first message is the current view."""
        viewers = sum(len(s) for s in self._subscribers.values())
        if viewers >= MAX_VIEWERS:
            raise TooManyViewers(f"{viewers} live pages open: the most this dashboard serves")
        if topic not in self._subscribers and len(self._subscribers) >= MAX_TOPICS:
            raise TooManyViewers(f"{MAX_TOPICS} different pages watched: the most at once")
        subscriber = Subscriber(topic)
        self._subscribers.setdefault(topic, set()).add(subscriber)
        try:
            await self.view(topic)
        except Exception:
            self.unsubscribe(subscriber)
            raise
        message = self._views[topic][2]
        self._sent.setdefault(topic, message)  # the first viewer: what it got is what was sent
        subscriber.offer(message)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        viewers = self._subscribers.get(subscriber.topic)
        if viewers is None:
            return
        viewers.discard(subscriber)
        if not viewers:
            del self._subscribers[subscriber.topic]
            self._sent.pop(subscriber.topic, None)

    def viewers(self) -> int:
        return sum(len(s) for s in self._subscribers.values())

    def close(self) -> None:
        """End every live connection (the server is stopping). Any thread."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop is gone already
                loop.call_soon_threadsafe(self._close_all)

    def _close_all(self) -> None:
        for viewers in self._subscribers.values():
            for subscriber in viewers:
                subscriber.close()
