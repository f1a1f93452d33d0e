"""POST /signal/<event>?exp=..&sig=..: a signal link (protocol/signals.py) at work.

Runs in: the dashboard's event loop (the signal itself in a thread). Needs no dashboard
token: the link's HMAC is its authority, for its one event until it expires. The body is
the signal's data (JSON; empty = null), at most MAX_BODY_BYTES. Every refusal is a
status and one line; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import time

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from handoff.errors import HandoffError, InvalidPayload
from handoff.protocol import signals, waits

log = logging.getLogger("handoff.observe.web")

MAX_BODY_BYTES = 8 * 1024


async def signal_link(request: Request) -> Response:
    ops = request.app.state.dashboard.ops
    event = request.path_params["event"]
    query = request.query_params
    refused = signals.refusal(
        ops.settings.signal_secret, event, query.get("exp", ""), query.get("sig", ""), time.time()
    )
    if refused:
        raise HTTPException(*refused)
    body = await _body(request)
    try:
        data = orjson.loads(body) if body.strip() else None
        args = waits.signal_args(event, data, ops.settings)
    except (orjson.JSONDecodeError, InvalidPayload) as e:
        raise HTTPException(400, f"the body is not a JSON signal: {e}") from None
    try:
        resumed = await asyncio.to_thread(ops.queue.run, waits.signal_plan(ops.queue, *args))
    except HandoffError as e:
        raise HTTPException(503, f"{type(e).__name__}: {e}") from None
    log.info("dashboard: signal link for %s resumed %d wait(s)", event, resumed)
    return JSONResponse({"event": event, "resumed": resumed})


async def _body(request: Request) -> bytes:
    """The body, refused (413) past MAX_BODY_BYTES however it is sent (chunked too)."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise HTTPException(413, f"request body over {MAX_BODY_BYTES} bytes")
    return body
