"""`handoff bench payloads`: what a declared payload type costs per task, in-process.

Beside the untyped path (the JSON round trip every task makes anyway), a small pydantic
model checked where handoff checks it: at enqueue (validate, then dump to data), at claim
(validate into the model) and, for a declared result, before the ack. No server: this is
the CPU a producer or a worker spends per task, not a throughput.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import orjson

from handoff.errors import HandoffError


def _per_task_us(fn: Callable[[], Any], n: int, runs: int) -> tuple[float, list[float]]:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - started) / n * 1e6)
    return statistics.median(samples), samples


def run_payloads_bench(runs: int = 5, quick: bool = False) -> dict[str, Any]:
    try:
        from pydantic import BaseModel
    except ImportError:
        needs = "handoff bench payloads needs pydantic: pip install 'handoff[pydantic]'"
        raise HandoffError(needs) from None
    from handoff.runtime.payload_types import TypedValue

    class CodeStep(BaseModel):
        feature: str
        step: int
        round: int = 1
        note: str = ""

    typed = TypedValue("bench", "payload", CodeStep)
    data = {"feature": "search", "step": 3, "round": 1, "note": ""}
    raw = orjson.dumps(data)
    n = 2_000 if quick else 20_000

    def untyped() -> None:  # what every task costs: to JSON at enqueue, back at claim
        orjson.loads(orjson.dumps(data))

    def typed_enqueue_and_claim() -> None:
        typed.validate(orjson.loads(orjson.dumps(typed.to_data(data))))

    def typed_result() -> None:
        orjson.dumps(typed.to_data(typed.validate(orjson.loads(raw))))

    rows = {}
    for name, fn in (
        ("untyped: JSON round trip", untyped),
        ("typed payload: enqueue + claim checks", typed_enqueue_and_claim),
        ("typed result: check + dump before the ack", typed_result),
    ):
        median, samples = _per_task_us(fn, n, runs)
        rows[name] = {"us_per_task": round(median, 2), "samples": [round(s, 2) for s in samples]}
    return {"benchmark": "payloads", "model": "CodeStep (4 fields)", "tasks": n, "rows": rows}


def format_markdown(result: dict[str, Any]) -> str:
    base = next(iter(result["rows"].values()))["us_per_task"]
    lines = ["| path | µs per task | vs untyped |", "| --- | ---: | ---: |"]
    for name, row in result["rows"].items():
        lines.append(f"| {name} | {row['us_per_task']:.2f} | {row['us_per_task'] / base:.1f}x |")
    return "\n".join(lines)
