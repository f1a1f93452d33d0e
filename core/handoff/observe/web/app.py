"""The dashboard's routes: pages (GET), their live updates (server-sent events), and the
guarded actions (POST).

Runs in: the dashboard's event loop. Pages come from the hub (built once per tick for
everyone); actions go through the Client the monitor command handed over, after the
guard's checks. Every refusal is a status and one line, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from handoff.config.redact import redact_url
from handoff.errors import HandoffError, InvalidPayload
from handoff.observe.web import guard
from handoff.observe.web.hub import Hub, TooManyViewers
from handoff.observe.web.pages import View, parse_topic
from handoff.observe.web.reads import Operations, root_of, task_view
from handoff.observe.web.render import Renderer
from handoff.observe.web.signal_route import signal_link
from handoff.protocol.keys import check_agent
from handoff.protocol.task import check_task_id
from handoff.runtime.control import send_scale

log = logging.getLogger("handoff.observe.web")

MAX_QUERY_CHARS = 200  # a search: a task id is at most 64 + 1 + 64 characters
NOTICE_TTL_S = 60.0
STATIC = Path(__file__).with_name("static")


@dataclass
class Dashboard:
    """What the routes share."""

    hub: Hub
    ops: Operations
    guard: guard.Guard
    renderer: Renderer
    metrics_url: str | None = None

    def __post_init__(self) -> None:
        self.notices: dict[str, tuple[float, str]] = {}  # key -> (expires, text)
        self.redis_url = redact_url(self.ops.settings.redis.url)

    def notice(self, text: str) -> str:
        """Keep a one-line result for the page an action redirects to (once, briefly):
        the redirect carries a random key, so a crafted link cannot show a message."""
        now = time.monotonic()
        self.notices = {k: v for k, v in self.notices.items() if v[0] > now}
        key = secrets.token_hex(8)
        self.notices[key] = (now + NOTICE_TTL_S, text[:500])
        return key

    def take_notice(self, request: Request) -> str:
        entry = self.notices.pop(request.query_params.get("notice", ""), None)
        return entry[1] if entry and entry[0] > time.monotonic() else ""

    def access(self, request: Request) -> str:
        if self.guard.read_only:
            return "read-only"
        return "unlocked" if self.guard.unlocked(request) else "locked"

    def page(self, request: Request, topic: str, view: View, nav: str = "") -> HTMLResponse:
        html = self.renderer.page(
            "page",
            title=view.title,
            topic=topic,
            regions=view.regions,
            nav=nav,
            notice=self.take_notice(request),
            access=self.access(request),
            path=request.url.path,
            redis_url=self.redis_url,
            metrics_url=self.metrics_url,
        )
        return HTMLResponse(html)

    def error(self, request: Request, status: int, message: str) -> Response:
        """A status and one line: a page for a browser, plain text for anything else."""
        message = " ".join(str(message).split())[:300]
        if "text/html" not in request.headers.get("accept", ""):
            return PlainTextResponse(f"{status}: {message}\n", status_code=status)
        html = self.renderer.page(
            "error", status=status, message=message, access=self.access(request),
            path=request.url.path, redis_url=self.redis_url, metrics_url=self.metrics_url,
            title=f"{status}", nav="", topic="", notice="",
        )  # fmt: skip
        return HTMLResponse(html, status_code=status)


def _dash(request: Request) -> Dashboard:
    return request.app.state.dashboard


async def _show(request: Request, topic: str, nav: str = "") -> Response:
    dash = _dash(request)
    try:
        parse_topic(topic)
    except ValueError as e:
        raise HTTPException(400, str(e)) from None
    view = await dash.hub.view(topic)
    if view.status != 200:
        raise HTTPException(view.status, view.message)
    return dash.page(request, topic, view, nav)


# -- pages -------------------------------------------------------------------------------


async def overview(request: Request) -> Response:
    return await _show(request, "overview", "overview")


async def workers(request: Request) -> Response:
    return await _show(request, "workers", "workers")


async def waiting(request: Request) -> Response:
    return await _show(request, "waiting", "waiting")


async def agent(request: Request) -> Response:
    return await _show(request, f"agent/{request.path_params['name']}")


async def task(request: Request) -> Response:
    return await _show(request, f"task/{request.path_params['task_id']}")


async def run(request: Request) -> Response:
    """A run's tree; any of its tasks' ids leads to it (redirected to the root's)."""
    task_id = _task_id(request.path_params["task_id"])
    root = await asyncio.to_thread(root_of, _dash(request).ops, task_id)
    if root != task_id:
        return RedirectResponse(f"/runs/{root}", status_code=303)
    return await _show(request, f"run/{root}")


async def search(request: Request) -> Response:
    query = request.query_params.get("q", "").strip()
    if not query:
        raise HTTPException(400, "enter a task id to look for")
    if len(query) > MAX_QUERY_CHARS:
        raise HTTPException(400, f"query over {MAX_QUERY_CHARS} characters: not a task id")
    task_id = _task_id(query)
    view = await _dash(request).hub.view(f"task/{task_id}")
    if view.status != 200:
        raise HTTPException(view.status, view.message)
    return RedirectResponse(f"/tasks/{task_id}", status_code=303)


async def events(request: Request) -> Response:
    """The live updates of one page: a server-sent event per change, the first at once."""
    topic = request.path_params["topic"]
    try:
        parse_topic(topic)
    except ValueError as e:
        raise HTTPException(400, str(e)) from None
    hub = _dash(request).hub
    view = await hub.view(topic)
    if view.status == 404:  # nothing to watch (a 503 may pass: Redis comes back)
        raise HTTPException(404, view.message)
    try:
        subscriber = await hub.subscribe(topic)
    except TooManyViewers as e:
        raise HTTPException(503, str(e)) from None

    async def stream() -> AsyncIterator[bytes]:
        try:
            yield b"retry: 2000\n\n"
            while True:
                message = await subscriber.next()
                if message == b"":
                    return
                yield message if message is not None else b": keep-alive\n\n"
        finally:
            hub.unsubscribe(subscriber)

    headers = {"cache-control": "no-store", "x-accel-buffering": "no"}
    return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)


