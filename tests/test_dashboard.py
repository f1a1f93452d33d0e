"""The monitor's dashboard: a real monitor (`handoff monitor --web`), real demo workers, a
real server, and headless Chromium (the system's `chromium`) driving the pages.

One stack per module (a server of its own: the per-test fixtures flush theirs): a
supervisor running the demo team and a monitor serving the dashboard with a token.
Screenshots go to the test's folder, or to $DASHBOARD_SCREENSHOTS (docs/img for the
README's pictures).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson
import psutil
import pytest

pytest.importorskip("starlette", reason="the web extra is not installed: pip install -e '.[web]'")

from handoff.client import Client
from handoff.config import RedisPoolConfig, Settings
from handoff.connection.embedded_server import spawn_server
from handoff.protocol.keys import Keys
from harness.chromium import MISSING, Browser, find_chromium
from harness.procs import (
    HandoffProcess,
    command_calls,
    free_tcp_port,
    handoff_env,
    plain_client,
    wait_until,
)

TOKEN = "dashboard-test-token"
TICK_S = 0.25
COUNTED = ("queued", "running", "delayed", "dead", "done", "failed", "handed_off")


@dataclass
class Stack:
    url: str  # the server's
    base: str  # the dashboard's, http://127.0.0.1:PORT
    port: int
    client: Client
    raw: object
    folder: Path
    env: dict


def _dashboard_up(port: int) -> bool:
    try:
        return _request(port, "GET", "/")[0] == 200
    except OSError:
        return False


def _start_monitor(
    env: dict, port: int, log: Path, *extra: str, nofile: int | None = None
) -> HandoffProcess:
    args = ["monitor", "--web", f"127.0.0.1:{port}", "--interval-s", str(TICK_S), *extra]
    proc = HandoffProcess(args, env, log, nofile=nofile)
    wait_until(lambda: _dashboard_up(port), 30, f"the dashboard on port {port} ({log})")
    return proc


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("dashboard")
    server = spawn_server(port=free_tcp_port(), data_dir=str(folder))
    env = handoff_env(server.url, app="workers.demo")
    started: list[HandoffProcess] = []
    client = Client(settings=Settings(redis=RedisPoolConfig(url=server.url)))
    raw = plain_client(server.url)
    try:
        started.append(
            HandoffProcess(
                ["supervise", "--agents", "planner=1,coder=1,reviewer=1,integrator=1,merger=1"],
                env,
                folder / "supervisor.log",
            )
        )
        port = free_tcp_port()
        web_env = {**env, "HANDOFF_MONITOR_WEB_TOKEN": TOKEN}
        started.append(_start_monitor(web_env, port, folder / "monitor.log"))
        yield Stack(server.url, f"http://127.0.0.1:{port}", port, client, raw, folder, env)
    finally:
        for proc in started:
            proc.stop()
        client.close()
        raw.close()
        server.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[Browser]:
    binary = find_chromium()
    if binary is None:
        pytest.skip(MISSING)
    with Browser(binary, tmp_path_factory.mktemp("chromium-profile")) as b:
        yield b


def screenshot_path(tmp_path: Path, name: str) -> Path:
    folder = os.environ.get("DASHBOARD_SCREENSHOTS")
    return (Path(folder) if folder else tmp_path) / name


def _request(port: int, method: str, path: str, body: str = "", **headers: str):
    """(status, body text, headers) of one request, no redirect followed."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        if body:
            headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
        conn.request(method, path, body=body.encode() or None, headers=headers)
        response = conn.getresponse()
        return (
            response.status,
            response.read().decode(errors="replace"),
            dict(response.getheaders()),
        )
    finally:
        conn.close()


def _approve(client: Client, root: str) -> None:
    """Approve a demo run's merge once its integrator asks (its result names the event).
    (Not workers.demo.approval_event: importing the demo here would type-check this
    process's payloads, and a test below enqueues a bad one on purpose.)"""
    then = client.result(root, wait_s=60)["join"]["then"]  # enqueued when the join fires
    wait_until(lambda: client.status(then) == "done", 60, f"the integrator {then} to ask")
    event = client.result(then, wait_s=0)["wait"]["event"]
    client.signal(event, {"approved": True, "by": "test"})  # kept, if it comes first


def _run_features(client: Client, count: int, steps: int = 2) -> list[str]:
    roots = [client.enqueue("planner", {"feature": f"f{i}", "steps": steps}) for i in range(count)]
    for root in roots:
        _approve(client, root)
        client.result(root, wait_s=60, follow=True)
    return roots


def _json_snapshot(stack: Stack) -> dict:
    proc = HandoffProcess(["monitor", "--once", "--json"], stack.env, stack.folder / "once.json")
    try:
        assert proc.wait(30) == 0, proc.output()
    finally:
        proc.stop()
    return orjson.loads(proc.output())


