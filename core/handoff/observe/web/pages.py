"""Each page's live regions, built from the monitor's snapshot and the reads it needs.

Runs in: the dashboard, in a worker thread (reads block). A page is a topic ("overview",
"workers", "waiting", "agent/NAME", "task/ID", "run/ID"); building it gives a View: the HTML of each
region the page shows, or a status and a one-line message when there is nothing to show.
The same regions fill the page when it loads and replace its sections on each tick, so a
page and its live updates cannot disagree.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from markupsafe import Markup

from handoff.errors import HandoffError, InvalidAgentName, InvalidPayload
from handoff.observe.view import problem_lines
from handoff.observe.web import chart
from handoff.observe.web.reads import (
    WAIT_LIST_LIMIT,
    Operations,
    agent_lists,
    run_events,
    task_view,
    waiting_lists,
)
from handoff.observe.web.render import Renderer
from handoff.protocol.keys import check_agent
from handoff.protocol.task import check_task_id

OPEN_STATUSES = frozenset({"queued", "delayed", "running", "waiting", "unknown"})
MAX_TREE_NODES = 400  # a run larger than this is summed up, not drawn


@dataclass
class View:
    """A built page: its regions (id -> HTML), or an error status and message."""

    regions: dict[str, Markup] = field(default_factory=dict)
    status: int = 200
    message: str = ""
    title: str = ""
    final: bool = False  # it cannot change any more (an ended run): not built again
    built_at: float = field(default_factory=time.monotonic)


def parse_topic(topic: str) -> tuple[str, str]:
    """(kind, argument) of a topic, or ValueError with a one-line reason."""
    kind, _, arg = topic.partition("/")
    if kind in ("overview", "workers", "waiting") and not arg:
        return kind, ""
    if kind == "agent":
        try:
            return kind, check_agent(arg)
        except InvalidAgentName as e:
            raise ValueError(str(e)) from None
    if kind in ("task", "run"):
        try:
            return kind, check_task_id(arg)
        except InvalidPayload as e:
            raise ValueError(str(e)) from None
    raise ValueError(f"unknown page {topic[:80]!r}")


class Pages:
    """Builds views. `actions` says whether the dashboard has a token (forms are shown)."""

    def __init__(
        self,
        ops: Operations,
        renderer: Renderer,
        history: chart.ThroughputHistory,
        *,
        actions: bool,
    ) -> None:
        self.ops = ops
        self.render = renderer
        self.history = history
        self.actions = actions

    def build(self, topic: str, snapshot: dict[str, Any] | None) -> View:
        kind, arg = parse_topic(topic)
        if snapshot is None:
            return View(status=503, message="waiting for the monitor's first snapshot")
        try:
            match kind:
                case "overview":
                    return self.overview(snapshot)
                case "workers":
                    return self.workers(snapshot)
                case "waiting":
                    return self.waiting(snapshot)
                case "agent":
                    return self.agent(arg, snapshot)
                case "task":
                    return self.task(arg)
                case _:
                    return self.run(arg)
        except HandoffError as e:  # Redis down, or a read refused: say it, keep serving
            return View(status=503, message=f"{type(e).__name__}: {e}"[:300])

    # -- the pages -------------------------------------------------------------------------

    def overview(self, snapshot: dict[str, Any]) -> View:
        lines, top = self.history.lines()
        common = {"snapshot": snapshot, "actions": self.actions}
        return View(
            title="Overview",
            regions={
                "summary": self.render.region("summary", problems=problem_lines(snapshot),
                                              **common),
                "agents": self.render.region("agents", **common),
                "chart": self.render.region(
                    "chart", lines=lines, top=top, grid=chart.gridlines(top),
                    width=chart.WIDTH, height=chart.HEIGHT, window_s=chart.WINDOW_S,
                ),
            },
        )  # fmt: skip

    def workers(self, snapshot: dict[str, Any]) -> View:
        settings = self.ops.settings
        recycle = {
            "tasks": settings.max_tasks_per_worker,
            "rss_mb": settings.max_rss_mb,
            "age_s": settings.max_worker_age_s,
        }
        workers = sorted(snapshot["workers"], key=lambda w: (w["agent"], w["id"]))
        return View(
            title="Workers",
            regions={
                "workers": self.render.region(
                    "workers", workers=workers, recycle=recycle, now=time.time()
                )
            },
        )

    def waiting(self, snapshot: dict[str, Any]) -> View:
        """The runs parked by a Wait, per agent: the oldest WAIT_LIST_LIMIT of each (the
        snapshot says which agents have any: none costs no read)."""
        redis_view = snapshot.get("redis", {})
        if not redis_view.get("ok", True):
            return View(status=503, message=f"redis: {redis_view.get('error', 'unreachable')}")
        counts = {n: a for n, a in sorted(snapshot["agents"].items()) if a.get("waiting")}
        lists = waiting_lists(self.ops.queue, list(counts))
        agents = [(name, a, lists.get(name, [])) for name, a in counts.items()]
        region = self.render.region(
            "waiting", agents=agents, limit=WAIT_LIST_LIMIT, now_ms=time.time() * 1000
        )
        return View(title="Waiting", regions={"waiting": region})

    def agent(self, name: str, snapshot: dict[str, Any]) -> View:
        redis_view = snapshot.get("redis", {})
        if not redis_view.get("ok", True):
            return View(status=503, message=f"redis: {redis_view.get('error', 'unreachable')}")
        figures = snapshot["agents"].get(name)
        if figures is None:
            return View(status=404, message=f"agent {name!r} is unknown (nothing enqueued to it)")
        lists = agent_lists(self.ops.queue, name)
        workers = [w for w in snapshot["workers"] if w["agent"] == name]
        common = {"agent": name, "actions": self.actions}
        return View(
            title=f"Agent {name}",
            regions={
                "figures": self.render.region(
                    "agent_figures", a=figures, workers=workers, **common
                ),
                "head": self.render.region("agent_head", entries=lists["head"], **common),
                "delayed": self.render.region("agent_delayed", entries=lists["delayed"], **common),
                "dead": self.render.region("agent_dead", entries=lists["dead"], **common),
            },
        )

    def task(self, task_id: str) -> View:
        info = task_view(self.ops, task_id)
        if info["status"] == "unknown" and "task" not in info and "result" not in info:
            return View(
                status=404,
                message=f"task {task_id} is unknown (never enqueued, or its record expired)",
            )
        return View(
            title=f"Task {task_id}",
            regions={"task": self.render.region("task", t=info, actions=self.actions)},
        )

    def run(self, root: str) -> View:
        try:
            tree = self.ops.tree(root)
        except InvalidPayload as e:
            return View(status=404, message=str(e))
        nodes = list(walk(tree))
        summary = run_summary(tree, nodes, time.time() * 1000)
        region = self.render.region(
            "run", tree=tree, root=root, summary=summary, actions=self.actions,
            too_large=len(nodes) > MAX_TREE_NODES, events=run_events(self.ops.queue, root),
        )  # fmt: skip
        return View(title=f"Run {root}", regions={"run": region}, final=summary["ended"])


def run_summary(tree: dict[str, Any], nodes: list[dict[str, Any]], now_ms: float) -> dict:
    """What the run page's heading says: the tasks by status, whether the run ended and
    how (its outcome), and its times."""
    counts: dict[str, int] = {}
    for node in nodes:
        counts[node["status"]] = counts.get(node["status"], 0) + 1
    ended = not OPEN_STATUSES & counts.keys()
    ends = [n["finished_at"] for n in nodes if isinstance(n.get("finished_at"), int)]
    end_ms = max(ends) if ended and ends else now_ms
    return {
        "tasks": len(nodes),
        "counts": sorted(counts.items()),
        "ended": ended,
        "state": outcome(tree) if ended else "running",
        "times": run_times(tree, end_ms, ended),
        "chain": chain_of(tree),
    }


BAD_ENDS = ("cancelled", "dead", "expired")  # what a run's outcome says first


def outcome(tree: dict[str, Any]) -> str:
    """How an ended run ended, from the tasks it ends with (what result(follow=True)
    reads): a join's branches end in its then-task, any other line at its last task.
    "done" only when every one of them is done."""
    statuses, stack = set(), [tree]
    while stack:
        node = stack.pop()
        if node.get("then"):
            stack.append(node["then"])
        elif node.get("children"):
            stack.extend(node["children"])
        else:
            statuses.add(node["status"])
    return next((word for word in BAD_ENDS if word in statuses), "done")


def run_times(tree: dict[str, Any], end_ms: float, ended: bool) -> list[dict[str, Any]]:
    """The run's time cards: how long its root waited to start (a delay, a queue) and
    how long it took from that start, when the root's start is known (its record);
    otherwise the time since it was enqueued."""
    enqueued, started = tree.get("enqueued_at"), tree.get("started_at")
    if isinstance(started, int):
        cards = []
        if isinstance(enqueued, int):
            cards.append({"field": "waited", "label": "waited before starting",
                          "ms": max(0, started - enqueued)})  # fmt: skip
        took = "took" if ended else "running for"
        return [*cards, {"field": "took", "label": took, "ms": max(0, end_ms - started)}]
    if tree["status"] in ("cancelled", "expired"):  # ended before it started
        return [{"field": "took", "label": "started", "text": "never"}]
    if not isinstance(enqueued, int):
        return []
    if ended:
        label = "ended after"
    else:
        label = "waiting for" if tree["status"] in ("queued", "delayed") else "running for"
    return [{"field": "took", "label": label, "ms": max(0, end_ms - enqueued)}]


def walk(node: dict[str, Any]):
    """Every node of a run's tree: the node, its children, then its join's then-task."""
    yield node
    for child in node.get("children", []):
        yield from walk(child)
    if node.get("then"):
        yield from walk(node["then"])


def chain_of(tree: dict[str, Any]) -> list[str]:
    """The agent types in the order the run reaches them, each once: what the picture
    shows as planner -> coder -> reviewer -> integrator."""
    seen: list[str] = []
    level = [tree]
    while level:
        following = []
        for node in level:
            if node["agent"] not in seen:
                seen.append(node["agent"])
            following += node.get("children", [])
        level = following
        if not level:  # the branches are done: a join's then-task comes after them
            level = [n["then"] for n in walk(tree) if n.get("then") and n["then"]["agent"]
                     not in seen]  # fmt: skip
    return seen
