"""Handoff(agent, payload, key=K, on_conflict=...): a handler hands to a task shared by key,
which runs in a run of its own (runtime/keyed.py), enqueued before the handing task's ack.
Real workers (`start`) where the runs matter, the in-process runner for what settling
decides; a server and a cluster. What the agents did is recorded outside handoff
(tests/apps/handkey.py). HANDOFF_KEY_TEST_PARENTS (30) is how many parents the crash
test runs."""

from __future__ import annotations

import os
import random
import signal
import time

import orjson
import psutil
import pytest

from handoff.errors import TaskDead
from handoff.protocol.keys import Keys
from harness.procs import wait_until

pytestmark = pytest.mark.backends("server", "cluster")

APP = "apps.handkey"
PARENTS_N = int(os.environ.get("HANDOFF_KEY_TEST_PARENTS", "30"))


def _records(raw_redis, name: str) -> list[dict]:
    return [orjson.loads(item) for item in raw_redis.lrange(name, 0, -1)]


def _stored(raw_redis, task_id: str, agent: str = "hkeyed") -> dict | None:
    raw = raw_redis.hget(Keys().agent(agent).tasks, task_id)
    return None if raw is None else orjson.loads(raw)


@pytest.fixture
def app(redis_url, monkeypatch):
    """The test app in-process (real claims, the worker's own settling)."""
    from handoff.testing import InProcessApp

    monkeypatch.setenv("TEST_REDIS_URL", redis_url)
    made = InProcessApp(APP, redis_url, agents=["hander", "hjoiner", "hplain"])
    yield made
    made.close()


# -- with workers: many runs coalesce into one keyed task -------------------------------


@pytest.mark.parametrize(
    "hand",
    [
        {"key": "k", "on_conflict": "debounce", "debounce_s": 0.3},
        {"key": "k", "on_conflict": "replace"},
    ],
    ids=["debounce", "replace"],
)
def test_many_runs_handing_to_one_key_make_one_run_of_the_last_payload(
    start, client, raw_redis, hand, backend
):
    """Ten runs hand to key k; each ends without waiting for the keyed task (its worker
    is not even started yet), its result the link; the keyed task is one run of its own
    and, once its worker starts, runs once with the last payload."""
    start(["worker", "hander"], app=APP)
    parents = [client.enqueue("hander", {"v": i, "hand": hand}) for i in range(10)]
    ends = [client.result(p, wait_s=30, follow=True) for p in parents]
    kid = ends[0]["keyed"][0]
    assert ends == [{"keyed": [kid]}] * 10
    assert client.status(kid) in ("queued", "delayed")  # nothing ran it: nobody waited
    assert _stored(raw_redis, kid)["payload"] == {"v": 9}
    assert "run" not in _stored(raw_redis, kid)  # a root: its own run
    start(["worker", "hkeyed"], app=APP)
    assert client.result(kid, wait_s=30, follow=True) == 9
    wait_until(lambda: client.status(kid) == "done", 10, "the keyed task done")
    assert [(r["v"], r["run"]) for r in _records(raw_redis, "handkey:runs")] == [(9, kid)]
    tree = client.tree(parents[3])
    assert tree["handed_to"] == [kid] and tree["children"] == []


def test_a_keyed_handoff_beside_a_plain_one_leaves_the_run_to_the_child(
    start, client, raw_redis, backend, capsys
):
    """The run follows the plain child only; the record links the keyed task; `handoff
    inspect tree` shows the link."""
    from handoff.cli import main

    start(["supervise", "--agents", "hander=1,hplain=1,hkeyed=1"], app=APP)
    hand = {"key": "mixed", "on_conflict": "debounce", "debounce_s": 0.3}
    parent = client.enqueue("hander", {"v": 7, "hand": hand, "plain": True})
    assert client.result(parent, wait_s=30, follow=True) == {"plain": 7}
    record = client.result(parent, wait_s=5)
    kid = record["keyed"][0]
    assert record == {"handoff": [record["handoff"][0]], "keyed": [kid]}
    assert client.result(kid, wait_s=30) == 7
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(["--redis-url", client.settings.redis.url, "inspect", "tree", parent])
    out = capsys.readouterr().out
    assert exited.value.code in (0, None), out
    assert f"handed to keyed {kid}" in out and "hplain" in out, out
    assert f'href="/runs/{kid}"' in _run_page(client, parent)  # the dashboard links it


def _run_page(client, root: str) -> str:
    """The dashboard's run page region, rendered from the run's tree as the page does."""
    from handoff.observe.web.pages import run_summary, walk
    from handoff.observe.web.render import Renderer

    tree = client.tree(root)
    summary = run_summary(tree, list(walk(tree)), time.time() * 1000)
    return str(
        Renderer().region(
            "run", tree=tree, root=root, summary=summary, actions=None, too_large=False, events=[]
        )
    )


# -- bad input, and where a keyed Handoff cannot go -------------------------------------


