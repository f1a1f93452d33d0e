"""AsyncClient where only an asyncio client can be tested: inside an ASGI app, with no
threads of its own, across fork and event loops, and its one-line errors. Its behaviour
is Client's: tests/test_client.py, test_runs.py, test_streams.py and test_cancel.py run
their behaviour tests on both (fixtures client, reader, either_client)."""

from __future__ import annotations

import asyncio
import os
import threading

import orjson
import pytest

from handoff import AsyncClient
from handoff.config import RedisPoolConfig, Settings
from handoff.errors import InvalidPayload, RedisUnavailable, ResultTimeout
from harness.procs import free_tcp_port

pytest.importorskip("starlette", reason="the web extra is not installed: pip install -e '.[web]'")


def settings_for(url: str, **fields) -> Settings:
    return Settings(redis=RedisPoolConfig(url=url, **fields))


async def asgi(app, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    """One request through an ASGI app, in this event loop (no server, no threads)."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
        "headers": [(b"host", b"test"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1), "server": ("test", 80), "scheme": "http",
    }  # fmt: skip
    sent = False
    status, chunks = 0, []

    async def receive() -> dict:
        nonlocal sent
        if sent:
            await asyncio.Event().wait()  # nothing more: the app is answering
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return status, b"".join(chunks)


def tasks_app(client: AsyncClient):
    """What a FastAPI-style service does: enqueue from a request, answer with the result."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def create(request):
        task_id = await client.enqueue("echo", await request.json())
        return JSONResponse({"id": task_id}, status_code=202)

    async def result(request):
        task_id = request.path_params["task_id"]
        try:
            value = await client.result(task_id, wait_s=10, follow=True)
        except ResultTimeout as e:
            return JSONResponse({"error": str(e)}, status_code=504)
        return JSONResponse({"result": value, "status": await client.status(task_id)})

    async def events(request):
        got = [e.data async for e in client.stream(request.path_params["task_id"])]
        return JSONResponse(got)

    return Starlette(
        routes=[
            Route("/tasks", create, methods=["POST"]),
            Route("/tasks/{task_id}", result),
            Route("/tasks/{task_id}/events", events),
        ]
    )


def test_an_asgi_app_enqueues_and_answers_with_the_chain_result_with_no_threads(redis_url, start):
    start(["supervise", "--agents", "echo=1,talker=1"], app="apps.asgi_agents")
    client = AsyncClient(settings=settings_for(redis_url))
    app = tasks_app(client)

    async def scenario() -> None:
        threads = threading.active_count()
        status, body = await asgi(app, "POST", "/tasks", orjson.dumps({"x": 1, "next": "echo"}))
        assert status == 202
        task_id = orjson.loads(body)["id"]
        status, body = await asgi(app, "GET", f"/tasks/{task_id}")
        assert status == 200, body
        assert orjson.loads(body) == {"result": {"x": 1}, "status": "done"}
        status, body = await asgi(app, "POST", "/tasks", orjson.dumps({"talk": 5}))
        talk_id = orjson.loads(body)["id"]
        status, body = await asgi(app, "GET", f"/tasks/{talk_id}/events")
        assert status == 200 and [d["i"] for d in orjson.loads(body)] == list(range(5))
        assert threading.active_count() == threads  # awaited, never run in threads
        await client.close()

    asyncio.run(scenario())


def test_an_async_client_serves_a_forked_child_and_each_new_event_loop(redis_url, raw_redis):
    client = AsyncClient(settings=settings_for(redis_url))
    task_id = asyncio.run(client.enqueue("a", {"n": 1}))  # first loop, now closed
    assert asyncio.run(client.status(task_id)) == "queued"  # a second loop: new sockets
    pid = os.fork()
    if pid == 0:  # the child: the inherited client must not touch the parent's sockets
        code = 1
        try:
            ok = asyncio.run(client.status(task_id)) == "queued"
            code = 0 if ok and asyncio.run(client.enqueue("a", {"n": 2})) else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    assert asyncio.run(client.status(task_id)) == "queued"
    assert raw_redis.zcard("handoff:{a}:queue") == 2


def test_an_unreachable_server_is_one_line_naming_it_without_the_password():
    url = f"redis://:s3cret-pass@127.0.0.1:{free_tcp_port()}/0"
    client = AsyncClient(settings=settings_for(url, max_retries=1, min_retry_backoff_ms=1))
    with pytest.raises(RedisUnavailable) as caught:
        asyncio.run(client.enqueue("a", {}))
    message = str(caught.value)
    assert "\n" not in message and "s3cret-pass" not in message, message
    assert "after 2 attempt(s)" in message and "127.0.0.1" in message


def test_bad_input_is_refused_before_anything_is_sent(redis_url, raw_redis):
    async def scenario() -> None:
        async with AsyncClient(settings=settings_for(redis_url)) as client:
            with pytest.raises(InvalidPayload, match="priority"):
                await client.enqueue("a", {}, priority=10**9)
            with pytest.raises(InvalidPayload, match=r"payloads\[1\]"):
                await client.enqueue_many("a", [{}, object()])
            with pytest.raises(InvalidPayload, match="invalid task id"):
                await client.result("no-dot-here")
            with pytest.raises(InvalidPayload, match="no such task or run"):
                await anext(client.stream("a.nothing"))

    asyncio.run(scenario())
    assert raw_redis.dbsize() == 0
