"""Serving the dashboard beside the monitor loop: bind, run uvicorn in a thread, stop.

Runs in: `handoff monitor --web ADDR`. The socket is bound here, in the main thread,
before anything else starts: an address in use is one clear error at start, not a log
line from a thread. uvicorn then serves on that socket in a daemon thread (it installs
no signal handlers there: the monitor's own handling of SIGTERM and Ctrl-C stays), and
the monitor loop feeds the hub each snapshot it takes (`feed`). Connections are bounded
in number and in how long a request may take to arrive (conns.py).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import threading
from dataclasses import dataclass
from typing import Any

import uvicorn

from handoff.observe.web import conns, guard
from handoff.observe.web.app import Dashboard, build_app
from handoff.observe.web.chart import ThroughputHistory
from handoff.observe.web.hub import Hub
from handoff.observe.web.pages import Pages
from handoff.observe.web.reads import Operations
from handoff.observe.web.render import Renderer

log = logging.getLogger("handoff.observe.web")

DEFAULT_HOST = "127.0.0.1"
STOP_TIMEOUT_S = 2.0  # open live connections are cut after this at shutdown


def parse_address(text: str) -> tuple[str, int]:
    """'127.0.0.1:8321', 'localhost:8321', '[::1]:8321', ':8321' or '8321' -> (host, port);
    ValueError with a one-line reason otherwise. No host means 127.0.0.1."""
    text = text.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{text!r}: expected [IPv6]:PORT, like [::1]:8321")
    elif ":" in text:
        host, _, port = text.rpartition(":")
    else:
        host, port = "", text
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: expected HOST:PORT with a port from 1 to 65535")
    host = host or DEFAULT_HOST
    if not host.replace(".", "").replace("-", "").replace(":", "").isalnum():
        raise ValueError(f"{text!r}: {host!r} is not a host name or address")
    return host, int(port)


def url_of(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or OSError naming the address (in use, not ours, ...)."""
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:  # a name: resolve it
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(conns.BACKLOG)
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {url_of(host, port)}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


@dataclass
class WebServer:
    """The running dashboard: feed it snapshots, stop it at the end."""

    hub: Hub
    history: ThroughputHistory
    server: uvicorn.Server
    thread: threading.Thread
    url: str

    budget: conns.Budget

    def feed(self, snapshot: dict[str, Any]) -> None:
        """Runs in: the monitor loop's thread, once per snapshot it takes."""
        self.history.add(snapshot)
        self.hub.feed(snapshot)

    def stop(self) -> None:
        self.hub.close()
        self.server.should_exit = True
        self.thread.join(STOP_TIMEOUT_S + 1)


def start(
    address: str,
    ops: Operations,
    *,
    token: str | None = None,
    metrics_url: str | None = None,
    max_connections: int = conns.MAX_CONNECTIONS,
    header_timeout_s: float = conns.HEADER_TIMEOUT_S,
) -> WebServer:
    """Bind `address` and serve the dashboard in a thread. ValueError for a malformed
    address, OSError when it cannot be bound. At most max_connections open (fewer when
    the file limit leaves fewer), each given header_timeout_s to send its request."""
    host, port = parse_address(address)
    sock = bind(host, port)
    renderer = Renderer()
    history = ThroughputHistory()
    pages = Pages(ops, renderer, history, actions=bool(token))
    hub = Hub(pages.build)
    dashboard = Dashboard(hub, ops, guard.Guard(token), renderer, metrics_url)
    app = build_app(dashboard, guard.allowed_hosts(host))
    limit = conns.fd_budget(max_connections, ops.settings.redis.pool_size)
    budget = conns.Budget(limit, header_timeout_s)
    config = uvicorn.Config(
        app,
        http=conns.protocol_for(budget),
        ws="none",  # live pages are server-sent events; an upgrade would leave the budget
        log_level="warning",
        access_log=False,
        server_header=False,
        lifespan="on",
        backlog=conns.BACKLOG,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=STOP_TIMEOUT_S,
        h11_max_incomplete_event_size=guard.MAX_URL_BYTES + 16 * 1024,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=_serve, args=(server, sock, budget), name="dashboard",
                              daemon=True)  # fmt: skip
    thread.start()
    url = url_of(host, port)
    mode = "actions with the token" if token else "read-only (no --web-token)"
    log.info("monitor: dashboard on %s (%s; at most %d connections)", url, mode, budget.limit)
    return WebServer(hub, history, server, thread, url, budget)


def _serve(server: uvicorn.Server, sock: socket.socket, budget: conns.Budget) -> None:
    """The dashboard thread: uvicorn on its own loop, whose exception handler counts
    accept() failures instead of logging a traceback for each."""

    async def serve() -> None:
        asyncio.get_running_loop().set_exception_handler(budget.loop_exception)
        await server.serve(sockets=[sock])

    asyncio.run(serve())
