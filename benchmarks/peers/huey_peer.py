"""Huey with Redis storage (RedisHuey: blocking BRPOP dequeue, results on).

Settings: noop: `huey_consumer app_huey.huey -k process -w 2` (2 worker processes + the
consumer's scheduler process), defaults otherwise; I/O: 2 consumers `-k thread -w 16` (one
process each). Log level: -q (warnings). Huey has no bulk enqueue: task.map(items) enqueues
one by one (one LPUSH each); single: calling the task.
"""

from __future__ import annotations

import importlib
import sys
from importlib.metadata import version

from benchmarks.peers.base import IO, NOOP, PEERS_DIR, Peer, python_argv


class HueyPeer(Peer):
    name = "huey"
    settings_note = {
        NOOP: "-k process -w 2, RedisHuey (blocking dequeue), defaults",
        IO: "2 consumers x -k thread -w 16",
    }
    bulk_note = "none in the API: task.map(items) (one LPUSH each)"

    @staticmethod
    def versions() -> dict[str, str]:
        return {"huey": version("huey")}

    def connect(self, broker_url: str, stats_url: str) -> None:
        # Huey names tasks "<module>.<name>": import the app under the name the workers use.
        if str(PEERS_DIR) not in sys.path:
            sys.path.append(str(PEERS_DIR))
        build = importlib.import_module("app_huey").build
        self.broker_url, self.stats_url = broker_url, stats_url
        self.huey, self.tasks = build(broker_url)

    def enqueue_bulk(self, kind: str, payloads: list[tuple[float, int]]) -> None:
        self.tasks[kind].map(payloads)

    def enqueue_one(self, kind: str, payload: tuple[float, int]) -> None:
        self.tasks[kind](*payload)

    def worker_commands(self, kind: str) -> list[list[str]]:
        base = python_argv("-m", "huey.bin.huey_consumer", "app_huey.huey", "-q")
        if kind == IO:
            return [[*base, "-k", "thread", "-w", "16"] for _ in range(2)]
        return [[*base, "-k", "process", "-w", str(self.processes)]]

    def slots(self, kind: str) -> int:
        return 16 if kind == IO else 1
