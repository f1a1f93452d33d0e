"""Celery with its Redis broker.

Settings: noop: `celery worker -P prefork -c 2` (one main process + 2 pool processes), Celery
defaults otherwise (prefetch multiplier 4, early ack, fair scheduling), no result backend
(task_ignore_result), --without-gossip --without-mingle --without-heartbeat (the usual
production flags for a Redis broker), log level WARNING. I/O: prefork cannot run 16 tasks at
once per process, so 2 worker processes `-P gevent -c 16` each (Celery's documented pool
for I/O-bound work). Bulk enqueue: group(signatures).apply_async() (one producer, one
LPUSH per message: Celery has no multi-message publish); single: send_task.
"""

from __future__ import annotations

from importlib.metadata import version

from benchmarks.peers.base import IO, NOOP, Peer, python_argv

CHUNK = 1000
FLAGS = ["--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "WARNING"]


class CeleryPeer(Peer):
    name = "celery"
    settings_note = {
        NOOP: "prefork -c 2, prefetch multiplier 4, early ack, no result backend",
        IO: "2 processes x gevent pool -c 16 (prefork can't run 16 at once per process)",
    }
    bulk_note = "group(...).apply_async() (no multi-message publish: one LPUSH each)"

    @staticmethod
    def versions() -> dict[str, str]:
        return {"celery": version("celery"), "kombu": version("kombu"), "gevent": version("gevent")}

    def connect(self, broker_url: str, stats_url: str) -> None:
        from benchmarks.peers.app_celery import make_app

        self.broker_url, self.stats_url = broker_url, stats_url
        self.app = make_app(broker_url)

    def close(self) -> None:
        self.app.close()

    def enqueue_bulk(self, kind: str, payloads: list[tuple[float, int]]) -> None:
        from celery import group

        for i in range(0, len(payloads), CHUNK):
            sigs = [self.app.signature(kind, args=p) for p in payloads[i : i + CHUNK]]
            group(sigs).apply_async()

    def enqueue_one(self, kind: str, payload: tuple[float, int]) -> None:
        self.app.send_task(kind, args=payload)

    def worker_commands(self, kind: str) -> list[list[str]]:
        base = python_argv("-m", "celery", "-A", "app_celery", "worker", *FLAGS)
        if kind == IO:
            return [[*base, "-P", "gevent", "-c", "16", "-n", f"io{i}@%h"] for i in range(2)]
        return [[*base, "-P", "prefork", "-c", str(self.processes), "-n", "noop@%h"]]

    def slots(self, kind: str) -> int:
        return 16 if kind == IO else 1
