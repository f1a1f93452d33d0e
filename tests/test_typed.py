"""Typed payloads and results: checked at enqueue, at claim and before the ack.

The typed agents are in tests/apps/typed.py (pydantic models). Producers check in-process
(no Redis for a bad payload); workers are real processes.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime
from uuid import UUID

import orjson
import pytest
from click.testing import CliRunner
from pydantic import BaseModel, Field, field_serializer

from handoff import Handoff, InvalidPayload, agent
from handoff.cli import main
from handoff.client import Client, build_task
from handoff.errors import ConfigError
from handoff.testing import InProcessApp
from harness.procs import wait_until

from apps import typed

BACKENDS = ("server", "cluster")
APP = ("--app", "apps.typed")


def seen(raw_redis) -> list[list[str]]:
    return [entry.decode().split() for entry in raw_redis.lrange("seen", 0, -1)]


# -- at decoration ------------------------------------------------------------------------


class NotATypePydanticKnows:
    pass


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"payload": NotATypePydanticKnows}, "payload=NotATypePydanticKnows is not a type"),
        ({"result": NotATypePydanticKnows}, "result=NotATypePydanticKnows is not a type"),
        ({"result": Handoff}, "an agent that hands off returns Handoff"),
        ({"result": list[Handoff] | None}, "an agent that hands off returns Handoff"),
    ],
)
def test_a_type_pydantic_cannot_use_is_one_line_at_decoration(kwargs, fragment):
    with pytest.raises(ConfigError) as e:
        agent("badly-typed", **kwargs)
    assert str(e.value).startswith("agent 'badly-typed': ") and fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_untyped_apps_never_import_pydantic():
    code = (
        "import sys; from handoff import agent, Client\n"
        "@agent('plain')\ndef plain(task): return 1\n"
        "assert 'pydantic' not in sys.modules, 'pydantic was imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# -- at enqueue -----------------------------------------------------------------------------


def test_a_wrong_field_type_is_one_line_naming_it_and_nothing_is_written(redis_url, raw_redis):
    with Client(redis_url) as client:
        with pytest.raises(InvalidPayload) as e:
            client.enqueue("tcoder", {"feature": "x", "step": "three"})
        assert str(e.value).startswith("payload for agent 'tcoder' does not match Step: ")
        assert "field 'step': Input should be a valid integer" in str(e.value)
        with pytest.raises(InvalidPayload, match=r"payloads\[1\]: .*field 'feature'"):
            client.enqueue_many("tcoder", [{"feature": "a", "step": 1}, {"step": 2}])
        assert raw_redis.dbsize() == 0
        # Models and plain dicts both go in, stored as data.
        by_model = client.enqueue("tcoder", typed.Step(feature="m", step=1))
        by_dict = client.enqueue(
            "tcoder", {"feature": "d", "step": "2"}
        )  # coerced, as pydantic does
        assert client.task(by_model)["task"]["payload"] == {"feature": "m", "step": 1}
        assert client.task(by_dict)["task"]["payload"] == {"feature": "d", "step": 2}


def test_the_command_line_checks_against_the_app(redis_url, raw_redis):
    result = CliRunner().invoke(
        main, ["--redis-url", redis_url, *APP, "enqueue", "tcoder", '{"feature": 1, "step": 1}']
    )
    assert isinstance(result.exception, InvalidPayload)
    assert "field 'feature': Input should be a valid string" in str(result.exception)
    assert raw_redis.dbsize() == 0


def test_without_the_app_the_command_line_checks_the_published_schema(start, redis_url, raw_redis):
    """`handoff enqueue` without --app took anything (exit 0; dead-lettered later): the
    agent's workers publish its payload's schema, and the command checks against it."""
    start([*APP, "worker", "tcoder"])
    wait_until(lambda: raw_redis.exists("handoff:{tcoder}:schema"), 15, "schema published")
    bare = ["--redis-url", redis_url, "enqueue", "tcoder"]
    refused = CliRunner().invoke(main, [*bare, '{"feature": "f", "step": 500}'])
    assert isinstance(refused.exception, InvalidPayload)
    assert "does not match tcoder's published schema: step: 500 is greater than" in str(
        refused.exception
    )
    lines = CliRunner().invoke(
        main, [*bare, "-"], input='{"feature": "f", "step": 1}\n{"step": 2}\n'
    )
    assert isinstance(lines.exception, InvalidPayload)
    assert str(lines.exception).startswith("stdin line 2: payload: does not match")
    assert "'feature' is a required property" in str(lines.exception)
    assert raw_redis.zcard("handoff:{tcoder}:queue") == 0
    accepted = CliRunner().invoke(main, [*bare, '{"feature": "f", "step": 5}'])
    assert accepted.exit_code == 0 and accepted.output.startswith("tcoder."), accepted.output


def test_inspect_agents_lists_each_agent_with_its_json_schema():
    result = CliRunner().invoke(main, [*APP, "inspect", "agents", "--json"])
    agents = orjson.loads(result.output)
    assert agents["treviewer"]["payload"] == "Step" and agents["treviewer"]["result"] == "Review"
    assert agents["tcoder"]["payload_schema"]["properties"]["step"]["maximum"] == 100
    assert agents["tcoder"]["result_schema"] is None


# -- in the worker -------------------------------------------------------------------------


def test_the_handler_gets_the_model_and_results_are_checked(start, client, raw_redis):
    ids = [client.enqueue("tcoder", {"feature": "f", "step": i}) for i in range(4)]
    start([*APP, "supervise", "--agents", "tcoder=1,treviewer=1"])
    wait_until(lambda: len(seen(raw_redis)) == 8, 30, "four coders and four reviewers")
    assert {(a, t) for a, t, _ in seen(raw_redis)} == {("tcoder", "Step"), ("treviewer", "Step")}
    for i, tid in enumerate(ids):
        (child,) = client.result(tid, wait_s=10)["handoff"]
        assert client.result(child, wait_s=10) == {"approved": bool(i % 2), "step": i}


def test_a_hand_written_bad_payload_is_dead_lettered_after_one_delivery(start, client, raw_redis):
    """A producer without the app (or an older one) wrote what the type refuses."""
    task = build_task("tcoder", {"feature": "f", "step": 5})
    task.payload = {"feature": "f", "step": 500}  # over the model's maximum
    client.queue.enqueue([task])  # the protocol layer stores what it is given
    start([*APP, "worker", "tcoder"])
    wait_until(lambda: client.status(task.id) == "dead", 15, "the bad payload dead")
    reason = client.dead_reason(task.id)
    assert reason.startswith("payload does not match Step: field 'step': Input should be less")
    assert client.task(task.id)["deliveries"] == 1 and seen(raw_redis) == []


def test_a_result_that_does_not_match_fails_and_a_bad_handoff_fails_its_parent(
    start, client, raw_redis
):
    junk = client.enqueue("treviewer", {"feature": "bad_result", "step": 1})
    parent = client.enqueue("tcoder", {"feature": "bad_handoff", "step": 1})
    start([*APP, "supervise", "--agents", "tcoder=1,treviewer=1"])
    wait_until(lambda: client.status(junk) == "dead", 15, "the junk result's task dead")
    assert client.dead_reason(junk).startswith("result does not match Review: field 'approved'")
    assert [a for a, _, t in seen(raw_redis) if t == junk] == ["treviewer", "treviewer"]  # retried
    wait_until(lambda: client.status(parent) == "dead", 15, "the bad handoff's parent dead")
    assert client.dead_reason(parent).startswith(
        "handoff to treviewer: payload for agent 'treviewer' does not match Step: field 'step'"
    )


STAMP = {"at": "2026-01-02T03:04:05", "ref": "12345678-1234-5678-1234-567812345678"}


def test_a_strict_model_the_producer_accepts_the_worker_and_the_plugin_accept(
    start, client, raw_redis, redis_url, monkeypatch
):
    """Strict models refuse a str for a datetime in Python mode, accept it in JSON mode:
    both sides check the JSON form, so what enqueue accepts a worker runs."""
    model = typed.Stamped(at=datetime(2026, 1, 2, 3, 4, 5), ref=UUID(STAMP["ref"]))
    worker = start([*APP, "worker", "tstrict"])
    for given in (model, STAMP):  # the model, and its JSON form as a dict
        tid = client.enqueue("tstrict", given)
        assert client.result(tid, wait_s=15) == {"at": "2026-01-02T03:04:05", "ref": STAMP["ref"]}
    worker.stop()  # the next one is the plugin's alone
    monkeypatch.setenv("TEST_REDIS_URL", redis_url)  # where the typed agents record
    app = InProcessApp("apps.typed", redis_url, agents=["tstrict"])
    try:
        in_process = app.enqueue("tstrict", model)
        assert app.run_until_idle(timeout_s=10)[in_process].status == "done"
    finally:
        app.close()
    assert [t for _, t, _ in seen(raw_redis)] == ["Stamped"] * 3


class RoundsDown(BaseModel):
    amount: float = Field(ge=0.5)

    @field_serializer("amount")
    def _whole(self, amount: float) -> int:
        return int(amount)  # 0.7 is stored as 0: a worker would refuse it


@agent("trounds", payload=RoundsDown)
def trounds(task):
    return None


@pytest.mark.backends("server")
def test_a_payload_whose_stored_json_a_worker_would_refuse_is_refused_at_enqueue(
    redis_url, raw_redis
):
    with Client(redis_url) as client, pytest.raises(InvalidPayload) as e:
        client.enqueue("trounds", RoundsDown(amount=0.7))
    assert "stored as RoundsDown's JSON, does not match RoundsDown: field 'amount'" in str(e.value)
    assert raw_redis.dbsize() == 0


class Untyped(BaseModel):
    text: str


def test_a_model_given_to_an_untyped_agent_is_stored_as_data(redis_url):
    with Client(redis_url) as client:
        tid = client.enqueue("somewhere-untyped", Untyped(text="hi"))
        assert client.task(tid)["task"]["payload"] == {"text": "hi"}


def test_the_demo_agents_are_typed():
    result = CliRunner().invoke(main, ["--app", "workers.demo", "inspect", "agents", "--json"])
    agents = orjson.loads(result.output)
    assert {name: a["payload"] for name, a in agents.items()} == {
        "coder": "CodeStep", "planner": "FeatureRequest", "reviewer": "CodeForReview",
        "integrator": "FeatureRequest", "merger": "Merged",
    }  # fmt: skip
    assert agents["reviewer"]["result"] == "Review"
    assert agents["merger"]["result"] == "Published"
