"""Failover benchmark: acknowledged enqueues lost when the Sentinel-managed primary is killed.

Runs in: `scripts/bench-failover [--trials 3] [--preset NAME] [--json PATH]`, a plain
process that starts, for every trial, a fresh Sentinel group on loopback
(harness/topologies.start_sentinel_group: one primary, one replica, three sentinels, quorum 2,
down-after 1 s) and a fresh `handoff supervise --agents blip=2` (a no-op agent from
benchmarks/agents.py) on its redis+sentinel:// URL.

Per trial:
  1. one warm-up task must be done (the workers are up);
  2. a producer thread enqueues 10 tasks per call, back to back, through the handoff Client
     (its TaskQueue.enqueue, with the task ids built first by core.client.build_task, so the
     ids of a refused call are known too). A call that returns is "acknowledged"; one that
     raises is "refused" (not retried; 10 ms pause before the next call);
  3. after 1.5 s of load the primary is SIGKILLed (LocalSentinelGroup.kill_primary); the
     producer goes on until the sentinels have promoted the replica (wait_failover) plus 2 s
     (--after-failover-s). Right after the failover a fresh Client (its own pool and
     breaker) enqueues one canary task: the workers have resumed when it is done;
  4. then, for up to 60 s, the result record of every acknowledged id is looked for
     (pipelined EXISTS): lost = acknowledged ids never done by the deadline. The killed
     server is not restarted (no persistence: it would come back empty).
A side thread reads, every 20 ms, the agent's `done` counter and the canary's result from
whichever server the sentinels name primary (plain redis-py: no retry, no breaker). Every
execution is also appended to a file per worker (BENCH_EXEC_DIR), so a lost task can be
told apart as "never ran" or "ran, but its record died with the old primary".

Modes, interleaved: wait0 (default settings: asynchronous replication) and wait1
(enqueue_wait_replicas=1 for the producer's Client: WAIT 1 after every enqueue, 1 s timeout).
--preset NAME (handoff/config/presets.py) runs both modes with that preset: HANDOFF_PRESET for the
supervisor, load_settings(preset=NAME) for the producer; the canary and the checker keep the
library defaults (they measure, they are not measured).
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.sentinel import Sentinel

import benchmarks.common as common
from benchmarks.report import fmt, markdown_table
from handoff.client import Client, build_task
from handoff.config import PRESETS, RedisPoolConfig, Settings, load_settings
from handoff.config.loader import preset_values
from handoff.errors import HandoffError
from handoff.protocol.keys import Keys
from harness.topologies import LocalSentinelGroup, start_sentinel_group, wait_until

AGENT = "blip"
WORKERS = 2
BATCH = 10
LOAD_BEFORE_KILL_S = 1.5
DONE_DEADLINE_S = 60.0
REFUSED_PAUSE_S = 0.01
MONITOR_POLL_S = 0.02
CHECK_CHUNK = 2000
MODES = {"wait0": 0, "wait1": 1}
LOG_PATTERN = re.compile(r"error|warning|exited|spawned|reachable|halting|Traceback", re.I)


# -- the producer --------------------------------------------------------------------------


@dataclass
class Producer:
    """Enqueues BATCH tasks per call until stopped; records every call's outcome."""

    client: Client
    acked: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    refused_by: dict[str, list[str]] = field(default_factory=dict)  # error class -> ids
    calls: list[tuple[float, bool, int]] = field(default_factory=list)  # (end, ok, n)
    errors: collections.Counter = field(default_factory=collections.Counter)
    first_error: dict[str, str] = field(default_factory=dict)
    stop: threading.Event = field(default_factory=threading.Event)
    crashed: BaseException | None = None

    def run(self) -> None:
        n = 0
        try:
            while not self.stop.is_set():
                tasks = [build_task(AGENT, n + i) for i in range(BATCH)]
                n += BATCH
                try:
                    self.client.queue.enqueue(tasks)
                except Exception as e:
                    name = f"{type(e).__module__}.{type(e).__name__}"
                    self.errors[name] += 1
                    self.first_error.setdefault(name, str(e)[:300])
                    self.refused.extend(t.id for t in tasks)
                    self.refused_by.setdefault(name, []).extend(t.id for t in tasks)
                    self.calls.append((time.monotonic(), False, len(tasks)))
                    self.stop.wait(REFUSED_PAUSE_S)
                    continue
                self.calls.append((time.monotonic(), True, len(tasks)))
                self.acked.extend(t.id for t in tasks)
        except BaseException as e:
            self.crashed = e


