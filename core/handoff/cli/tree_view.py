"""`handoff inspect tree`: a run as an indented tree, one line per task."""

from __future__ import annotations

from typing import Any

import orjson

STATUS_MARK = {
    "done": "ok",
    "dead": "DEAD",
    "expired": "EXPIRED",
    "cancelled": "CANCELLED",
    "running": "..",
    "queued": "--",
    "delayed": "~~",
    "waiting": "wait",
    "unknown": "??",
}


def tree_lines(node: dict[str, Any]) -> list[str]:
    """Each task: status, agent, id, attempts, queue wait and run time, and what it
    returned (shortened) or why it died; a join's then-task follows its branches."""
    lines: list[str] = []
    _walk(node, "", "", lines)
    return lines


def _walk(node: dict[str, Any], lead: str, child_lead: str, lines: list[str]) -> None:
    lines.append(lead + _describe(node))
    kids: list[tuple[str, dict[str, Any]]] = [("", child) for child in node.get("children", [])]
    if node.get("then") is not None:
        kids.append(("then ", node["then"]))
    for index, (label, child) in enumerate(kids):
        last = index == len(kids) - 1
        branch = "└─ " if last else "├─ "
        _walk(child, child_lead + branch + label, child_lead + ("   " if last else "│  "), lines)


def _describe(node: dict[str, Any]) -> str:
    status = node.get("status", "unknown")
    parts = [f"[{STATUS_MARK.get(status, status)}]", node["agent"], node["id"]]
    attempt = node.get("attempt")
    if attempt and attempt > 1:
        parts.append(f"attempt {attempt}")
    wait_ms = _wait_ms(node)
    if wait_ms is not None:
        parts.append(f"waited {_ms(wait_ms)}")
    if node.get("ran_ms") is not None:
        parts.append(f"ran {_ms(node['ran_ms'])}")
    if node.get("steps"):
        parts.append(_steps(node["steps"]))
    if node.get("join"):
        parts.append(f"join of {len(node.get('children', []))}")
    elif node.get("children"):
        parts.append(f"-> {len(node['children'])}")
    if node.get("handed_to"):  # keyed tasks: runs of their own, not walked here
        parts.append("handed to keyed " + ", ".join(node["handed_to"]))
    if "result" in node:
        parts.append("= " + _short(node["result"]))
    if node.get("reason"):
        parts.append("! " + _short(node["reason"]))
    return "  ".join(parts)


def _steps(steps: list) -> str:
    """'steps model reused 812.0ms, save ran 3.1ms' (ms: the time the step's call took)."""
    shown = []
    for step in steps:
        if isinstance(step, list) and len(step) == 3 and isinstance(step[2], int | float):
            shown.append(f"{_short(step[0], 30)} {step[1]} {_ms(step[2])}")
    return "steps " + ", ".join(shown)


def _wait_ms(node: dict[str, Any]) -> float | None:
    started, enqueued = node.get("started_at"), node.get("enqueued_at")
    if isinstance(started, int) and isinstance(enqueued, int):
        return max(0, started - enqueued)
    return None


def _ms(value: float) -> str:
    return f"{value / 1000:.2f}s" if value >= 1000 else f"{value:.1f}ms"


def _short(value: Any, limit: int = 60) -> str:
    text = value if isinstance(value, str) else orjson.dumps(value).decode()
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."
