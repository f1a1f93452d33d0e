"""Agents behind tests/test_async_client.py's ASGI app: a chain, and one that streams."""

from handoff import Handoff, agent


@agent("echo", max_concurrent=8)
def echo(task):
    payload = task.payload
    if payload.get("talk"):
        return Handoff("talker", {"n": payload["talk"]})
    if payload.get("next"):
        return Handoff(payload["next"], {k: v for k, v in payload.items() if k != "next"})
    return payload


@agent("talker", max_concurrent=8)
def talker(task):
    for i in range(task.payload["n"]):
        task.emit({"i": i})
    return {"chunks": task.payload["n"]}