# -- the done-counter monitor --------------------------------------------------------------


class DoneMonitor:
    """Reads the agent's done counter from the server the sentinels name primary, every
    MONITOR_POLL_S; samples are (monotonic time, primary port, done)."""

    def __init__(self, group: LocalSentinelGroup) -> None:
        self.service = group.service
        self.sentinel = Sentinel(
            group.sentinel_addresses(), socket_timeout=0.2, socket_connect_timeout=0.2
        )
        self.stats_key = Keys("handoff").agent(AGENT).stats
        self.samples: list[tuple[float, int, int]] = []
        self.canary_key: str | None = None  # set by the trial: a result key to look for
        self.canary_done_at: float | None = None
        self.stop = threading.Event()
        self.clients: dict[tuple[str, int], redis.Redis] = {}
        self.thread = threading.Thread(target=self.run, name="done-monitor", daemon=True)

    def run(self) -> None:
        while not self.stop.wait(MONITOR_POLL_S):
            try:
                address = self.sentinel.discover_master(self.service)
                client = self.clients.get(address)
                if client is None:
                    client = redis.Redis(
                        host=address[0],
                        port=address[1],
                        socket_timeout=0.2,
                        socket_connect_timeout=0.2,
                    )
                    self.clients[address] = client
                done = int(client.hget(self.stats_key, "done") or 0)
                now = time.monotonic()
                self.samples.append((now, address[1], done))
                key = self.canary_key
                if key is not None and self.canary_done_at is None and client.exists(key):
                    self.canary_done_at = now
            except (redis.RedisError, OSError):
                continue

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        for client in self.clients.values():
            client.close()
        for sentinel in self.sentinel.sentinels:
            sentinel.close()


def resumed_at(samples: list[tuple[float, int, int]], killed_at: float, old_port: int):
    """Monotonic time of the first rise of the done counter on a server other than the killed
    one after the kill (None if it never rose), and the counter's first value there."""
    first = None
    for t, port, done in samples:
        if t < killed_at or port == old_port:
            continue
        if first is None:
            first = done
        elif done > first:
            return t, first
    return None, first


# -- one trial -----------------------------------------------------------------------------


def _check_done(checker: Client, ids: list[str]) -> set[str]:
    """The ids among `ids` whose result record exists (status done), pipelined."""
    agent_keys = checker.queue.keys.agent(AGENT)
    done: set[str] = set()
    for start in range(0, len(ids), CHECK_CHUNK):
        chunk = ids[start : start + CHECK_CHUNK]

        def read(client, chunk=chunk) -> list:
            pipe = client.pipeline(transaction=False)
            for task_id in chunk:
                pipe.exists(agent_keys.result(task_id))
            return pipe.execute()

        replies = checker.queue.manager.execute_pipelined(read, len(chunk))
        done.update(task_id for task_id, found in zip(chunk, replies, strict=True) if found)
    return done


def _executions(exec_dir: Path) -> collections.Counter:
    runs: collections.Counter = collections.Counter()
    for path in exec_dir.glob("exec-*"):
        for line in path.read_text(errors="replace").splitlines():
            if line:
                runs[line] += 1
    return runs


def enqueue_canary(url: str, timeout_s: float = 10.0) -> tuple[str, float]:
    """One task enqueued by a fresh Client (its own pool and breaker, none of the producer's
    history), retried until it is taken; (its id, when it was taken)."""
    deadline = time.monotonic() + timeout_s
    with Client(settings=Settings(redis=RedisPoolConfig(url=url))) as client:
        while True:
            try:
                return client.enqueue(AGENT, "canary"), time.monotonic()
            except HandoffError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