PAGE_COUNTS = """
Object.fromEntries([...document.querySelectorAll('#agents tr[data-agent]')].map(row => [
  row.dataset.agent,
  Object.fromEntries([...row.querySelectorAll('td[data-field]')].map(
    cell => [cell.dataset.field, cell.textContent.trim()]))
]))
"""


def _dead_letter(stack: Stack, marker: str) -> str:
    """A dead letter of the demo's coder, by a real worker: a payload its type refuses
    (no `step`), carrying markup that must show as text."""
    payload = {
        "feature": f"<script>window.__xss = '{marker}'</script>",
        "note": f"<img src=x onerror=\"window.__xss = '{marker}'\">",
    }
    task_id = _enqueue_unchecked(stack.url, "coder", payload)
    wait_until(lambda: stack.client.status(task_id) == "dead", 30, f"{task_id} to die")
    return task_id


def _enqueue_unchecked(url: str, agent: str, payload: dict) -> str:
    """Enqueue as a producer without the app loaded: it cannot check the agent's declared
    type, so a payload the worker refuses gets through. (This test process's own client
    checks it once any test here has imported workers.demo.)"""
    code = (
        "import sys, orjson\n"
        "from handoff.client import Client\n"
        "from handoff.config import RedisPoolConfig, Settings\n"
        "with Client(settings=Settings(redis=RedisPoolConfig(url=sys.argv[1]))) as c:\n"
        "    print(c.enqueue(sys.argv[2], orjson.loads(sys.argv[3])))\n"
    )
    argv = [sys.executable, "-c", code, url, agent, orjson.dumps(payload).decode()]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    return done.stdout.strip()


# -- the pages -----------------------------------------------------------------------------


def _feed_for_pictures(client: Client, seconds: float = 60.0) -> None:
    """When making the README's pictures, let the demo run a while: a chart with a
    minute of history. (Not in a normal run: the tests stay quick.)"""
    if not os.environ.get("DASHBOARD_SCREENSHOTS"):
        return
    roots, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        roots.append(client.enqueue("planner", {"feature": "demo", "steps": 1 + len(roots) % 3}))
        time.sleep(0.25)
    for root in roots:
        _approve(client, root)
        client.result(root, wait_s=60, follow=True)


def test_overview_shows_the_demo_agents_with_the_json_snapshots_counts(stack, browser, tmp_path):
    _feed_for_pictures(stack.client)
    _run_features(stack.client, 3)
    browser.goto(stack.base + "/")
    browser.wait_for("document.body.dataset.updates", 10, "the first live update")

    def matches() -> bool:
        page = browser.evaluate(PAGE_COUNTS)
        truth = _json_snapshot(stack)["agents"]
        wanted = {a: {f: str(v[f]) for f in COUNTED} for a, v in truth.items()}
        shown = {a: {f: cells[f] for f in COUNTED} for a, cells in page.items()}
        return shown == wanted

    wait_until(matches, 15, "the overview's counts to match `monitor --once --json`", step_s=0)
    agents = browser.evaluate(PAGE_COUNTS)
    assert {"planner", "coder", "reviewer", "integrator"} <= set(agents)
    assert int(agents["planner"]["done"]) >= 3 and int(agents["integrator"]["done"]) >= 3
    assert browser.evaluate("document.querySelector('#summary [data-field=healthy]').dataset.value")
    browser.wait_for(
        "document.querySelectorAll('#chart polyline').length >= 4", 10, "the chart's lines"
    )
    browser.screenshot(screenshot_path(tmp_path, "dashboard-overview.png"))


def test_a_new_dead_letter_appears_without_reload_and_markup_stays_text(stack, browser):
    stack.client.enqueue("coder", {"feature": "warm-up", "step": 0})  # the agent exists
    browser.goto(stack.base + "/agents/coder")
    browser.wait_for("document.body.dataset.updates", 10, "the first live update")
    browser.evaluate("window.__sameDocument = true")

    task_id = _dead_letter(stack, "dead-letter")
    row = f"document.querySelector('[data-dead=\"{task_id}\"]')"
    browser.wait_for(f"!!{row}", 10, "the new dead letter on the open page")
    assert browser.evaluate("window.__sameDocument") is True  # no reload happened
    payload = browser.evaluate(f"{row}.querySelector('code.payload').textContent")
    assert "<script>window.__xss = 'dead-letter'</script>" in payload
    assert "<img src=x" in payload
    assert "payload does not match CodeStep" in browser.evaluate(f"{row}.textContent")
    assert browser.evaluate("document.querySelectorAll('main script, main img').length") == 0
    assert browser.evaluate("window.__xss") is None

    browser.goto(f"{stack.base}/tasks/{task_id}")
    text = browser.evaluate("document.querySelector('pre.payload').textContent")
    assert "<script>window.__xss" in text
    assert browser.evaluate("document.querySelectorAll('main script, main img').length") == 0
    assert browser.evaluate("window.__xss") is None