BAD = [
    ({"on_conflict": "replace"}, "handoff to hkeyed: on_conflict='replace' needs a key (key=...)"),
    ({"key": "k", "on_conflict": "later"}, "handoff to hkeyed: on_conflict 'later': one of skip"),
    ({"key": "k", "debounce_s": 1}, "debounce_s applies only with on_conflict='debounce'"),
    ({"key": "k", "on_conflict": "debounce"}, "on_conflict='debounce' needs debounce_s"),
    (
        {"key": "k", "on_conflict": "debounce", "debounce_s": 2, "debounce_max_s": 1},
        "debounce_max_s 1 is less than debounce_s 2",
    ),
    ({"key": ""}, "handoff to hkeyed: key: must be a string of 1 to 256 characters"),
    ({"key": "k" * 257}, "key: must be a string of 1 to 256 characters"),
    ({"debounce_max_s": 3}, "debounce_max_s applies only with on_conflict='debounce'"),
]


@pytest.mark.parametrize(("hand", "says"), BAD)
def test_a_bad_keyed_handoff_dead_letters_its_task_in_one_line(
    app, client, raw_redis, hand, says, backend
):
    parent = client.enqueue("hander", {"v": 1, "hand": hand})
    runs = app.run_until_idle()
    assert runs[parent].status == "dead" and runs[parent].attempts == 1
    assert says in runs[parent].reason and "\n" not in runs[parent].reason, runs[parent].reason
    with pytest.raises(TaskDead):
        client.result(parent, wait_s=1)
    assert raw_redis.hlen(Keys().agent("hkeyed").tasks) == 0  # no keyed task written


@pytest.mark.parametrize(
    ("where", "says"),
    [
        ("branch", "join branch 1 (handoff to hkeyed): a keyed Handoff (key=) runs in a run "
         "of its own, and a join must wait for its branches"),
        ("then", "join then (handoff to hkeyed): a keyed Handoff (key=) runs in a run of its own"),
        ("wait", "wait then (handoff to hkeyed): a keyed Handoff (key=) runs in a run of its own"),
    ],
)  # fmt: skip
def test_a_keyed_handoff_is_refused_where_a_join_or_wait_waits_for_it(
    app, client, raw_redis, where, says, backend
):
    parent = client.enqueue("hjoiner", {"v": 1, "where": where, "hand": {"key": "k"}})
    runs = app.run_until_idle()
    assert runs[parent].status == "dead" and says in runs[parent].reason, runs[parent].reason
    assert raw_redis.hlen(Keys().agent("hkeyed").tasks) == 0
    assert raw_redis.hlen(Keys().agent("hplain").tasks) == 0  # nor any branch


def test_a_keyed_handoff_with_skip_is_the_task_client_enqueue_makes(app, client, raw_redis):
    """key= alone (skip): the same id as client.enqueue(key=); a task holding the key stays."""
    held = client.enqueue("hkeyed", {"v": "first"}, key="same")
    parent = client.enqueue("hander", {"v": "second", "hand": {"key": "same"}})
    runs = app.run_until_idle()
    assert runs[parent].result == {"keyed": [held]}
    assert _stored(raw_redis, held)["payload"] == {"v": "first"}


# -- a crash between the keyed enqueue and the ack --------------------------------------


def test_a_worker_killed_after_the_keyed_enqueue_before_its_ack_loses_nothing(
    start, client, raw_redis, redis_tcp_addr, backend
):
    """The seam, made wide: the handing worker talks through a proxy that holds every reply
    300 ms; the moment its keyed task is in the server, the worker is SIGKILLed, so its ack
    is never sent. Another worker runs the parent again after its lease: the key's task
    is still one task (the retry's debounced enqueue coalesced into it), the parent is done
    once, and the keyed task runs once."""
    from harness.faultproxy import FaultProxy

    with FaultProxy(redis_tcp_addr) as proxy:  # (one server: a cluster's nodes redirect)
        victim = start(["worker", "hander"], url=proxy.url, app=APP, lease_s=1)
        warm = client.enqueue("hander", {"v": 0, "hand": {"key": "warm"}})
        assert client.result(warm, wait_s=30) == {"keyed": [_key_id("hkeyed", "warm")]}
        hand = {"key": "seam", "on_conflict": "debounce", "debounce_s": 0.3}
        proxy.delay(300)
        parent = client.enqueue("hander", {"v": 1, "hand": hand})
        kid = _key_id("hkeyed", "seam")
        wait_until(lambda: _stored(raw_redis, kid) is not None, 30, "the keyed enqueue")
        os.killpg(victim.pid, signal.SIGKILL)
        assert client.status(parent) == "running"  # its ack never went out
    start(["worker", "hander"], app=APP, lease_s=1)
    assert client.result(parent, wait_s=30, follow=True) == {"keyed": [kid]}
    ran = [p["id"] for p in _records(raw_redis, "handkey:parents")]
    assert ran.count(parent) == 2  # the killed delivery, and the one after its lease
    start(["worker", "hkeyed"], app=APP)
    assert client.result(kid, wait_s=30) == 1
    wait_until(lambda: client.status(kid) == "done", 10, "the keyed task done")
    assert [r["v"] for r in _records(raw_redis, "handkey:runs") if r["id"] == kid] == [1]