def run_trial(
    mode: str, folder: Path, lease_s: float | None, after_failover_s: float, preset: str | None
) -> dict:
    """One trial of `mode` (its logs in `folder`): the figures of the report's row."""
    folder.mkdir(parents=True)
    exec_dir = folder / "exec"
    exec_dir.mkdir()
    group = start_sentinel_group(folder / "group")
    proc = None
    producer = monitor = checker = None
    thread = None
    try:
        named = {"log_level": "INFO", "lease_s": lease_s, "preset": preset}  # HANDOFF_*
        proc = common.start_supervisor(
            group.url,
            {AGENT: WORKERS},
            folder / "supervise.log",
            {"BENCH_EXEC_DIR": str(exec_dir)},
            **{k: v for k, v in named.items() if v is not None},
        )
        checker = Client(settings=Settings(redis=RedisPoolConfig(url=group.url)))
        warm = checker.enqueue(AGENT, "warm-up")

        def warmed() -> bool:
            common.check_alive(proc)
            return checker.status(warm) == "done" and len(proc.live_children()) == WORKERS

        wait_until(warmed, 60.0, "the warm-up task to be done")
        workers_before = sorted(c.pid for c in proc.live_children())
        log_offset = len(proc.output())

        monitor = DoneMonitor(group)
        monitor.thread.start()
        # env={}: the producer's settings are the preset's and the mode's, not this shell's
        overrides = {"redis.url": group.url, "enqueue_wait_replicas": MODES[mode]}
        settings = load_settings(preset=preset, env={}, overrides=overrides)
        producer = Producer(Client(settings=settings))
        thread = threading.Thread(target=producer.run, name="producer", daemon=True)
        load_start = time.monotonic()
        thread.start()
        time.sleep(LOAD_BEFORE_KILL_S)  # the scenario: load before the crash
        killed_at = time.monotonic()
        old_port = group.kill_primary()
        new_port = group.wait_failover(old_port, timeout_s=30.0)
        failover_at = time.monotonic()
        canary, canary_at = enqueue_canary(group.url)
        monitor.canary_key = checker.queue.keys.agent(AGENT).result(canary)
        # the scenario: keep producing on the new primary
        time.sleep(max(0.0, failover_at + after_failover_s - time.monotonic()))
        producer.stop.set()
        thread.join(timeout=30.0)
        if thread.is_alive():
            raise AssertionError("the producer did not stop within 30 s of being told to")
        stopped_at = time.monotonic()

        acked = list(producer.acked)
        pending = acked
        deadline = time.monotonic() + DONE_DEADLINE_S
        while True:
            try:
                found = _check_done(checker, pending)
                pending = [i for i in pending if i not in found]
            except Exception as e:
                print(f"  (check failed: {type(e).__name__}: {e})", file=sys.stderr)
            if (not pending and monitor.canary_done_at) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        all_done_s = time.monotonic() - stopped_at
        monitor.close()
        lost = pending
        refused_done = _check_done(checker, producer.refused)
        refused_done_by = {
            name: sum(1 for i in ids if i in refused_done)
            for name, ids in producer.refused_by.items()
        }
        runs = _executions(exec_dir)
        lost_status = collections.Counter(checker.status(i) for i in lost)
        lost_ran = sum(1 for i in lost if runs.get(i))

        resume_t, done_after_failover = resumed_at(monitor.samples, killed_at, old_port)
        refusals = [t for t, ok, _ in producer.calls if not ok and t > killed_at]
        ok_after = [t for t, ok, _ in producer.calls if ok and refusals and t > refusals[0]]
        canary_done = monitor.canary_done_at
        acked_before = sum(n for t, ok, n in producer.calls if ok and t <= killed_at)
        done_at_kill = max(
            (d for t, p, d in monitor.samples if t <= killed_at and p == old_port), default=None
        )

        alive = proc.proc.poll() is None
        workers_after = sorted(c.pid for c in proc.live_children())
        failover_log = [
            line for line in proc.output()[log_offset:].splitlines() if LOG_PATTERN.search(line)
        ]
        exit_code = common.stop_supervisor(proc)
        proc = None
        return {
            "mode": mode,
            "old_port": old_port,
            "new_port": new_port,
            "acknowledged": len(acked),
            "refused_calls": sum(producer.errors.values()),
            "refused_tasks": len(producer.refused),
            "refused_but_done": len(refused_done),
            "refused_but_done_by_error": refused_done_by,
            "lost": len(lost),
            "lost_ids_sample": lost[:10],
            "lost_status": dict(lost_status),
            "lost_that_ran": lost_ran,
            "executions": sum(runs.values()),
            "executed_twice_or_more": sum(1 for c in runs.values() if c > 1),
            "errors": dict(producer.errors),
            "first_error": producer.first_error,
            "producer_crashed": repr(producer.crashed) if producer.crashed else None,
            "enqueue_per_s_before_kill": acked_before / (killed_at - load_start),
            "failover_s": failover_at - killed_at,
            "workers_resumed_s": None if canary_done is None else canary_done - killed_at,
            "canary_enqueued_s": canary_at - killed_at,
            "done_counter_rose_s": None if resume_t is None else resume_t - killed_at,
            "done_at_kill": done_at_kill,
            "done_first_seen_on_new_primary": done_after_failover,
            "first_refusal_s": refusals[0] - killed_at if refusals else None,
            "producer_resumed_s": ok_after[0] - killed_at if ok_after else None,
            "all_done_s": all_done_s,
            "supervisor_alive": alive,
            "workers_same": workers_before == workers_after,
            "workers_before": workers_before,
            "workers_after": workers_after,
            "supervisor_exit_code": exit_code,
            "failover_log": failover_log[:60],
        }
    finally:
        if producer is not None:
            producer.stop.set()
            if thread is not None:
                thread.join(timeout=10)
            producer.client.close()
        if monitor is not None:
            monitor.close()
        if proc is not None:
            common.stop_supervisor(proc)
        if checker is not None:
            checker.close()
        group.stop()