def test_requeue_works_with_the_token_and_without_it_is_refused(stack, browser):
    task_id = _dead_letter(stack, "requeue")
    dead_key = Keys().agent("coder").dead
    died_at = stack.raw.zscore(dead_key, task_id)
    browser.goto(stack.base + "/agents/coder")
    browser.wait_for(f"!!document.querySelector('[data-dead=\"{task_id}\"]')", 10, "the row")

    # From the page itself (same origin), without the token: 403, and nothing moves.
    refused = browser.evaluate(
        f"""fetch('/agents/coder/dead/requeue', {{method: 'POST',
              headers: {{'Content-Type': 'application/x-www-form-urlencoded'}},
              body: 'id={task_id}'}}).then(async r => [r.status, await r.text()])"""
    )
    assert refused == [403, "403: this action needs the dashboard's token: unlock first\n"]
    status, text, _ = _request(
        stack.port, "POST", "/agents/coder/dead/requeue", f"id={task_id}",
        **{"X-Handoff-Token": "not-the-token"},
    )  # fmt: skip
    assert (status, text) == (403, "403: wrong token\n")
    time.sleep(3 * TICK_S)
    assert stack.raw.zscore(dead_key, task_id) == died_at
    assert stack.client.status(task_id) == "dead"

    # Unlock with the token in the page's form, then press the row's Requeue.
    browser.evaluate(
        f"""(() => {{ const form = document.querySelector('form[action="/unlock"]');
            form.querySelector('input[name=token]').value = '{TOKEN}'; form.submit(); }})()"""
    )
    browser.wait_for(
        "!!document.querySelector('.notice') && document.readyState === 'complete'", 10, "unlocked"
    )
    assert "unlocked" in browser.evaluate("document.querySelector('.notice').textContent")
    browser.evaluate(
        f"""document.querySelector('[data-dead="{task_id}"] form[action$="/requeue"]')
            .querySelector('button').click()"""
    )
    browser.wait_for(
        "(document.querySelector('.notice') || {}).textContent === "
        "'requeued 1 dead letter(s) of coder'",
        10,
        "the requeue's notice",
    )
    # It ran again (and its payload is still refused: dead again, later).
    wait_until(lambda: (stack.raw.zscore(dead_key, task_id) or 0) > died_at, 15, "the requeued run")
    browser.evaluate("document.querySelector('form[action=\"/lock\"] button').click()")
    browser.wait_for("!!document.querySelector('form[action=\"/unlock\"]')", 10, "locked again")


def test_the_run_view_draws_planner_coders_reviewers_integrator_merger(stack, browser, tmp_path):
    root = stack.client.enqueue("planner", {"feature": "run view", "steps": 3}, delay_s=1)
    browser.goto(f"{stack.base}/runs/{root}")
    browser.evaluate("window.__sameDocument = true")
    _approve(stack.client, root)
    browser.wait_for(
        "(document.querySelector('[data-field=run-state]') || {}).textContent === 'done'",
        30,
        "the run to end on the open page",
    )
    assert browser.evaluate("window.__sameDocument") is True
    nodes = browser.evaluate(
        "[...document.querySelectorAll('.tree .node')]"
        ".map(n => [n.dataset.agent, n.dataset.status])"
    )
    agents = [agent for agent, _ in nodes]
    assert agents[0] == "planner" and agents[-2:] == ["integrator", "merger"]
    assert agents.count("coder") >= 3 and agents.count("reviewer") >= 3
    assert all(status == "done" for _, status in nodes)
    assert browser.evaluate("document.querySelectorAll('.tree .fan > .branch').length") == 3
    chain = browser.evaluate("document.querySelector('[data-field=chain]').textContent")
    assert " ".join(chain.split()) == "planner → coder → reviewer → integrator → merger"
    # the run's streamed events: the planner's progress, each coder's partial output
    events = browser.evaluate(
        "[...document.querySelectorAll('[data-field=events] tbody tr')]"
        ".map(r => [r.cells[0].textContent, r.cells[2].textContent])"
    )
    assert events[0] == ["planner", "progress"]
    assert events.count(["coder", "emit"]) >= 3
    assert browser.evaluate("document.querySelectorAll('.tree .branch-label').length") == 3
    assert browser.evaluate("!!document.querySelector('[data-field=waited]')")
    browser.screenshot(screenshot_path(tmp_path, "dashboard-run.png"))


def test_cancel_and_scale_with_the_token(stack):
    token = {"X-Handoff-Token": TOKEN}
    later = stack.client.enqueue("coder", {"feature": "later", "step": 0}, delay_s=600)
    path = f"/tasks/{later}/cancel"
    status, _, headers = _request(stack.port, "POST", path, "scope=task", **token)
    assert status == 303 and headers["location"].startswith(f"/tasks/{later}?notice=")
    assert stack.client.status(later) == "cancelled"

    def integrators() -> int:
        return _json_snapshot(stack)["agents"]["integrator"]["workers"]

    wait_until(lambda: integrators() == 1, 30, "the supervisor's integrator")
    for count in (2, 1):
        status, _, _ = _request(stack.port, "POST", "/scale", f"agent=integrator&count={count}",
                                **token)  # fmt: skip
        assert status == 303
        wait_until(lambda c=count: integrators() == c, 30, f"{count} integrator worker(s)")


