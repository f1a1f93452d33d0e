"""handoff, as a peer of the others.

Settings: `handoff supervise --agents noop=2` (or io=2): the supervisor forks 2 worker
processes; library defaults otherwise (log level WARNING, prefetch 2, claim batch max 100,
lease 30 s, heartbeat 1 s, results kept 1 h). Agents (app_handoff): noop is a sync agent with
max_concurrent=8; io is an async agent with max_concurrent=16. Bulk enqueue is
Client.enqueue_many in chunks of 1,000 (one round trip each); single is Client.enqueue.
"""

from __future__ import annotations

from importlib.metadata import version

from benchmarks.peers.base import IO, NOOP, Peer, python_argv

CHUNK = 1000


class HandoffPeer(Peer):
    name = "handoff"
    settings_note = {
        NOOP: "supervise noop=2, sync agent max_concurrent=8, prefetch 2 (defaults)",
        IO: "supervise io=2, async agent max_concurrent=16, prefetch 2",
    }
    bulk_note = "Client.enqueue_many, 1,000 per call (one round trip)"

    @staticmethod
    def versions() -> dict[str, str]:
        return {"handoff": version("handoff"), "redis-py": version("redis")}

    def connect(self, broker_url: str, stats_url: str) -> None:
        from handoff.client import Client
        from handoff.config import RedisPoolConfig, Settings

        self.broker_url, self.stats_url = broker_url, stats_url
        self.client = Client(settings=Settings(redis=RedisPoolConfig(url=broker_url)))

    def close(self) -> None:
        self.client.close()

    def enqueue_bulk(self, kind: str, payloads: list[tuple[float, int]]) -> None:
        for i in range(0, len(payloads), CHUNK):
            self.client.enqueue_many(kind, payloads[i : i + CHUNK])

    def enqueue_one(self, kind: str, payload: tuple[float, int]) -> None:
        self.client.enqueue(kind, payload)

    def worker_commands(self, kind: str) -> list[list[str]]:
        argv = python_argv("-m", "handoff", "supervise", "--agents", f"{kind}={self.processes}")
        return [argv]

    def worker_env(self) -> dict[str, str]:
        env = super().worker_env()
        env.update(
            HANDOFF_REDIS_URL=self.broker_url,
            HANDOFF_APP="app_handoff",
            HANDOFF_LOG_LEVEL="WARNING",
            HANDOFF_PREFETCH="2",  # the default, whatever the caller's environment says
        )
        return env

    def slots(self, kind: str) -> int:
        return 16 if kind == IO else 8


class HandoffPrefetchPeer(HandoffPeer):
    """handoff with HANDOFF_PREFETCH=32: bigger claim batches (the one setting changed).

    Shown beside the defaults because the claim batch size is what bounds a noop drain:
    see the report's notes.
    """

    name = "handoff-pf32"
    prefetch = 32
    settings_note = {
        NOOP: "as handoff, with prefetch 32 (HANDOFF_PREFETCH=32)",
        IO: "as handoff, with prefetch 32",
    }

    def worker_env(self) -> dict[str, str]:
        env = super().worker_env()
        env["HANDOFF_PREFETCH"] = str(self.prefetch)
        return env


class HandoffTypedPeer(HandoffPeer):
    """handoff with typed payloads (app_handoff_typed: payload=tuple[float, int]): what
    checking a small payload costs the workers (at claim), beside the untyped agents. The
    producer does not load the app (its share is `handoff bench payloads`): loading it
    here would type the untyped runs of the same process too."""

    name = "handoff-typed"
    settings_note = {
        NOOP: "as handoff, payload=tuple[float, int] (pydantic, checked at claim)",
        IO: "as handoff, payload=tuple[float, int]",
    }

    def worker_env(self) -> dict[str, str]:
        env = super().worker_env()
        env["HANDOFF_APP"] = "app_handoff_typed"
        return env


class HandoffNoTreePeer(HandoffPeer):
    """handoff with HANDOFF_RUN_TTL_S=0: no run tree kept (a finished task's record holds
    its result only). Beside the defaults it shows what tracking runs costs the hot path:
    the tree's fields in each record and its longer TTL (a run's notices, applied in the
    ack, are the same in both)."""

    name = "handoff-notree"
    settings_note = {
        NOOP: "as handoff, run_ttl_s=0 (no run tree)",
        IO: "as handoff, run_ttl_s=0",
    }

    def worker_env(self) -> dict[str, str]:
        env = super().worker_env()
        env["HANDOFF_RUN_TTL_S"] = "0"
        return env


GROUPS = 100


class HandoffGroupsPeer(HandoffPeer):
    """handoff with every task in one of 100 groups (round robin), taken in rotation, and
    a start rate far above the drain rate (app_handoff_groups: rate 100000/s): what fair
    sharing costs a drain, beside the plain queue. Bulk enqueue writes the same 1,000-task
    batches, each task with its group."""

    name = "handoff-groups"
    app = "app_handoff_groups"
    settings_note = {
        NOOP: f"as handoff, tasks in {GROUPS} groups in rotation, rate 100000/s",
        IO: f"as handoff, tasks in {GROUPS} groups in rotation, rate 100000/s",
    }

    def enqueue_bulk(self, kind: str, payloads: list[tuple[float, int]]) -> None:
        from handoff.client import build_task

        for i in range(0, len(payloads), CHUNK):
            tasks = []
            for n, payload in enumerate(payloads[i : i + CHUNK], i):
                task = build_task(kind, payload)
                task.group = f"g{n % GROUPS}"
                tasks.append(task)
            self.client.queue.enqueue(tasks)

    def enqueue_one(self, kind: str, payload: tuple[float, int]) -> None:
        self.client.enqueue(kind, payload, group="g0")

    def worker_env(self) -> dict[str, str]:
        env = super().worker_env()
        env["HANDOFF_APP"] = self.app
        return env


class HandoffGroupRatePeer(HandoffGroupsPeer):
    """As handoff-groups, with each group's own start rate (group_rate 100000/s) instead of
    the agent's: every start moves its group's limiter (two more commands per task)."""

    name = "handoff-grouprate"
    app = "app_handoff_grouprate"
    settings_note = {
        NOOP: f"as handoff, tasks in {GROUPS} groups in rotation, group_rate 100000/s",
        IO: f"as handoff, tasks in {GROUPS} groups in rotation, group_rate 100000/s",
    }
