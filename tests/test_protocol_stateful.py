"""Model-based test of the queue protocol: random sequences of every operation against a
real server, compared after each step with a Python model of where each task must be.

After every step, read straight from Redis: each task is in exactly one state (queued,
delayed, leased, dead, done), no task is lost or duplicated, and the lease deadlines,
queue places and tokens are the ones the model predicts. Time is a virtual clock passed
to every script as now_ms.
"""

from __future__ import annotations

import os
import random
import threading
from dataclasses import dataclass, field

import orjson
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from handoff.client import Client
from handoff.config import RedisPoolConfig, Settings
from handoff.connection.manager import RedisManager
from handoff.protocol.keys import Keys
from handoff.protocol.queue import ClaimRequest, Completion, Failure, TaskQueue
from handoff.protocol.task import EPOCH_MS, PRIORITY_SHIFT, Task, derived_task_id
from harness.procs import plain_client

# The model check runs on one server and on a 3-primary cluster (tests/conftest.py).
BACKENDS = ("server", "cluster")

AGENTS = ("a", "b")
T0 = 1_800_000_000_000
MAX_DELIVERIES = 2
RETRY_BASE_S = 0.5
KEYS = Keys()


@dataclass
class Model:
    """What the protocol must have done with one task."""

    agent: str
    state: str  # queued | delayed | leased | dead | done | purged (gone from Redis)
    score: int  # its place in the queue
    max_attempts: int
    due: int = 0  # delayed: when it becomes ready
    deadline: int = 0  # leased: lease deadline
    token: str | None = None
    deliveries: int = 0
    failures: int = 0
    corrupt: bool = False
    dead_reason: str = ""


@dataclass
class Claimed:
    """One claim call, kept to replay it and to send stale acks/renewals later."""

    agent: str
    claim_id: str
    lease_ms: int
    tasks: list[Task] = field(default_factory=list)


def expected_score(priority: int, at_ms: int) -> int:
    return priority * PRIORITY_SHIFT + at_ms - EPOCH_MS