# -- actions -----------------------------------------------------------------------------


async def _action_form(request: Request) -> dict[str, list[str]]:
    form = await guard.read_form(request)
    _dash(request).guard.check_action(request, form)
    return form


async def _run(fn, *args, **kwargs) -> Any:
    """An action's Redis work, in a thread; a bad input is 400, an outage 503."""
    try:
        return await asyncio.to_thread(fn, *args, **kwargs)
    except InvalidPayload as e:
        raise HTTPException(400, str(e)) from None
    except HandoffError as e:
        raise HTTPException(503, f"{type(e).__name__}: {e}") from None


def _redirect(request: Request, to: str, text: str) -> Response:
    log.info("dashboard: %s", text)
    return RedirectResponse(f"{to}?notice={_dash(request).notice(text)}", status_code=303)


async def dead_action(request: Request) -> Response:
    """Requeue or purge an agent's dead letters: the ids given, or (all=1) the oldest."""
    name = _agent(request.path_params["name"])
    what = request.path_params["what"]
    if what not in ("requeue", "purge"):
        raise HTTPException(404, f"no dead-letter action {what[:20]!r}: requeue or purge")
    form = await _action_form(request)
    ids = form.get("id", [])
    every = guard.first(form, "all") == "1"
    if not ids and not every:
        raise HTTPException(400, "choose dead letters: id=<task id> (repeatable) or all=1")
    if len(ids) > 1000:
        raise HTTPException(400, f"{len(ids)} ids: at most 1000 at once")
    for task_id in ids:
        _task_id(task_id)
    ops = _dash(request).ops
    if what == "requeue":
        done = await _run(ops.dead_requeue, name, ids)
        text = f"requeued {len(done)} dead letter(s) of {name}"
    else:
        count = await _run(ops.dead_purge, name, ids)
        text = f"purged {count} dead letter(s) of {name}"
    return _redirect(request, f"/agents/{name}", text)


async def cancel(request: Request) -> Response:
    task_id = _task_id(request.path_params["task_id"])
    form = await _action_form(request)
    scope = guard.first(form, "scope", "task")
    if scope not in ("task", "run"):
        raise HTTPException(400, f"scope must be 'task' or 'run', not {scope[:20]!r}")
    report = await _run(_dash(request).ops.cancel, task_id, run=scope == "run")
    # A run's cancel comes from the run's page: back there (its root's), not to a task's.
    to = f"/runs/{report.run}" if report.run else f"/tasks/{task_id}"
    return _redirect(request, to, report.line())


async def signal(request: Request) -> Response:
    """Signal the event a waiting task waits for, with the form's JSON `data` (empty =
    null): the token first, then the JSON, then the task's wait; nothing is written
    unless all three pass. The same code as client.signal (every wait on it resumes)."""
    task_id = _task_id(request.path_params["task_id"])
    form = await _action_form(request)
    text = guard.first(form, "data").strip()
    try:
        data = orjson.loads(text) if text else None
    except orjson.JSONDecodeError as e:
        raise HTTPException(400, f"data is not JSON: {e}") from None
    ops = _dash(request).ops
    info = await _run(task_view, ops, task_id)
    stored = info.get("task")
    wait = stored.get("wait") if isinstance(stored, dict) else None
    if info["status"] != "waiting" or not isinstance(wait, dict) or not wait.get("event"):
        raise HTTPException(409, f"task {task_id} is not waiting for an event ({info['status']})")
    resumed = await _run(ops.signal, wait["event"], data)
    return _redirect(
        request, f"/tasks/{task_id}", f"signalled {wait['event']}: {resumed} wait(s) resumed"
    )