def test_rerun_from_the_dashboard_says_in_one_line_what_it_did(stack):
    token = {"X-Handoff-Token": TOKEN}
    later = stack.client.enqueue("coder", {"feature": "later", "step": 0}, delay_s=600)
    status, _, headers = _request(stack.port, "POST", f"/runs/{later}/rerun", "", **token)
    assert status == 303 and headers["location"].startswith(f"/runs/{later}?notice=")
    _, page, _ = _request(stack.port, "GET", headers["location"])
    assert f"run {later} is still in progress (1 task(s) queued or running)" in page
    status, _, _ = _request(stack.port, "POST", f"/runs/{later}/rerun", "")  # no token
    assert status == 403
    stack.client.cancel(later)


# -- a run's page: its outcome, its times, its branches, its cancel ------------------------

RUN_STATE = """(() => { const b = document.querySelector('[data-field=run-state]');
  return b ? [b.textContent.trim(), getComputedStyle(b).backgroundColor] : null; })()"""


def _unlock(browser) -> None:
    browser.evaluate(
        f"""(() => {{ const form = document.querySelector('form[action="/unlock"]');
            form.querySelector('input[name=token]').value = '{TOKEN}'; form.submit(); }})()"""
    )
    browser.wait_for(
        "!!document.querySelector('.notice') && document.readyState === 'complete'", 10, "unlocked"
    )


def _lock(browser) -> None:
    browser.evaluate("document.querySelector('form[action=\"/lock\"] button').click()")
    browser.wait_for("!!document.querySelector('form[action=\"/unlock\"]')", 10, "locked again")


def _run_page_state(stack: Stack, browser, root: str, word: str) -> str:
    """The run's page with its badge saying `word`: the badge's background colour."""
    browser.goto(f"{stack.base}/runs/{root}")
    browser.wait_for(f"({RUN_STATE} || [])[0] === '{word}'", 15, f"run {root} shown {word}")
    return browser.evaluate(RUN_STATE)[1]


def test_a_run_page_names_the_runs_outcome_and_only_a_done_run_is_green(stack, browser):
    client = stack.client
    done = _run_features(client, 1, steps=1)[0]
    cancelled = client.enqueue("planner", {"feature": "never", "steps": 1}, delay_s=600)
    client.cancel(cancelled, run=True)
    dead = _enqueue_unchecked(stack.url, "coder", {"feature": "no step"})  # its type refuses it
    expired = client.enqueue("planner", {"feature": "late"}, delay_s=0.2, expires_in_s=0.1)
    wait_until(lambda: client.status(dead) == "dead", 15, "the dead run")
    wait_until(lambda: client.status(expired) == "expired", 15, "the expired run")

    green = _run_page_state(stack, browser, done, "done")
    ended = {"cancelled": cancelled, "dead": dead, "expired": expired}
    others = {word: _run_page_state(stack, browser, r, word) for word, r in ended.items()}
    assert all(colour != green for colour in others.values()), (green, others)


def test_a_delayed_runs_page_shows_its_wait_apart_from_the_time_it_took(stack, browser):
    root = stack.client.enqueue("planner", {"feature": "later", "steps": 1}, delay_s=1.5)
    _approve(stack.client, root)
    stack.client.result(root, wait_s=30, follow=True)
    browser.goto(f"{stack.base}/runs/{root}")
    browser.wait_for("!!document.querySelector('[data-field=took]')", 10, "the run's times")
    cards = browser.evaluate(
        "Object.fromEntries(['waited', 'took'].map(f => { const c = document.querySelector("
        "`[data-field=${f}]`); return [f, [c.querySelector('.label').textContent.trim(), "
        "Number(c.dataset.ms)]]; }))"
    )
    assert cards["waited"][0] == "waited before starting" and cards["took"][0] == "took"
    assert 1500 <= cards["waited"][1] < 3000, cards
    assert 0 < cards["took"][1] < 1500, cards


def test_a_joins_branches_are_labelled_with_their_index_and_payload(stack, browser):
    feature = "<b>bold</b> & a feature with a long name"
    root = stack.client.enqueue("planner", {"feature": feature, "steps": 2})
    _approve(stack.client, root)
    stack.client.result(root, wait_s=30, follow=True)
    browser.goto(f"{stack.base}/runs/{root}")
    labels = browser.evaluate(
        "[...document.querySelectorAll('.tree .fan > .branch > .branch-label')]"
        ".map(l => l.textContent)"
    )
    assert [label[:3] for label in labels] == ["#0 ", "#1 "], labels
    for label in labels:
        short = label[3:]
        assert short.startswith('{"feature":"<b>bold</b> & a') and short.endswith("…"), label
        assert len(short) <= 40, label
    assert browser.evaluate("document.querySelectorAll('.tree b').length") == 0