class ProtocolMachine(RuleBasedStateMachine):
    url: str = ""

    def __init__(self) -> None:
        super().__init__()
        self.r = plain_client(self.url)
        self.r.flushall()
        self.settings = Settings(redis=RedisPoolConfig(url=self.url), max_deliveries=MAX_DELIVERIES)
        self.q = TaskQueue(RedisManager(self.settings.redis, background=False), self.settings)
        self.q2 = TaskQueue(RedisManager(self.settings.redis, background=False), self.settings)
        self.client = Client(settings=self.settings)
        self.now = T0
        self.model: dict[str, Model] = {}
        self.claims: list[Claimed] = []
        self.claim_seq = 0
        # Deterministic ids and backoff jitter: a replayed example must draw the same data.
        self.task_seq = 0
        random.seed(0)

    def teardown(self) -> None:
        self.q.manager.close()
        self.q2.manager.close()
        self.client.close()
        self.r.close()

    # -- model helpers -----------------------------------------------------------------------

    def in_state(self, state: str, agent: str | None = None) -> list[str]:
        return [i for i, m in self.model.items() if m.state == state and agent in (None, m.agent)]

    def handles(self) -> list[Task]:
        return [t for c in self.claims for t in c.tasks]

    def live(self) -> list[Task]:
        """Handles whose lease is still held (the rest are stale)."""
        return [t for t in self.handles() if self.model[t.id].token == t.token]

    def draw_handle(self, data) -> Task:
        """Mostly a live handle (so tasks get far), sometimes any (so stale ones are tried)."""
        live = self.live()
        if live and data.draw(st.integers(0, 3)) > 0:
            return data.draw(st.sampled_from(live))
        return data.draw(st.sampled_from(self.handles()))

    def draw_handles(self, data, max_size: int) -> list[Task]:
        picked = [self.draw_handle(data) for _ in range(data.draw(st.integers(0, max_size)))]
        return list({id(t): t for t in picked}.values())

    def model_reap_and_promote(self, agent: str | None) -> tuple[int, int]:
        """What a claim (one agent) or a reap does before anything else."""
        reaped = promoted = 0
        for m in self.model.values():
            if agent is not None and m.agent != agent:
                continue
            if m.state == "delayed" and m.due <= self.now:
                m.state = "queued"
                promoted += 1
            elif m.state == "leased" and m.deadline <= self.now:
                m.state, m.token = "queued", None
                reaped += 1
        return reaped, promoted

    def model_enqueue(self, tasks: list[Task]) -> list[bool]:
        flags = []
        for t in tasks:
            if t.id in self.model and self.model[t.id].state != "purged":
                flags.append(False)
                continue
            if t.not_before is None:
                state, score, due = "queued", expected_score(t.priority, t.enqueued_at), 0
            else:
                due = self.now + (t.not_before - t.enqueued_at)
                state, score = "delayed", expected_score(t.priority, t.not_before)
            self.model[t.id] = Model(t.agent, state, score, t.max_attempts or 3, due=due)
            flags.append(True)
        return flags

    def new_task(self, agent: str, priority: int, delay_ms: int, key: str | None) -> Task:
        self.task_seq += 1
        task_id = derived_task_id(agent, "key", key) if key else f"{agent}.{self.task_seq:026x}"
        return Task(
            id=task_id,
            agent=agent,
            payload={"p": priority, "d": delay_ms},
            priority=priority,
            max_attempts=None if priority % 2 else 2,
            created_at=self.now,
            enqueued_at=self.now,
            not_before=self.now + delay_ms if delay_ms else None,
            key=key,
        )

    # -- rules -----------------------------------------------------------------------------

    @rule(
        agent=st.sampled_from(AGENTS),
        specs=st.lists(
            st.tuples(
                st.integers(-2, 2),
                st.sampled_from([0, 0, 0, 0, 500, 5_000]),
                st.one_of(st.none(), st.sampled_from(["k1", "k2", "k3"])),
            ),
            min_size=1,
            max_size=6,
        ),
    )
    def enqueue(self, agent, specs):
        tasks = [self.new_task(agent, p, d, k) for p, d, k in specs]
        assert self.q.enqueue(tasks, now_ms=self.now) == self.model_enqueue(tasks)

    @rule(
        agent=st.sampled_from(AGENTS),
        n=st.integers(0, 6),
        # Leases of a minute or more: a claim's replay key lives lease_ms of real time, so
        # it never expires inside one example (virtual time moves leases, not real time).
        lease_ms=st.sampled_from([60_000, 120_000, 300_000]),
        global_limit=st.sampled_from([0, 0, 2, 4]),
    )
    def claim(self, agent, n, lease_ms, global_limit):
        self.claim_seq += 1
        claim_id = f"c{self.claim_seq}"
        request = ClaimRequest(agent, n, lease_ms, global_limit, claim_id)
        got = self.q.claim([request], now_ms=self.now)[agent]
        self.claims.append(Claimed(agent, claim_id, lease_ms, got))
        self.model_claim(agent, n, lease_ms, global_limit, claim_id, got)

    def model_claim(self, agent, n, lease_ms, global_limit, token, got: list[Task]) -> None:
        self.model_reap_and_promote(agent)
        if global_limit:
            n = min(n, global_limit - len(self.in_state("leased", agent)))
        ready = sorted(self.in_state("queued", agent), key=lambda i: (self.model[i].score, i))
        expected = []
        for task_id in ready[: max(0, n)]:
            m = self.model[task_id]
            m.deliveries += 1
            if m.deliveries - m.failures > MAX_DELIVERIES:
                m.state, m.dead_reason = "dead", "poison"
                continue
            m.state, m.token, m.deadline = "leased", token, self.now + lease_ms
            if m.corrupt:  # leased, then dead-lettered by the claim's nack
                m.failures += 1
                m.state, m.token, m.dead_reason = "dead", None, "corrupt task JSON"
                continue
            expected.append(task_id)
        assert [t.id for t in got] == expected
        for t in got:
            m = self.model[t.id]
            assert (t.token, t.attempt, t.deliveries) == (token, m.failures + 1, m.deliveries)

    @precondition(lambda self: self.claims)
    @rule(data=st.data())
    def replay_claim(self, data):
        """The same claim_id again (a retry after a lost reply): the same batch, minus
        what is no longer held by it; no new lease."""
        old = data.draw(st.sampled_from(self.claims))
        replay_key = KEYS.agent(old.agent).claim(old.claim_id)
        exists = self.r.exists(replay_key) == 1
        request = ClaimRequest(old.agent, 5, old.lease_ms, 0, old.claim_id)
        got = self.q.claim([request], now_ms=self.now)[old.agent]
        if exists:
            held = [t.id for t in old.tasks if self.model[t.id].token == old.claim_id]
            assert [t.id for t in got] == held
        else:  # it leased nothing (no replay key): this is a fresh claim
            self.model_claim(old.agent, 5, old.lease_ms, 0, old.claim_id, got)
            old.tasks = got

    @precondition(lambda self: self.handles())
    @rule(data=st.data())
    def ack(self, data):
        picked = self.draw_handles(data, 4)
        stale = self.q.ack([Completion(t, b'{"ok":1}') for t in picked], now_ms=self.now)
        expected_stale = []
        for t in picked:
            m = self.model[t.id]
            if m.token == t.token:
                m.state, m.token = "done", None
            else:
                expected_stale.append(t.id)
        assert sorted(stale) == sorted(expected_stale)

    @precondition(lambda self: self.handles())
    @rule(data=st.data(), dead_now=st.sampled_from([False, False, False, True]))
    def nack(self, data, dead_now):
        t = self.draw_handle(data)
        failure = Failure(t, "Boom: it broke", "Traceback: here", dead_now, RETRY_BASE_S)
        stale = self.q.nack([failure], now_ms=self.now)
        m = self.model[t.id]
        if m.token != t.token:
            assert stale == [t.id]
            return
        assert stale == []
        m.failures += 1
        m.token = None
        if dead_now or m.failures >= m.max_attempts:
            m.state, m.dead_reason = "dead", "Boom: it broke"
            return
        # Backoff has jitter: read the due time, and check it is inside the allowed window.
        due = int(self.r.zscore(KEYS.agent(m.agent).delayed, t.id))
        ceiling = RETRY_BASE_S * 1000 * 2 ** (t.attempt - 1)
        assert self.now + ceiling / 2 - 1 <= due <= self.now + ceiling
        m.state, m.due = "delayed", due

    @precondition(lambda self: self.handles())
    @rule(data=st.data(), lease_ms=st.sampled_from([60_000, 200_000]))
    def extend(self, data, lease_ms):
        picked = self.draw_handles(data, 3)
        lost = self.q.extend(picked, lease_ms, now_ms=self.now)
        expected_lost = []
        for t in picked:
            m = self.model[t.id]
            if m.token == t.token:
                m.deadline = self.now + lease_ms
            else:
                expected_lost.append(t.id)
        assert sorted(lost) == sorted(expected_lost)

    @precondition(lambda self: self.handles())
    @rule(data=st.data())
    def release(self, data):
        picked = self.draw_handles(data, 3)
        released = self.q.release(picked)
        expected = 0
        for t in picked:
            m = self.model[t.id]
            if m.token == t.token:
                m.state, m.token = "queued", None
                m.deliveries -= 1
                expected += 1
        assert released == expected

    @rule(ms=st.sampled_from([1, 499, 500, 1_000, 5_000, 60_000, 120_001]))
    def advance_clock(self, ms):
        self.now += ms

    @rule(racing=st.booleans())
    def reap(self, racing):
        if not racing:
            got = self.q.reap(AGENTS, now_ms=self.now)
        else:  # two reapers at once, each with its own connection pool
            results: list[dict] = []
            barrier = threading.Barrier(2)

            def run(q: TaskQueue) -> None:
                barrier.wait()
                results.append(q.reap(AGENTS, now_ms=self.now))

            threads = [threading.Thread(target=run, args=(q,)) for q in (self.q, self.q2)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            got = {a: tuple(map(sum, zip(*(r[a] for r in results), strict=True))) for a in AGENTS}
        for agent in AGENTS:
            assert got[agent] == self.model_reap_and_promote(agent)

    @precondition(lambda self: self.handles())
    @rule(data=st.data(), ack_parent=st.booleans())
    def handoff(self, data, ack_parent):
        """A handler returned a Handoff: the child (derived id) first, then the parent's ack.
        Without the ack the worker died in between; the parent will run again and make
        the same child, which must not be stored twice."""
        parent = self.draw_handle(data)
        child = Task(
            id=derived_task_id("b", parent.id, "0"),
            agent="b",
            payload={"from": parent.id},
            created_at=self.now,
            enqueued_at=self.now,
            parent_id=parent.id,
            trace=[*parent.trace, parent.id],
        )
        assert self.q.enqueue([child], now_ms=self.now) == self.model_enqueue([child])
        if ack_parent:
            stale = self.q.ack([Completion(parent, handoffs=1)], now_ms=self.now)
            m = self.model[parent.id]
            if m.token == parent.token:
                m.state, m.token = "done", None
                assert stale == []
            else:
                assert stale == [parent.id]

    @precondition(lambda self: self.in_state("queued") or self.in_state("delayed"))
    @rule(data=st.data())
    def corrupt(self, data):
        """Damage a waiting task's JSON in Redis: its next claim must dead-letter it."""
        waiting = self.in_state("queued") + self.in_state("delayed")
        task_id = data.draw(st.sampled_from(sorted(waiting)))
        self.r.hset(KEYS.agent(self.model[task_id].agent).tasks, task_id, b'{"id": 1, "garbage')
        self.model[task_id].corrupt = True

    @precondition(lambda self: self.in_state("dead"))
    @rule(agent=st.sampled_from(AGENTS), purge=st.booleans())
    def dead_letters(self, agent, purge):
        dead = sorted(self.in_state("dead", agent), key=lambda i: i)
        if purge:
            assert self.client.dead_purge(agent) == len(dead)
            for task_id in dead:
                self.model[task_id].state = "purged"
        else:
            assert sorted(self.client.dead_requeue(agent)) == dead
            for task_id in dead:
                m = self.model[task_id]
                m.state, m.deliveries, m.failures, m.dead_reason = "queued", 0, 0, ""

    # -- the invariant ---------------------------------------------------------------------

    @invariant()
    def every_task_is_in_exactly_one_state(self):
        seen: dict[str, str] = {}
        for agent in AGENTS:
            k = KEYS.agent(agent)
            pipe = self.r.pipeline(transaction=True)
            for name in ("queue", "delayed", "leases", "dead"):
                pipe.zrange(getattr(k, name), 0, -1, withscores=True)
            pipe.hkeys(k.tasks)
            pipe.hgetall(k.tokens)
            pipe.hgetall(k.dead_reasons)
            queue, delayed, leases, dead, payloads, tokens, reasons = pipe.execute()
            zsets = {"queued": queue, "delayed": delayed, "leased": leases, "dead": dead}
            for state, entries in zsets.items():
                for member, score in entries:
                    task_id = member.decode()
                    assert task_id not in seen, f"{task_id} is {seen[task_id]} and {state}"
                    seen[task_id] = state
                    m = self.model.get(task_id)
                    assert m is not None, f"{task_id} is {state} but was never enqueued"
                    assert m.agent == agent
                    if state == "queued":
                        assert score == m.score, task_id
                    elif state == "delayed":
                        assert score == m.due, task_id
                    elif state == "leased":
                        assert score == m.deadline, task_id
            waiting = {i for i, s in seen.items() if self.model[i].agent == agent}
            # Every waiting/running/dead task has its payload; finished ones have none.
            assert {p.decode() for p in payloads} == waiting
            assert {t.decode(): v.decode() for t, v in tokens.items()} == {
                i: self.model[i].token for i in self.in_state("leased", agent)
            }
            assert {r.decode() for r in reasons} == set(self.in_state("dead", agent))
            for member, raw in reasons.items():
                expected = self.model[member.decode()].dead_reason
                assert expected in orjson.loads(raw)["reason"]
        for task_id, m in self.model.items():
            if m.state in ("done", "purged"):
                assert task_id not in seen
                done = m.state == "done"
                assert self.r.exists(KEYS.agent(m.agent).result(task_id)) == done
            else:
                assert seen.get(task_id) == m.state, (task_id, m)


def test_protocol_matches_its_model(redis_url, backend):
    ProtocolMachine.url = redis_url
    run_state_machine_as_test(
        ProtocolMachine,
        settings=settings(
            # 80 examples of 80 steps: about 12 s against a local server on a quiet machine.
            # On a cluster an example costs about 50 % more (three nodes to flush and
            # route); the model is the same, so fewer examples check the routing.
            # HYPOTHESIS_EXAMPLES=500 runs more of either (the suite's longest test, kept
            # lean).
            max_examples=int(os.environ.get("HYPOTHESIS_EXAMPLES", 0))
            or (80 if backend != "cluster" else 60),
            stateful_step_count=80,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        ),
    )
