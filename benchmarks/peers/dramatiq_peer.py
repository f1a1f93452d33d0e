"""Dramatiq with its Redis broker.

Settings: `dramatiq app_dramatiq --processes 2 --threads 8` (its defaults on this machine:
processes = CPU count, 8 threads each, default middleware, prefetch = 2 x threads); I/O:
`--threads 16`. Bulk enqueue: Dramatiq has no multi-message enqueue (group(...).run()
enqueues one by one), so bulk is a loop of broker.enqueue (one EVALSHA each); single:
broker.enqueue of one message (what actor.send does).
"""

from __future__ import annotations

from importlib.metadata import version

from benchmarks.peers.base import IO, NOOP, Peer, python_argv


class DramatiqPeer(Peer):
    name = "dramatiq"
    settings_note = {
        NOOP: "--processes 2 --threads 8 (defaults), default middleware",
        IO: "--processes 2 --threads 16",
    }
    bulk_note = "none in the API: broker.enqueue per message (one EVALSHA each)"

    @staticmethod
    def versions() -> dict[str, str]:
        return {"dramatiq": version("dramatiq")}

    def connect(self, broker_url: str, stats_url: str) -> None:
        from dramatiq.brokers.redis import RedisBroker

        self.broker_url, self.stats_url = broker_url, stats_url
        self.broker = RedisBroker(url=broker_url)
        self.broker.declare_queue("default")

    def close(self) -> None:
        self.broker.close()

    def _message(self, kind: str, payload: tuple[float, int]):
        from dramatiq import Message

        return Message(queue_name="default", actor_name=kind, args=payload, kwargs={}, options={})

    def enqueue_bulk(self, kind: str, payloads: list[tuple[float, int]]) -> None:
        for payload in payloads:
            self.broker.enqueue(self._message(kind, payload))

    def enqueue_one(self, kind: str, payload: tuple[float, int]) -> None:
        self.broker.enqueue(self._message(kind, payload))

    def worker_commands(self, kind: str) -> list[list[str]]:
        threads = "16" if kind == IO else "8"
        return [
            python_argv("-m", "dramatiq", "app_dramatiq", "--processes", "2", "--threads", threads)
        ]

    def slots(self, kind: str) -> int:
        return 16 if kind == IO else 8
