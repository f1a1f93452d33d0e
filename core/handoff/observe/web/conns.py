"""The dashboard's connections: how many may be open, and how long a request may take.

Runs in: the dashboard's event loop (uvicorn's h11 protocol, subclassed: `protocol_for`).

uvicorn bounds neither: its keep-alive timer is cancelled by the first byte a client
sends, and it accepts whatever the kernel hands it, so a few thousand half-sent requests
hold as many sockets for ever, and at the process's file limit every accept() fails
(asyncio then logs a traceback per attempt). Here:

- A connection must deliver a whole request (head and body) within `header_timeout_s` of
  connecting, or of its previous answer; otherwise it is closed.
- At most `limit` connections are open. One more closes the oldest connection still
  sending its request (a half-sent request gives way to a new one, so pages keep
  answering during a flood); when every open one is busy (live pages, answers being
  made) the new one gets a 503 and is closed at once.
- `limit` fits the process's file limit (`fd_budget`): the dashboard never takes the
  descriptors the monitor's Redis connections need, and accept() does not meet EMFILE.
- What was refused, cut or timed out is one log line per LOG_EVERY_S with the counts,
  and so are accept() failures (routed here from asyncio's exception handler) and the
  warnings uvicorn logs per request (an invalid request, an upgrade it cannot serve).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import h11
import psutil
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("handoff.observe.web")

MAX_CONNECTIONS = 512  # above hub.MAX_VIEWERS (live pages) with room for page loads
HEADER_TIMEOUT_S = 10.0  # a browser sends its request at once; a trickle is an attack
# The listen queue, and so the accepts one pass of asyncio's loop may make at once. A
# flood fills it and the kernel drops SYNs (the flood slows down; a page may wait a 1 s
# retransmit); a longer one would let a pass take that many descriptors at once.
BACKLOG = 128
OWN_FDS = 16  # the monitor's own beyond its two Redis pools: logs, epoll, metrics server
MIN_CONNECTIONS = 8
LOG_EVERY_S = 10.0
ACCEPT_FAILED = "socket.accept() out of system resource"
_BUSY = b"503: the dashboard is at its connection limit: retry\n"
REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(_BUSY), _BUSY)
)
RECEIVING = (h11.IDLE, h11.SEND_BODY)  # the client has not sent its whole request yet


def fd_budget(requested: int, pool_size: int) -> int:
    """`requested`, lowered to what the file limit leaves: the descriptors open now, the
    monitor's (its pool and the dashboard client's, each up to pool_size, and OWN_FDS),
    and the accepts that may be in flight (up to two passes of the backlog)."""
    try:
        import resource
    except ImportError:  # no such limit to fit (Windows)
        return requested
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return requested
    reserve = 2 * pool_size + OWN_FDS + 2 * BACKLOG
    spare = soft - psutil.Process().num_fds() - reserve
    return max(MIN_CONNECTIONS, min(requested, spare))


class Budget:
    """The connections one server holds, the ones still sending (oldest first), and the
    counts of what was cut, logged once per LOG_EVERY_S."""

    def __init__(self, limit: int, header_timeout_s: float) -> None:
        self.limit = limit
        self.header_timeout_s = header_timeout_s
        self.members: set[Any] = set()  # admitted, not closed by us, not lost
        self.receiving: dict[Any, None] = {}  # still sending their request, oldest first
        self.counts: dict[str, int] = {}
        self.totals: dict[str, int] = {}
        self._flush: asyncio.TimerHandle | None = None
        self._last_log = 0.0

    def admit(self, conn: Any) -> bool:
        """Room for a new connection: True, having closed the oldest one still sending
        when at the limit; False (refuse it) when every open one is busy."""
        if len(self.members) >= self.limit:
            victim = next(iter(self.receiving), None)
            if victim is None:
                self.note("refused")
                return False
            self.drop(victim)
            victim.transport.close()
            self.note("cut")
        self.members.add(conn)
        return True

    def drop(self, conn: Any) -> None:
        self.members.discard(conn)
        self.receiving.pop(conn, None)

    def note(self, what: str) -> None:
        """Count one event; the line saying so comes at most once per LOG_EVERY_S."""
        self.counts[what] = self.counts.get(what, 0) + 1
        self.totals[what] = self.totals.get(what, 0) + 1
        if self._flush is None:
            wait_s = max(0.0, self._last_log + LOG_EVERY_S - time.monotonic())
            self._flush = asyncio.get_running_loop().call_later(wait_s, self.say)

    def say(self) -> None:
        self._flush = None
        self._last_log = time.monotonic()
        counts, self.counts = self.counts, {}
        parts = {
            "refused": "refused (every connection busy)",
            "cut": "half-sent request(s) closed for newer connections",
            "slow": f"request(s) not sent within {self.header_timeout_s:g}s closed",
            "accept_failed": "accept() failure(s): out of file descriptors",
            "bad_request": "invalid or unsupported (upgrade) request(s) refused",
        }
        said = [f"{counts[k]} {text}" for k, text in parts.items() if counts.get(k)]
        if said:
            log.warning(
                "dashboard: %s in the last %.0fs (at most %d connections)",
                "; ".join(said), LOG_EVERY_S, self.limit,
            )  # fmt: skip

    def loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        """The loop's exception handler: an accept() out of descriptors is counted (asyncio
        would log a traceback per attempt); anything else goes to the default handler."""
        if context.get("message") == ACCEPT_FAILED:
            self.note("accept_failed")
        else:
            loop.default_exception_handler(context)


class _CountedWarnings:
    """uvicorn's error logger for one connection, but its per-request warnings are counts
    in the budget's line (a client could otherwise write the log a line per request)."""

    def __init__(self, logger: logging.Logger, budget: Budget) -> None:
        self._logger = logger
        self._budget = budget

    def warning(self, *_args: Any, **_kwargs: Any) -> None:
        self._budget.note("bad_request")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._logger, name)


class BoundedProtocol(H11Protocol):
    """uvicorn's h11 protocol with the budget's limits (see the module docstring)."""

    budget: Budget  # set on the subclass made for one server (protocol_for)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.logger = _CountedWarnings(self.logger, self.budget)  # type: ignore[assignment]

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._timer: asyncio.TimerHandle | None = None
        self._sent_some = False
        if not self.budget.admit(self):
            transport.write(REFUSED)
            transport.close()
            return
        self._await_request()

    def connection_lost(self, exc: Exception | None) -> None:
        self.budget.drop(self)
        self._stop_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._sent_some = True
        super().data_received(data)

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state not in RECEIVING:  # the whole request is in
            self.budget.receiving.pop(self, None)
            self._stop_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state in RECEIVING:
            self._await_request()

    def _await_request(self) -> None:
        """From now on the client has header_timeout_s to send its next request."""
        self.budget.receiving.pop(self, None)
        self.budget.receiving[self] = None  # the newest
        self._sent_some = False
        self._stop_timer()
        self._timer = self.loop.call_later(self.budget.header_timeout_s, self._too_slow)

    def _too_slow(self) -> None:
        self._timer = None
        if self.transport.is_closing() or self.conn.their_state not in RECEIVING:
            return
        if self._sent_some:  # an idle connection that sent nothing is not news
            self.budget.note("slow")
        self.budget.drop(self)
        self.transport.close()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def protocol_for(budget: Budget) -> type[BoundedProtocol]:
    """The protocol class for one server: uvicorn makes one instance per connection."""
    return type("DashboardProtocol", (BoundedProtocol,), {"budget": budget})