def test_cancel_the_run_from_its_page_lands_on_the_runs_page(stack, browser, tmp_path):
    root = stack.client.enqueue("planner", {"feature": "cancel me", "steps": 1}, delay_s=600)
    browser.goto(f"{stack.base}/runs/{root}")
    _unlock(browser)
    try:
        button = "document.querySelector('.actions form[action$=\"/cancel\"] button')"
        browser.wait_for(f"!!{button}", 10, "the run's cancel button")
        browser.evaluate(f"{button}.click()")
        browser.wait_for(
            "(document.querySelector('.notice') || {}).textContent === "
            f"'run {root}: 1 task(s) cancelled (1 delayed)'",
            10,
            "the cancel's notice",
        )
        assert browser.evaluate("location.pathname") == f"/runs/{root}"
        assert stack.client.status(root) == "cancelled"
        browser.wait_for(f"{RUN_STATE}[0] === 'cancelled'", 10, "the run's badge")
        took = "[...document.querySelectorAll('[data-field=took] span')].map(s => s.textContent)"
        assert browser.evaluate(took) == ["started", "never"]
        browser.screenshot(screenshot_path(tmp_path, "dashboard-run-cancelled.png"))
    finally:
        _lock(browser)


# -- waits: the waiting page, a waiting task's signal form ---------------------------------


@pytest.fixture(scope="module")
def waits_team(stack) -> Iterator[None]:
    """The waits test agents (tests/apps/waits.py: `asker` returns a Wait whose then-task
    is `after`) beside the demo team, on the stack's server."""
    env = handoff_env(stack.url, app="apps.waits")
    proc = HandoffProcess(
        ["supervise", "--agents", "asker=1,after=1"], env, stack.folder / "waits.log"
    )
    try:
        yield
    finally:
        proc.stop()


def _park(stack: Stack, event: str, timeout_s: float | None = 600) -> tuple[str, str]:
    """(root, then-task) of a run whose `after` waits for event."""
    client = stack.client
    root = client.enqueue("asker", {"i": 1, "event": event, "timeout_s": timeout_s})
    wait_until(lambda: client.status(root) == "done", 30, "the asker to return its Wait")
    then = client.result(root)["wait"]["then"]
    wait_until(lambda: client.status(then) == "waiting", 30, f"{then} to wait")
    return root, then


def _wait_rows(browser) -> dict:
    return browser.evaluate(
        "Object.fromEntries([...document.querySelectorAll('table.waits tr[data-task]')]"
        ".map(r => [r.dataset.task, [r.dataset.event, r.cells[0].querySelector('a')"
        ".getAttribute('href'), r.cells[5].textContent.trim()]]))"
    )


def test_the_waiting_page_lists_parked_waits_and_a_task_page_signals_one(
    stack, waits_team, browser, tmp_path
):
    root, then = _park(stack, "dash.approve")
    _, forever = _park(stack, "dash.later", timeout_s=None)
    browser.goto(stack.base + "/waiting")
    browser.wait_for(f"!!document.querySelector('tr[data-task=\"{then}\"]')", 10, "the wait")
    rows = _wait_rows(browser)
    assert rows[then][:2] == ["dash.approve", f"/runs/{root}"]
    assert "then dead-lettered" in rows[then][2]  # a timeout of 600 s, on_timeout="fail"
    assert rows[forever][0] == "dash.later" and rows[forever][2] == "never: waits until signalled"
    assert list(rows).index(then) < list(rows).index(forever)  # the oldest first
    assert browser.evaluate("document.querySelector('nav a.on').textContent") == "Waiting"
    browser.screenshot(screenshot_path(tmp_path, "dashboard-waiting.png"))
    browser.goto(stack.base + "/")
    waiting = "document.querySelector('#agents tr[data-agent=after] [data-field=waiting]')"
    browser.wait_for(f"{waiting}.textContent.trim() === '2'", 10, "the overview's count")
    browser.screenshot(screenshot_path(tmp_path, "dashboard-overview-waiting.png"))

    browser.goto(f"{stack.base}/tasks/{then}")
    assert browser.evaluate("document.querySelector('[data-field=event]').textContent") == (
        "dash.approve"
    )
    _unlock(browser)
    try:
        browser.evaluate(
            """(() => { const f = document.querySelector('form.signal');
                f.querySelector('textarea').value = '{"by": "ann", "ok": true}';
                f.querySelector('button').click(); })()"""
        )
        browser.wait_for(
            "(document.querySelector('.notice') || {}).textContent === "
            "'signalled dash.approve: 1 wait(s) resumed'",
            10,
            "the signal's notice",
        )
        browser.screenshot(screenshot_path(tmp_path, "dashboard-signal-notice.png"))
        done = stack.client.result(root, wait_s=30, follow=True)
        assert done == {"event": {"by": "ann", "ok": True}, "timed_out": False}
        browser.goto(f"{stack.base}/tasks/{then}")
        browser.wait_for("!document.querySelector('form.signal')", 10, "the form gone")
        browser.screenshot(screenshot_path(tmp_path, "dashboard-signalled-task.png"))
    finally:
        _lock(browser)
    browser.goto(stack.base + "/waiting")
    browser.wait_for(f"!document.querySelector('tr[data-task=\"{then}\"]')", 10, "its row gone")
    assert list(_wait_rows(browser)) == [forever]
    stack.client.cancel(forever)