def _key_id(agent: str, key: str) -> str:
    from handoff.protocol.conflict import key_task_id

    return key_task_id(agent, key)


def _kill_a_grown_worker(supervisor, rng: random.Random, grown_s: float = 0.5) -> bool:
    """SIGKILL one of the supervisor's workers up at least grown_s (a worker killed while
    it boots tests nothing); False when none is."""
    now = time.time()
    grown = []
    for child in supervisor.live_children():
        try:
            if now - child.create_time() > grown_s:
                grown.append(child)
        except psutil.NoSuchProcess:
            pass
    try:
        rng.choice(grown).send_signal(signal.SIGKILL) if grown else None
    except psutil.NoSuchProcess:
        return False
    return bool(grown)


def test_workers_killed_at_random_lose_no_parent_and_no_keyed_task(
    start, client, raw_redis, backend
):
    """PARENTS_N parents, each handing to its own key (skip), while the handing workers
    are SIGKILLed at random: every parent ends done, every key's task ran exactly once
    (a parent run again after its keyed enqueue finds the key held or just finished)."""
    # Kills every 0.1-0.3 s can land on one parent's deliveries ten times (each kill counts
    # a delivery for every task its worker held): the poison limit is not what is tested.
    supervisor = start(
        ["supervise", "--agents", "hander=2"],
        app=APP,
        lease_s=1,
        crash_backoff_max_s=0.2,
        max_deliveries=1000,
    )
    start(["worker", "hkeyed"], app=APP)
    parents = [
        client.enqueue("hander", {"v": i, "hand": {"key": f"k{i}"}, "sleep_s": 0.1})
        for i in range(PARENTS_N)
    ]
    rng, kills, pending = random.Random(0), 0, set(parents)
    deadline = time.monotonic() + 60
    while pending and time.monotonic() < deadline:
        time.sleep(rng.uniform(0.1, 0.3))  # the fault's cadence, not a synchronisation
        kills += _kill_a_grown_worker(supervisor, rng)
        pending = {p for p in pending if client.status(p) != "done"}
    dead = {p: client.dead_reason(p) for p in parents if client.status(p) == "dead"}
    assert not dead, dead
    assert [client.status(p) for p in parents] == ["done"] * PARENTS_N
    keys = [_key_id("hkeyed", f"k{i}") for i in range(PARENTS_N)]
    assert [client.result(p, wait_s=1) for p in parents] == [{"keyed": [k]} for k in keys]
    wait_until(lambda: len(_records(raw_redis, "handkey:runs")) >= PARENTS_N, 30, "every keyed run")
    runs = sorted(r["v"] for r in _records(raw_redis, "handkey:runs"))
    assert runs == list(range(PARENTS_N))  # each key's task ran, once
    print(f"{PARENTS_N} parents, {kills} kills, " + _repeats(raw_redis, keys))


def _repeats(raw_redis, keys: list[str]) -> str:
    """How many parents ran again, and of those how many after their keyed task was
    already enqueued (a kill between the keyed enqueue and the ack, or during the ack)."""
    ran: dict[int, list[float]] = {}
    for entry in _records(raw_redis, "handkey:parents"):
        ran.setdefault(entry["v"], []).append(entry["at"])
    again = {v: at for v, at in ran.items() if len(at) > 1}
    after = 0
    for v, at in again.items():  # the keyed task's record has its enqueue time
        record = orjson.loads(raw_redis.get(Keys().agent("hkeyed").result(keys[v])))
        after += record["enqueued_at"] / 1000 < max(at)
    return f"{len(again)} parents ran again, {after} of them after their keyed enqueue"


def test_the_in_process_app_runs_a_keyed_task_as_a_run_of_its_own(redis_url, monkeypatch):
    """handoff.testing settles as a worker does: three parents debounce into one keyed
    run (the virtual clock jumps over its wait), the last payload's."""
    from handoff.testing import InProcessApp

    monkeypatch.setenv("TEST_REDIS_URL", redis_url)
    made = InProcessApp(APP, redis_url, agents=["hander", "hkeyed"])
    try:
        hand = {"key": "k", "on_conflict": "debounce", "debounce_s": 0.3}
        parents = [made.enqueue("hander", {"v": i, "hand": hand}) for i in range(3)]
        runs = made.run_until_idle()
        kid = runs[parents[0]].result["keyed"][0]
        assert [runs[p].result for p in parents] == [{"keyed": [kid]}] * 3
        assert runs[kid].status == "done" and runs[kid].attempts == 1
        assert runs.result(kid) == 2 and runs.result(parents[0]) == {"keyed": [kid]}
    finally:
        made.close()