async def rerun(request: Request) -> Response:
    """The run's dead or cancelled tasks sent again (protocol/rerun.py): back to its page,
    with the line that says what was done."""
    run_id = _task_id(request.path_params["run_id"])
    await _action_form(request)
    report = await _run(_dash(request).ops.rerun, run_id)
    return _redirect(request, f"/runs/{run_id}", report.line())


async def scale(request: Request) -> Response:
    form = await _action_form(request)
    name = _agent(guard.first(form, "agent"))
    text = guard.first(form, "count").strip()
    ops = _dash(request).ops
    highest = ops.settings.max_processes_per_agent
    if text != "auto" and not (text.isdigit() and int(text) <= highest):
        raise HTTPException(
            400, f"count must be a whole number from 0 to {highest}, or auto (got {text[:20]!r})"
        )
    wanted: dict[str, int | str] = {name: text if text == "auto" else int(text)}
    queue = ops.queue
    sent = await _run(send_scale, queue.manager, queue.keys, wanted)
    if not sent:
        raise HTTPException(409, "no live supervisor found: nothing to scale")
    return _redirect(request, "/", f"scale {name}={text} sent to {sent} supervisor(s)")


async def unlock(request: Request) -> Response:
    """Check the token once and give this browser a session cookie for the actions."""
    dash = _dash(request)
    form = await guard.read_form(request)
    dash.guard.check_action(request, form)  # the token is in the form (or a header)
    response = _redirect(request, _local(guard.first(form, "next", "/")), "unlocked: actions on")
    response.set_cookie(
        guard.COOKIE, guard.session_value(dash.guard.token or ""), httponly=True,
        samesite="strict", path="/",
    )  # fmt: skip
    return response


async def lock(request: Request) -> Response:
    form = await guard.read_form(request)
    _dash(request).guard.check_origin(request)
    response = _redirect(request, _local(guard.first(form, "next", "/")), "locked: read-only")
    response.delete_cookie(guard.COOKIE, path="/")
    return response


# -- input checks ------------------------------------------------------------------------


def _task_id(text: str) -> str:
    try:
        return check_task_id(text)
    except InvalidPayload as e:
        raise HTTPException(400, str(e)) from None


def _agent(text: str) -> str:
    try:
        return check_agent(text)
    except HandoffError as e:
        raise HTTPException(400, str(e)) from None


def _local(path: str) -> str:
    """A path on this dashboard to go back to; anything else goes to the overview."""
    if path.startswith("/") and not path.startswith("//") and "\\" not in path:
        return path[:200]
    return "/"


# -- errors ------------------------------------------------------------------------------


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    message = exc.detail
    if exc.status_code == 404 and message == "Not Found":
        message = f"no page at {request.url.path[:100]}"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed here (actions are POST, pages GET)"
    return _dash(request).error(request, exc.status_code, message)


async def server_error(request: Request, exc: Exception) -> Response:
    log.exception("dashboard: %s %s failed", request.method, request.url.path, exc_info=exc)
    return _dash(request).error(request, 500, "internal error: see the monitor's log")


def build_app(dashboard: Dashboard, hosts: frozenset[str] | None) -> Starlette:
    """The ASGI app; `hosts`: the Host names served (None: any)."""

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        dashboard.hub.attach(asyncio.get_running_loop())
        yield
        dashboard.hub.close()

    routes = [
        Route("/", overview),
        Route("/workers", workers),
        Route("/waiting", waiting),
        Route("/agents/{name}", agent),
        Route("/agents/{name}/dead/{what:str}", dead_action, methods=["POST"]),
        Route("/tasks/{task_id}", task),
        Route("/tasks/{task_id}/cancel", cancel, methods=["POST"]),
        Route("/tasks/{task_id}/signal", signal, methods=["POST"]),
        Route("/runs/{run_id}/rerun", rerun, methods=["POST"]),
        Route("/runs/{task_id}", run),
        Route("/search", search),
        Route("/events/{topic:path}", events),
        Route("/scale", scale, methods=["POST"]),
        Route("/unlock", unlock, methods=["POST"]),
        Route("/lock", lock, methods=["POST"]),
        Route("/signal/{event:path}", signal_link, methods=["POST"]),  # (signal_route.py)
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(
        routes=routes,
        middleware=[Middleware(guard.LimitsMiddleware, hosts=hosts)],
        exception_handlers={HTTPException: http_error, Exception: server_error},
        lifespan=lifespan,
    )
    app.state.dashboard = dashboard
    return app