# -- the benchmark -------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict:
    """Every trial of every mode, interleaved; the results (meta, modes) with medians."""
    meta = common.machine_info(
        trials=args.trials,
        lease_s=args.lease_s,
        workers=WORKERS,
        batch=BATCH,
        load_before_kill_s=LOAD_BEFORE_KILL_S,
        after_failover_s=args.after_failover_s,
        done_deadline_s=DONE_DEADLINE_S,
        preset=args.preset,
        preset_values=preset_values(args.preset) if args.preset else {},
    )
    results: dict = {"meta": meta, "modes": {m: {"trials": [], "errors": []} for m in MODES}}
    started = time.monotonic()
    with common.scratch("handoff-bench-failover-", keep=args.keep) as tmp:

        def trial(mode: str, i: int) -> dict:
            folder = tmp / f"{mode}-{i}"
            return run_trial(mode, folder, args.lease_s, args.after_failover_s, args.preset)

        common.repeat_interleaved(
            results["modes"],
            args.trials,
            "trial",
            trial,
            _status,
            (common.RunFailed, AssertionError, HandoffError, redis.RedisError),
        )
    return common.summarize(results, "modes", "trial", started)


def _status(figures: dict) -> str:
    return (
        f"acked {figures['acknowledged']:6d}  refused {figures['refused_calls']:4d} calls  "
        f"lost {figures['lost']:3d}  failover {figures['failover_s']:.1f}s  resumed "
        f"{fmt(figures['workers_resumed_s'], 1)}s"
    )


# -- report --------------------------------------------------------------------------------


HEADERS = [
    "mode",
    "trial",
    "acknowledged",
    "lost",
    "refused calls (tasks)",
    "refused but done",
    "enqueue/s before kill",
    "failover s",
    "workers resumed s",
    "producer resumed s",
    "ran twice",
    "supervisor + workers alive",
]


def _cells(mode: str, label: str, t: dict) -> list[str]:
    alive = t.get("supervisor_alive")
    same = t.get("workers_same")
    if alive is None:
        shown = ""
    else:
        shown = "yes, same pids" if alive and same else ("yes, workers replaced" if alive else "NO")
    return [
        mode,
        label,
        fmt(t.get("acknowledged")),
        fmt(t.get("lost")),
        f"{fmt(t.get('refused_calls'))} ({fmt(t.get('refused_tasks'))})",
        fmt(t.get("refused_but_done")),
        fmt(t.get("enqueue_per_s_before_kill")),
        fmt(t.get("failover_s"), 1),
        fmt(t.get("workers_resumed_s"), 1),
        fmt(t.get("producer_resumed_s"), 1),
        fmt(t.get("executed_twice_or_more")),
        shown,
    ]


