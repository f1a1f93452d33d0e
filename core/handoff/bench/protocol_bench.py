"""`handoff bench protocol`: enqueue and claim+ack throughput next to the bare-command limit.

Runs in: the bench command, one process, one thread. It starts a private server of its
own (a unix socket in a temp folder) and never touches any other. For every figure the
same run also measures the server's limit for the same work done with bare commands in a
redis-py pipeline (no Lua, no task model, no validation), so the ratio column reads
"how much of the raw limit the protocol keeps" on this machine, whatever the machine.

What is timed:
- enqueue, batch b: Client.enqueue (b = 1) or Client.enqueue_many(b payloads): build and
  validate the tasks, serialise them, one EVALSHA per batch.
  Bare: one pipeline per batch of b x (HSET tasks id json, ZADD queue score id).
- claim+ack, batch b: TaskQueue.claim(n=b) then TaskQueue.ack(the b tasks, with a
  result): two round trips per batch, until the queue is empty.
  Bare: per batch, one pipeline ZPOPMIN queue b + HMGET tasks + ZADD leases + HSET tokens
  (the claim), then one pipeline ZREM leases + HDEL tokens + HDEL tasks + b x SET result
  PX + HINCRBY stats (the ack). Its ids are known in advance (the bare loop cannot learn
  them from ZPOPMIN inside the same round trip), which flatters the bare figure.
Every figure is the median of --runs runs; the server is flushed before each run.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import redis

from handoff.client import Client
from handoff.config import RedisPoolConfig, Settings
from handoff.connection.embedded_server import spawn_server
from handoff.protocol.queue import ClaimRequest, Completion, TaskQueue

AGENT = "bench"
PAYLOAD = {"code": 'func main() { fmt.Println("hello") }', "lang": "go", "n": 0}
RESULT_JSON = b'{"ok":true}'
LEASE_MS = 60_000
ENQUEUE_BATCHES = (1, 100, 1_000)
CLAIM_BATCHES = (1, 10, 100)
# Targets from the issue: (operation, batch) -> tasks/s, and the ratio floor (within 3x).
TARGETS = {("enqueue", 1_000): 100_000, ("claim+ack", 100): 50_000}
RATIO_FLOOR = 1 / 3


@dataclass(frozen=True)
class Sizes:
    """Tasks per run for each batch size (--quick divides them)."""

    enqueue: dict[int, int]
    claim: dict[int, int]

    @classmethod
    def for_run(cls, quick: bool) -> Sizes:
        divisor = 10 if quick else 1
        return cls(
            enqueue={1: 5_000 // divisor, 100: 50_000 // divisor, 1_000: 100_000 // divisor},
            claim={1: 4_000 // divisor, 10: 20_000 // divisor, 100: 50_000 // divisor},
        )


class Bench:
    """One server, one Client (enqueue), one TaskQueue (claim/ack), one raw client."""

    def __init__(self, url: str) -> None:
        self.settings = Settings(redis=RedisPoolConfig(url=url), claim_batch_max=1_000)
        self.client = Client(settings=self.settings)
        self.queue: TaskQueue = self.client.queue
        self.raw = redis.Redis.from_url(url)
        self.keys = self.queue.keys.agent(AGENT)
        self.payloads = [dict(PAYLOAD, n=i) for i in range(1_000)]

    def close(self) -> None:
        self.client.close()
        self.raw.close()

    def fresh(self) -> None:
        self.raw.flushall()

    # -- handoff ---------------------------------------------------------------------------

    def enqueue(self, batch: int, total: int) -> float:
        payloads = self.payloads[:batch]
        client = self.client
        started = time.perf_counter()
        if batch == 1:
            for _ in range(total):
                client.enqueue(AGENT, PAYLOAD)
        else:
            for _ in range(total // batch):
                client.enqueue_many(AGENT, payloads)
        return total / (time.perf_counter() - started)

    def fill(self, total: int) -> None:
        for _ in range(total // 1_000):
            self.client.enqueue_many(AGENT, self.payloads)
        if total % 1_000:
            self.client.enqueue_many(AGENT, self.payloads[: total % 1_000])

    def claim_ack(self, batch: int, total: int) -> float:
        self.fill(total)
        queue = self.queue
        request = [ClaimRequest(AGENT, batch, LEASE_MS)]
        done = 0
        started = time.perf_counter()
        while True:
            tasks = queue.claim(request)[AGENT]
            if not tasks:
                break
            queue.ack([Completion(task, RESULT_JSON) for task in tasks])
            done += len(tasks)
        elapsed = time.perf_counter() - started
        if done != total:
            raise RuntimeError(f"claim+ack drained {done} of {total} tasks")
        return total / elapsed

    # -- bare commands ---------------------------------------------------------------------

    def bare_enqueue(self, batch: int, total: int) -> float:
        k = self.keys
        blob = _sample_blob()
        started = time.perf_counter()
        n = 0
        for _ in range(total // batch):
            pipe = self.raw.pipeline(transaction=False)
            for _ in range(batch):
                task_id = f"{AGENT}.{n:026x}"
                pipe.hset(k.tasks, task_id, blob)
                pipe.zadd(k.queue, {task_id: n})
                n += 1
            pipe.execute()
        return total / (time.perf_counter() - started)

    def bare_claim_ack(self, batch: int, total: int) -> float:
        k = self.keys
        ids = [f"{AGENT}.{n:026x}" for n in range(total)]
        self.bare_fill(ids)
        ttl_ms = int(self.settings.result_ttl_s * 1000)
        result = b'{"status":"done","finished_at":1,"result":{"ok":true}}'
        started = time.perf_counter()
        for start in range(0, total, batch):
            chunk = ids[start : start + batch]
            pipe = self.raw.pipeline(transaction=False)
            pipe.zpopmin(k.queue, batch)
            pipe.hmget(k.tasks, chunk)
            pipe.zadd(k.leases, dict.fromkeys(chunk, 1))
            pipe.hset(k.tokens, mapping=dict.fromkeys(chunk, "token"))
            pipe.execute()
            pipe = self.raw.pipeline(transaction=False)
            pipe.zrem(k.leases, *chunk)
            pipe.hdel(k.tokens, *chunk)
            pipe.hdel(k.tasks, *chunk)
            for task_id in chunk:
                pipe.set(k.result(task_id), result, px=ttl_ms)
            pipe.hincrby(k.stats, "done", len(chunk))
            pipe.execute()
        elapsed = time.perf_counter() - started
        if self.raw.zcard(k.queue) != 0:
            raise RuntimeError("bare claim+ack left tasks behind")
        return total / elapsed

    def bare_fill(self, ids: list[str]) -> None:
        k, blob = self.keys, _sample_blob()
        for start in range(0, len(ids), 1_000):
            chunk = ids[start : start + 1_000]
            pipe = self.raw.pipeline(transaction=False)
            pipe.hset(k.tasks, mapping=dict.fromkeys(chunk, blob))
            pipe.zadd(k.queue, {task_id: i for i, task_id in enumerate(chunk, start)})
            pipe.execute()


def _sample_blob() -> bytes:
    from handoff.client import build_task

    return build_task(AGENT, PAYLOAD).to_json()


def _median_of(runs: int, bench: Bench, measure: Callable[[], float]) -> tuple[float, list]:
    samples = []
    for _ in range(runs):
        bench.fresh()
        samples.append(measure())
    return statistics.median(samples), samples


def run_protocol_bench(
    *, runs: int = 5, quick: bool = False, progress: Callable[[str], None] | None = None
) -> dict:
    """Start a private server, measure every figure, stop the server; returns the figures."""
    say = progress or (lambda line: None)
    runs = max(1, min(runs, 2) if quick else runs)
    sizes = Sizes.for_run(quick)
    rows = []
    with tempfile.TemporaryDirectory(prefix="handoff-bench-") as folder:
        server = spawn_server(unix_socket=os.path.join(folder, "redis.sock"), data_dir=folder)
        bench = Bench(server.url)
        try:
            info = bench.raw.info("server")
            version = info.get("valkey_version") or info.get("redis_version", "?")
            bench.enqueue(100, 1_000)  # warm: scripts loaded, agent registered, pool open
            plan = [("enqueue", b, sizes.enqueue[b]) for b in ENQUEUE_BATCHES] + [
                ("claim+ack", b, sizes.claim[b]) for b in CLAIM_BATCHES
            ]
            for operation, batch, total in plan:
                ours_fn, bare_fn = (
                    (bench.enqueue, bench.bare_enqueue)
                    if operation == "enqueue"
                    else (bench.claim_ack, bench.bare_claim_ack)
                )
                ours, ours_runs = _median_of(runs, bench, partial(ours_fn, batch, total))
                bare, bare_runs = _median_of(runs, bench, partial(bare_fn, batch, total))
                target = TARGETS.get((operation, batch))
                row = {
                    "operation": operation,
                    "batch": batch,
                    "tasks": total,
                    "handoff_per_s": round(ours),
                    "bare_per_s": round(bare),
                    "ratio": round(ours / bare, 3),
                    "target_per_s": target,
                    "met": None if target is None else (
                        ours >= target and ours / bare >= RATIO_FLOOR
                    ),
                    "handoff_runs": [round(x) for x in ours_runs],
                    "bare_runs": [round(x) for x in bare_runs],
                }  # fmt: skip
                rows.append(row)
                say(f"{operation} batch {batch}: {ours:,.0f}/s (bare {bare:,.0f}/s)")
        finally:
            bench.close()
            server.stop()
    return {
        "benchmark": "protocol",
        "server": f"valkey/redis {version}",
        "transport": "unix socket",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "runs": runs,
        "quick": quick,
        "baseline": "bare commands in a redis-py pipeline, same process and socket "
        "(see core/bench/protocol.py)",
        "rows": rows,
    }


def format_markdown(result: dict) -> str:
    lines = [
        f"handoff bench protocol: {result['server']} over a {result['transport']}, "
        f"Python {result['python']}, {result['cpus']} CPUs, median of {result['runs']} run(s)",
        "",
        "| operation | batch | handoff tasks/s | bare commands tasks/s | ratio | target |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for row in result["rows"]:
        target = "-"
        if row["target_per_s"]:
            verdict = "met" if row["met"] else "MISSED"
            target = f">= {row['target_per_s']:,}/s and ratio >= 0.33: {verdict}"
        lines.append(
            f"| {row['operation']} | {row['batch']:,} | {row['handoff_per_s']:,} | "
            f"{row['bare_per_s']:,} | {row['ratio']:.2f} | {target} |"
        )
    lines += [
        "",
        "ratio = handoff / bare commands (1.00 = the raw limit). Bare enqueue: pipelined "
        "HSET+ZADD per task. Bare claim+ack: pipelined ZPOPMIN+HMGET+ZADD+HSET, then "
        "ZREM+HDEL+HDEL+SET PX per task+HINCRBY, ids known in advance.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m core.bench.protocol")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = run_protocol_bench(
        runs=args.runs, quick=args.quick, progress=lambda line: print(line, file=sys.stderr)
    )
    print(json.dumps(result, indent=2) if args.json else format_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
