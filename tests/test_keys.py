"""Key names: built in one place, every per-agent key carries the hash tag {agent}, and a
bad name is rejected before any key (or Redis call) is made."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handoff.errors import InvalidAgentName, InvalidPayload
from handoff.protocol import scripts
from handoff.protocol.keys import AGENT_KEY_NAMES, Keys, check_agent, check_claim_id, check_task_id
from handoff.protocol.task import agent_of, derived_task_id, new_task_id

valid_agents = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,62}", fullmatch=True)
BAD_CHARS = "{}:* \n\t\r\x00.A/\\\"'"


def cluster_hash_tag(key: str) -> str | None:
    """The part of a key Redis Cluster hashes: the first non-empty {...}."""
    start = key.find("{")
    if start == -1:
        return None
    end = key.find("}", start + 1)
    if end == -1 or end == start + 1:
        return None
    return key[start + 1 : end]


@given(agent=valid_agents, task_suffix=st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True))
def test_every_key_of_a_valid_agent_carries_its_hash_tag(agent, task_suffix):
    keys = Keys("handoff").agent(agent)
    task_id = check_task_id(f"{agent}.{task_suffix}")
    every = [*keys.all(), keys.result(task_id), keys.claim("c0ffee"), *(
        getattr(keys, name) for name in AGENT_KEY_NAMES
    ), keys.waiting, keys.waiting_since, keys.wait_outbox]  # fmt: skip
    for key in every:
        assert cluster_hash_tag(key) == agent, key
        assert key.startswith(f"handoff:{{{agent}}}:")
        assert not any(c in key for c in " \n\r\t*")
    assert len(set(keys.all())) == len(AGENT_KEY_NAMES)


@given(
    agent=st.one_of(
        # a valid name with one bad character put in somewhere
        st.tuples(valid_agents, st.sampled_from(BAD_CHARS), st.integers(0, 63)).map(
            lambda t: t[0][: t[2]] + t[1] + t[0][t[2] :]
        ),
        st.text(min_size=64, max_size=400, alphabet="abc"),  # too long
        st.just(""),
        st.text(),
    )
)
def test_a_bad_agent_name_is_rejected_with_a_one_line_message(agent):
    try:
        valid = check_agent(agent) == agent
    except InvalidAgentName as e:
        message = str(e)
        assert "\n" not in message and len(message) < 200
        assert message.startswith("invalid agent name")
        with pytest.raises(InvalidAgentName):
            Keys().agent(agent)
        return
    # Only names the pattern allows get through.
    assert valid and len(agent) <= 63 and not set(agent) & set(BAD_CHARS)


@pytest.mark.parametrize(
    "name",
    [
        "{a}",
        "a}",
        "a{",
        "a:b",
        "a*",
        "a b",
        "a\n",
        "a\nb",
        "x" * 300,
        "A",
        "",
        "-a",
        "a.b",
        None,
        7,
    ],
)
def test_named_bad_agents_are_rejected(name):
    with pytest.raises(InvalidAgentName):
        check_agent(name)


def test_the_longest_allowed_name_is_63_characters():
    assert check_agent("a" * 63)
    with pytest.raises(InvalidAgentName):
        check_agent("a" * 64)


@given(agent=valid_agents, parts=st.lists(st.text(), min_size=1, max_size=3))
def test_generated_task_ids_are_valid_and_name_their_agent(agent, parts):
    for task_id in (new_task_id(agent), derived_task_id(agent, *parts)):
        assert check_task_id(task_id) == task_id
        assert agent_of(task_id) == agent
        assert len(task_id) <= 63 + 1 + 64


@pytest.mark.parametrize(
    "task_id",
    ["a", "a.", ".x", "a.x y", "a.x\n", "a.{x}", "a.x:y", "a.x*", "A.x", "a." + "x" * 65, "a.b.c"],
)
def test_malformed_task_ids_are_rejected(task_id):
    with pytest.raises(InvalidPayload, match="invalid task id"):
        agent_of(task_id)


@pytest.mark.parametrize("claim_id", ["", "a b", "{x}", "x:y", "x*", "x\n", "x" * 65])
def test_malformed_claim_ids_are_rejected(claim_id):
    with pytest.raises(InvalidPayload, match="invalid claim_id"):
        check_claim_id(claim_id)


@pytest.mark.parametrize("prefix", ["", "a b", "{x}", "x:y", "x" * 33])
def test_a_bad_key_prefix_is_rejected(prefix):
    with pytest.raises(InvalidPayload, match="invalid key prefix"):
        Keys(prefix)


def test_global_keys_sit_under_the_prefix():
    keys = Keys("hx")
    assert keys.agents == "hx:agents"
    assert keys.workers == "hx:workers"
    assert keys.worker("w1") == "hx:worker:w1"
    assert keys.supervisors == "hx:supervisors"
    assert keys.control("s1") == "hx:control:s1"
    assert keys.monitor == "hx:monitor"


bad_agents = st.one_of(
    st.tuples(valid_agents, st.sampled_from("{}:* \n"), st.integers(0, 63)).map(
        lambda t: t[0][: t[2]] + t[1] + t[0][t[2] :]
    ),
    st.just("a" * 300),
)


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(agent=bad_agents)
def test_bad_names_are_rejected_before_any_redis_call(redis_url, monkeypatch, agent):
    import redis

    from handoff.client import Client
    from handoff.config import RedisPoolConfig, Settings

    sent: list[bytes] = []
    original = redis.connection.AbstractConnection.send_packed_command

    def counting(conn, command, check_health=True):
        sent.append(command)
        return original(conn, command, check_health)

    client = Client(settings=Settings(redis=RedisPoolConfig(url=redis_url)))
    client.queue.manager.execute(lambda c: c.ping())  # connected and warm before counting
    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", counting)
    try:
        calls = [
            lambda: client.enqueue(agent, {}),
            lambda: client.enqueue_many(agent, [{}, {}]),
            lambda: client.status(f"{agent}.x1"),
            lambda: client.result(f"{agent}.x1", wait_s=0),
            lambda: client.task(f"{agent}.x1"),
            lambda: client.dead_list(agent),
            lambda: client.dead_requeue(agent),
            lambda: client.dead_purge(agent),
            lambda: client.queue_stats([agent]),
        ]
        for call in calls:
            with pytest.raises((InvalidAgentName, InvalidPayload)):
                call()
        assert sent == []
    finally:
        monkeypatch.undo()
        client.close()


# -- the scripts' keys -------------------------------------------------------------------

LUA = Path(__file__).resolve().parent.parent / "core" / "handoff" / "protocol" / "lua"
# The key argument of every call that touches a key: redis.call/pcall('CMD', key, ...) and
# the prelude's helpers that pass their key on to redis.call.
KEY_ARGUMENT = re.compile(
    r"(?:redis\.p?call\('[A-Z]+'|bulk_write\('[A-Z]+'|bulk_call\('[A-Z]+'|hget_each\()"
    r"\s*,?\s*([^,)]+)"
)
BOUND_TO_KEYS = re.compile(r"local\s+([\w,\s]+?)\s*=\s*(KEYS\[[^\n]+)")
# `key` is a helper's parameter, or forget_all's loop over the K_ names.
KEY_LOOP = re.compile(r"for _, key in ipairs\(\{(K_\w+(?:, K_\w+)*)\}\)")


# A run's or join's keys (scope, ends, ended, waiting: one set per run, named by its id)
# are the one exception: built by run_key() from AGENT_BASE, the agent's declared queue
# key minus ':queue', so they carry the same hash tag and live in the slot the call was
# routed to. `sk` is the helpers' name for a scope key.
RUN_KEY_BOUND = re.compile(r"local\s+(\w+)\s*=\s*run_key\(")


def test_every_script_touches_only_keys_declared_in_its_keys():
    """No key name is built inside a script but a run's, from the agent's own declared key
    (same hash tag): each call's keys are one agent's, so on a cluster no call is
    CROSSSLOT or in another slot."""
    prelude = scripts.key_header() + "".join(
        (LUA / "lib" / f"{name}.lua").read_text() for name in scripts.lib_order()
    )
    assert "local AGENT_BASE = string.sub(K_QUEUE, 1, -7)" in scripts.key_header()
    assert "local function run_key(kind, id) return AGENT_BASE .. ':' .. kind" in prelude
    bound = {"key", "sk", *_names_bound_to_keys(prelude), *RUN_KEY_BOUND.findall(prelude)}
    for loop in KEY_LOOP.findall(prelude):
        assert set(loop.split(", ")) <= bound
    checked = 0
    for path in sorted([*LUA.glob("*.lua"), *(LUA / "lib").glob("*.lua")]):
        text = path.read_text()
        local = bound | _names_bound_to_keys(text) | set(RUN_KEY_BOUND.findall(text))
        for argument in KEY_ARGUMENT.findall(text):
            argument = argument.strip()
            assert argument in local or argument.startswith(("KEYS[", "run_key(")), (
                path.name,
                argument,
            )
            checked += 1
        assert ".." not in "".join(KEY_ARGUMENT.findall(text)), path.name  # no concatenation
    assert checked > 50  # the pattern really finds the calls


def _names_bound_to_keys(text: str) -> set[str]:
    """Locals assigned straight from KEYS[...] (`local a, b = KEYS[1], KEYS[2]`)."""
    names = set()
    for left, right in BOUND_TO_KEYS.findall(text):
        assert right.count("KEYS[") == len(left.split(",")), left  # every name from KEYS
        names.update(n.strip() for n in left.split(","))
    return names