def render(results: dict) -> str:
    meta = results["meta"]
    lines = [
        f"Failover: primary SIGKILLed after {meta['load_before_kill_s']} s of load, "
        f"{meta['trials']} trial(s) per mode (interleaved), preset: {meta['preset'] or 'none'}",
        "",
        f"- {meta['cores']} cores, load average at start {meta['load_avg_at_start'][0]:.2f}; "
        f"server: {meta['server'][:40]}; {meta['workers']} workers (no-op agent, lease "
        f"{meta['lease_s'] or Settings.lease_s:g} s); producer: {meta['batch']} tasks per "
        "enqueue call",
    ]
    if meta["preset"]:
        values = ", ".join(f"{k}={v}" for k, v in meta["preset_values"].items())
        lines.append(
            f"- preset {meta['preset']} for the supervisor (HANDOFF_PRESET) and the producer: "
            f"{values}; the canary and the checker keep the defaults"
        )
    lines += [
        "- lost = acknowledged (the enqueue call returned) but not done within "
        f"{meta['done_deadline_s']:.0f} s; times are seconds after the kill; the producer "
        f"stops {meta['after_failover_s']:g} s after the failover",
        "- workers resumed = a canary task, enqueued by a fresh Client as soon as the "
        "failover is over, is done; producer resumed = its first acknowledged call after its "
        "first refusal (- : not before it stopped)",
        "",
    ]
    rows = []
    for mode, entry in results["modes"].items():
        rows += [_cells(mode, str(i), trial) for i, trial in enumerate(entry["trials"], 1)]
        if entry["trials"]:
            rows.append(_cells(mode, "**median**", entry["median"]))
        rows += [[mode, "failed", e[:200]] + [""] * (len(HEADERS) - 3) for e in entry["errors"]]
    lines += markdown_table(HEADERS, rows)
    for mode, entry in results["modes"].items():
        errors: collections.Counter = collections.Counter()
        done_anyway: collections.Counter = collections.Counter()
        first: dict[str, str] = {}
        for trial in entry["trials"]:
            errors.update(trial["errors"])
            done_anyway.update(trial["refused_but_done_by_error"])
            for k, v in trial["first_error"].items():
                first.setdefault(k, v)
        if errors:
            lines.append(f"Refusals seen by the producer ({mode}, all trials):")
            for name, count in errors.most_common():
                lines.append(
                    f"- {name} x{count} calls ({done_anyway[name]} of their tasks done "
                    f"anyway): {first[name]}"
                )
            lines.append("")
        lost = [t for t in entry["trials"] if t["lost"]]
        for t in lost:
            lines.append(
                f"- {mode}: {t['lost']} lost; status now {t['lost_status']}; "
                f"{t['lost_that_ran']} of them ran (their record died with the old primary)"
            )
    lines.append(f"Wall time {meta.get('elapsed_s', 0):.0f} s.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = common.new_parser("scripts/bench-failover", __doc__)
    parser.add_argument("--trials", type=int, default=3, help="trials per mode (default 3)")
    parser.add_argument(
        "--lease-s",
        type=float,
        default=None,
        help="the workers' lease_s (default: the library's, 30 s; a lease stranded by the "
        "failover then expires within the 60 s deadline)",
    )
    parser.add_argument(
        "--after-failover-s",
        type=float,
        default=2.0,
        help="keep producing this long after the failover (default 2)",
    )
    parser.add_argument(
        "--preset",
        choices=list(PRESETS),
        default=None,
        help="settings preset for the supervisor and the producer (default none)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the logs folder")
    args = parser.parse_args(argv)
    if args.trials < 1:
        parser.error("--trials must be >= 1")
    return common.finish(lambda: run(args), render, args.json, "modes", "trial")


if __name__ == "__main__":
    sys.exit(main())