def test_a_signal_from_a_task_page_needs_the_token_and_json_or_resumes_nothing(
    stack, waits_team, browser, tmp_path
):
    root, then = _park(stack, "dash.guarded")
    browser.goto(f"{stack.base}/tasks/{then}")
    browser.wait_for("!!document.querySelector('form.signal')", 10, "the signal form")
    browser.screenshot(screenshot_path(tmp_path, "dashboard-waiting-task.png"))
    path, signalled = f"/tasks/{then}/signal", "handoff:{events}:sig:dash.guarded"
    token, body = {"X-Handoff-Token": TOKEN}, "data=%7B%22x%22%3A1%7D"  # {"x":1}
    refused = [
        (body, {}, 403, "this action needs the dashboard's token"),
        (body, {"X-Handoff-Token": "not-the-token"}, 403, "wrong token"),
        (body, {**token, "Origin": "http://evil.example"}, 403, "cross-origin request refused"),
        ("data=%7Bnope", token, 400, "data is not JSON"),
        ("data=NaN", token, 400, "data is not JSON"),
    ]
    for form, headers, status, message in refused:
        got, text, _ = _request(stack.port, "POST", path, form, **headers)
        assert (got, text.count("\n")) == (status, 1) and message in text, (form, text)
    got, text, _ = _request(stack.port, "POST", f"/tasks/{root}/signal", body, **token)
    assert got == 409 and f"task {root} is not waiting for an event (done)" in text
    # the page's own form, from the page, without unlocking: refused like the rest
    browser.evaluate("document.querySelector('form.signal button').click()")
    browser.wait_for("document.title.startsWith('403')", 10, "the refusal page")
    assert stack.client.status(then) == "waiting" and not stack.raw.exists(signalled)
    assert _request(stack.port, "POST", path, body, **token)[0] == 303
    assert stack.client.result(root, wait_s=30, follow=True)["event"] == {"x": 1}


# -- bad requests ----------------------------------------------------------------------------


def test_bad_requests_get_a_status_and_one_line_and_the_server_keeps_serving(stack):
    cases = [
        ("GET", "/tasks/coder.nosuchtask", "", {}, 404,
         "task coder.nosuchtask is unknown (never enqueued, or its record expired)"),
        ("GET", "/search?q=not%20an%20id", "", {}, 400, "invalid task id 'not an id'"),
        ("GET", "/search?q=" + "a" * 300, "", {}, 400, "query over 200 characters"),
        ("GET", "/search?q=" + "a" * 3000, "", {}, 414, "URL over 2048 bytes"),
        ("GET", "/runs/..", "", {}, 400, "invalid task id"),
        ("GET", "/agents/NOT%20AN%20AGENT", "", {}, 400, "invalid agent name"),
        ("GET", "/agents/nobody", "", {}, 404, "agent 'nobody' is unknown"),
        ("POST", "/agents/coder/dead/purge", "all=1", {"X-Handoff-Token": "wrong-token"}, 403,
         "wrong token"),
        ("POST", "/scale", "agent=coder&count=3", {"Origin": "http://evil.example"}, 403,
         "cross-origin request refused"),
        ("GET", "/agents/coder/dead/purge?all=1", "", {}, 405, "GET is not allowed here"),
        ("DELETE", "/tasks/coder.x1", "", {}, 405, "DELETE is not allowed here"),
        ("POST", "/scale", "x" * 20_000, {"X-Handoff-Token": TOKEN}, 413, "request body over"),
        ("POST", "/scale", "agent=coder&count=many", {"X-Handoff-Token": TOKEN}, 400,
         "count must be a whole number"),
        ("GET", "/", "", {"Host": "attacker.example:80"}, 400, "unexpected Host header"),
        ("GET", "/events/nothing-here", "", {}, 400, "unknown page 'nothing-here'"),
    ]  # fmt: skip
    for method, path, body, headers, status, message in cases:
        got, text, _ = _request(stack.port, method, path, body, **headers)
        assert got == status, (method, path[:60], got, text)
        assert text.startswith(f"{status}: ") and message in text, (path[:60], text)
        assert text.count("\n") == 1, text  # one line
    status, text, headers = _request(stack.port, "GET", "/", Accept="text/html")
    assert status == 200 and "<main>" in text
    assert "script-src 'self'" in headers["content-security-policy"]
    assert (
        "unexpected Host" in _request(stack.port, "GET", "/", Host="evil:1", Accept="text/html")[1]
    )


# -- cost ----------------------------------------------------------------------------------


