"""enqueue(..., key=K, on_conflict=...): what a repeated key does to the task holding it
(protocol/conflict.py, conflict.lua). On Client and AsyncClient, a server and a cluster."""

from __future__ import annotations

import time

import pytest

from handoff import InvalidPayload

pytestmark = pytest.mark.backends("server", "cluster")


def _payload(client, task_id: str):
    from handoff.client import Client

    reader = Client(settings=client.settings) if not isinstance(client, Client) else client
    try:
        return reader.task(task_id)["task"]["payload"]
    finally:
        if reader is not client:
            reader.close()


def _due_ms(raw_redis, client, task_id: str) -> float | None:
    return raw_redis.zscore(client.queue.keys.agent("probe").delayed, task_id)


def test_skip_keeps_the_task_holding_the_key(either_client, backend):
    first = either_client.enqueue("probe", {"v": 1}, key="k", delay_s=600)
    again = either_client.enqueue("probe", {"v": 2}, key="k", on_conflict="skip")
    assert again == first and _payload(either_client, first) == {"v": 1}


def test_replace_gives_a_waiting_task_the_new_payload_in_its_place(
    either_client, raw_redis, backend
):
    first = either_client.enqueue("probe", {"v": 1}, key="k", delay_s=600)
    due = _due_ms(raw_redis, either_client, first)
    again = either_client.enqueue("probe", {"v": 2}, key="k", delay_s=5, on_conflict="replace")
    assert again == first and _payload(either_client, first) == {"v": 2}
    assert _due_ms(raw_redis, either_client, first) == due  # its place kept
    ready = either_client.enqueue("probe", {"v": 1}, key="r")
    either_client.enqueue("probe", {"v": 3}, key="r", on_conflict="replace")
    assert _payload(either_client, ready) == {"v": 3}
    assert either_client.status(ready) == "queued"


def test_debounce_moves_the_due_time_to_a_delay_after_the_last_enqueue(
    either_client, raw_redis, backend
):
    first = either_client.enqueue("probe", {"v": 1}, key="d", delay_s=2, on_conflict="debounce")
    due = _due_ms(raw_redis, either_client, first)
    time.sleep(0.05)
    either_client.enqueue("probe", {"v": 2}, key="d", delay_s=600, on_conflict="debounce")
    assert _due_ms(raw_redis, either_client, first) > due + 590_000
    assert _payload(either_client, first) == {"v": 2}
    either_client.enqueue("probe", {"v": 3}, key="d", on_conflict="debounce")  # no delay
    assert either_client.status(first) == "queued" and _payload(either_client, first) == {"v": 3}


def test_a_started_task_is_left_as_it_is(client, backend):
    from handoff.protocol.queue import ClaimRequest

    first = client.enqueue("probe", {"v": 1}, key="s")
    (task,) = client.queue.claim([ClaimRequest("probe", 1, 60_000)])["probe"]
    assert task.id == first
    assert client.enqueue("probe", {"v": 2}, key="s", on_conflict="replace") == first
    assert _payload(client, first) == {"v": 1} and client.status(first) == "running"


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"key": "k", "on_conflict": "replce"}, "on_conflict 'replce': one of skip, replace, "),
        ({"on_conflict": "replace"}, "on_conflict='replace' needs a key (key=...)"),
    ],
)
def test_a_bad_on_conflict_is_one_line(client, options, says, backend):
    with pytest.raises(InvalidPayload) as caught:
        client.enqueue("probe", {}, **options)
    assert says in str(caught.value) and "\n" not in str(caught.value)


def test_cancel_running_cancels_a_started_task_and_runs_the_new_one(start, either_client, backend):
    from harness.procs import wait_until

    first = either_client.enqueue("aprobe", {"n": 1, "sleep_s": 30}, key="c")
    start(["worker", "aprobe"])
    wait_until(lambda: either_client.status(first) == "running", 30, "the first to start")
    again = either_client.enqueue(
        "aprobe", {"n": 2, "sleep_s": 0}, key="c", on_conflict="cancel_running"
    )
    assert again == first
    assert either_client.result(first, wait_s=20) == 2  # the new one's, not a cancel