class SseReader(threading.Thread):
    """One live page: an open event stream, read until stop()."""

    def __init__(self, port: int, topic: str) -> None:
        super().__init__(daemon=True)
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.conn.request("GET", f"/events/{topic}")
        self.sock = self.conn.sock
        self.response = self.conn.getresponse()
        assert self.response.status == 200
        self.events = 0
        self.start()

    def run(self) -> None:
        try:
            for line in self.response:
                if line.startswith(b"event: regions"):
                    self.events += 1
        except (OSError, ValueError, AttributeError):
            pass  # closed by stop()

    def stop(self) -> None:
        """Shut the socket first: a read blocked in the thread returns at once."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.join(5)
        self.conn.close()


def _commands_per_s(raw, window_s: float) -> tuple[float, dict[str, int]]:
    before = command_calls(raw)
    time.sleep(window_s)
    after = command_calls(raw)
    sent = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    sent["info"] = sent.get("info", 1) - 1  # the measurement's own INFO
    return sum(sent.values()) / window_s, sent


def test_twenty_open_dashboards_cost_redis_no_more_than_one(private_server, tmp_path):
    """Each dashboard watches the overview and an agent's page (the page that reads Redis
    beyond the monitor's snapshot: queue head, delayed, dead letters). Read-only here."""
    client = Client(settings=Settings(redis=RedisPoolConfig(url=private_server.url)))
    raw = plain_client(private_server.url)
    readers: list[SseReader] = []
    monitor = None
    try:
        client.enqueue_many("a", [{"n": i} for i in range(5)])
        client.enqueue("b", {"n": 1}, delay_s=600)
        port = free_tcp_port()
        env = handoff_env(private_server.url, app="workers.demo")
        monitor = _start_monitor(env, port, tmp_path / "monitor.log")
        _, text, _ = _request(port, "GET", "/", Accept="text/html")
        assert "read-only: start the monitor with --web-token" in text
        refused = _request(
            port, "POST", "/agents/a/dead/purge", "all=1", **{"X-Handoff-Token": "x"}
        )
        assert refused[:2] == (403, "403: read-only dashboard: start it with --web-token "
                                    "to allow actions\n")  # fmt: skip

        def open_dashboards(n: int) -> None:
            for _ in range(n):
                readers.extend([SseReader(port, "overview"), SseReader(port, "agent/a")])

        window_s = 16 * TICK_S
        open_dashboards(1)
        time.sleep(4 * TICK_S)
        one, one_sent = _commands_per_s(raw, window_s)
        open_dashboards(19)
        time.sleep(4 * TICK_S)
        twenty, twenty_sent = _commands_per_s(raw, window_s)
        assert len(readers) == 40 and all(r.is_alive() for r in readers)
        assert all(r.events >= 1 for r in readers)  # every page got its state
        print(f"\ncommands/s with 1 dashboard: {one:.1f} {sorted(one_sent.items())}")
        print(f"commands/s with 20 dashboards: {twenty:.1f} {sorted(twenty_sent.items())}")
        assert twenty <= one * 1.25 + 1, (one_sent, twenty_sent)
    finally:
        for reader in readers:
            reader.stop()
        if monitor is not None:
            monitor.stop()
        client.close()
        raw.close()


def _closed_by_server(sock: socket.socket) -> bool:
    """True once the server closed it (what it sent before, a 503, is read and dropped)."""
    try:
        while sock.recv(4096):
            pass
        return True
    except BlockingIOError:
        return False
    except OSError:  # reset
        return True


def _aggregate_at(raw) -> float:
    return float(raw.hget(Keys().monitor, "updated_at") or 0)


FLOOD = 900  # half-sent requests, against a file limit of NOFILE
NOFILE = 768
HEADER_TIMEOUT_S = 2.0


def test_half_sent_requests_cannot_hold_the_dashboard_or_the_monitor(private_server, tmp_path):
    """More half-sent requests than the monitor has file descriptors: pages still answer
    at once, every half-sent one is closed within the header timeout, the log stays a few
    lines, and the aggregate hash keeps updating."""
    env = handoff_env(private_server.url, app="workers.demo")
    env["HANDOFF_MONITOR_WEB_HEADER_TIMEOUT_S"] = str(HEADER_TIMEOUT_S)
    port, log = free_tcp_port(), tmp_path / "monitor.log"
    raw = plain_client(private_server.url)
    monitor = _start_monitor(env, port, log, nofile=NOFILE)
    held: list[socket.socket] = []
    try:
        for _ in range(FLOOD):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Half: ")
            sock.setblocking(False)
            held.append(sock)
        flooded = time.monotonic()
        trickling = held[-20:]  # these send a byte now and then: no reprieve for them

        def all_closed() -> bool:
            for sock in trickling:
                with contextlib.suppress(OSError):
                    sock.send(b"x")
            return all(_closed_by_server(s) for s in held)

        aggregate_then = _aggregate_at(raw)
        fds_flooded = psutil.Process(monitor.pid).num_fds()
        assert fds_flooded < NOFILE - 50  # room left for the monitor's own connections
        for _ in range(5):  # pages answer while the flood is held open
            began = time.monotonic()
            assert _request(port, "GET", "/workers")[0] == 200
            assert time.monotonic() - began < 2.0
        wait_until(
            all_closed, HEADER_TIMEOUT_S + 3,
            f"the server to close all {FLOOD} half-sent requests",
        )  # fmt: skip
        closed_s = time.monotonic() - flooded
        wait_until(lambda: _aggregate_at(raw) > aggregate_then + 2 * TICK_S, 5,
                   "the aggregate hash to keep updating")  # fmt: skip
        fds = psutil.Process(monitor.pid).num_fds()
        for i in range(100):  # uvicorn would log each of these: counted in the line instead
            bad = b"NOT HTTP\r\n\r\n" if i % 2 else b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            bad += b"" if i % 2 else b"Connection: upgrade\r\nUpgrade: websocket\r\n\r\n"
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(bad)
                sock.recv(4096)
        assert _request(port, "GET", "/")[0] == 200
        print(f"\n{FLOOD} half-sent closed within {closed_s:.2f}s; monitor fds: {fds_flooded} "
              f"flooded, {fds} after; "
              f"log {log.stat().st_size} bytes")  # fmt: skip
        assert log.stat().st_size < 4000, monitor.output()[-2000:]
        assert "Traceback" not in monitor.output()
    finally:
        for sock in held:
            sock.close()
        monitor.stop()
        raw.close()


def test_when_every_connection_is_a_live_page_one_more_gets_a_503_and_a_line(
    private_server, tmp_path
):
    env = handoff_env(private_server.url, app="workers.demo")
    env["HANDOFF_MONITOR_WEB_MAX_CONNECTIONS"] = "8"
    port = free_tcp_port()
    monitor = _start_monitor(env, port, tmp_path / "monitor.log")
    readers = []
    try:
        readers = [SseReader(port, "overview") for _ in range(8)]
        busy = "503: the dashboard is at its connection limit: retry\n"
        assert _request(port, "GET", "/")[:2] == (503, busy)
        wait_until(lambda: "dashboard: 1 refused (every connection busy)" in monitor.output(),
                   5, "the refusal's log line")  # fmt: skip
        readers.pop().stop()
        wait_until(lambda: _request(port, "GET", "/")[0] == 200, 5, "a page once one closed")
    finally:
        for reader in readers:
            reader.stop()
        monitor.stop()


# -- units ---------------------------------------------------------------------------------


def test_addresses_and_hosts_parse_with_one_line_errors():
    from handoff.observe.web.guard import LOOPBACK_NAMES, allowed_hosts
    from handoff.observe.web.server import parse_address

    assert parse_address("127.0.0.1:8321") == ("127.0.0.1", 8321)
    assert parse_address(":8321") == parse_address("8321") == ("127.0.0.1", 8321)
    assert parse_address("[::1]:9000") == ("::1", 9000)
    for bad in ("127.0.0.1", "host:0", "host:70000", "[::1]", "a b:80"):
        with pytest.raises(ValueError, match=r"expected|not a host"):
            parse_address(bad)
    assert allowed_hosts("127.0.0.1") == allowed_hosts("localhost") == LOOPBACK_NAMES
    assert allowed_hosts("0.0.0.0") is None
    assert "10.1.2.3" in allowed_hosts("10.1.2.3")


def test_the_monitor_without_web_loads_no_web_framework(redis_url):
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "handoff", "monitor", "--once", "--json"],
        env=handoff_env(redis_url), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()}
    assert not {m for m in loaded if m.split(".")[0] in ("starlette", "uvicorn", "jinja2")}
    assert "handoff.cli.monitor_commands" in loaded  # the right command ran


def test_the_hub_builds_a_watched_page_once_a_tick_for_all_its_viewers():
    from markupsafe import Markup

    from handoff.observe.web.hub import Hub
    from handoff.observe.web.pages import View

    built: list[str] = []

    def build(topic: str, snapshot: dict | None) -> View:
        built.append(topic)
        return View(regions={"n": Markup(str((snapshot or {}).get("n")))})

    async def scenario() -> list[bytes | None]:
        hub = Hub(build)
        hub.attach(asyncio.get_running_loop())
        viewers = [await hub.subscribe("overview") for _ in range(20)]
        viewers.append(await hub.subscribe("agent/a"))
        first = [await v.next(0.1) for v in viewers]
        assert all(b'"n":"None"' in m for m in first)
        for n in (1, 2, 3):
            hub.feed({"n": n})
            await asyncio.sleep(0.05)
        latest = [await v.next(0.1) for v in viewers]
        hub.close()
        await asyncio.sleep(0)
        assert all([await v.next(0.1) == b"" for v in viewers])  # closed: streams end
        return latest

    latest = asyncio.run(scenario())
    assert all(b'"n":"3"' in m for m in latest)  # each viewer holds the latest state only
    # Built on the first subscription, then at most once a tick: not once per viewer.
    assert 2 <= built.count("overview") <= 4 and 2 <= built.count("agent/a") <= 4
